"""The Helm chart (helm/registry-gate), rendered offline with the real Helm library.

Rendering and linting go through ``helm-python-sdk`` (Helm v4's Go SDK behind a C ABI;
no ``helm`` binary, no cluster), for the default values and every example values file
in ``helm/registry-gate/ci/`` (the chart-testing convention). Every rendered object is
validated against the Kubernetes OpenAPI schemas that ``kubernetes-validate`` ships
(strict: unknown fields are errors), except the ServiceMonitor (a CRD, checked here by
hand). The gate.yaml the chart renders must load with the gate's own settings and
policy loaders, and a "pod" assembled from the rendered objects (volumes laid out as
the kubelet lays them out) must start a real gate that answers its probes and hot
reloads a policy updated the way Kubernetes updates a ConfigMap volume.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from proxy.observability.metrics import Metrics
from proxy.policy.rules import load_policy
from proxy.settings import ConfigError, Settings, load_settings, parse_size
from tests.support.deployment import AtomicDir, GateRun, free_port, http_get, self_signed_cert

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "registry-gate"
# kubernetes-validate 1.37 ships schemas for 1.25 to 1.37; the chart declares >=1.25.
# 1.30 is the oldest release still widely supported by managed offerings.
KUBE_VERSION = "1.30.0"
CONFIG_DIR = "/etc/registry-gate"
DATA_DIR = "/var/lib/registry-gate"
RELEASE, NAMESPACE = "rg", "gate"
FULLNAME = "rg-registry-gate"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _require(module: str) -> ModuleType:
    """Import a test-only dependency: skip without it, except under CI=true."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if _in_ci():
            raise
        pytest.skip(f"{module} is not installed (pip install -e '.[dev]')", allow_module_level=True)
        raise  # unreachable: pytest.skip raises


helm = _require("helm_python")
kubernetes_validate = _require("kubernetes_validate")


# -- rendering ------------------------------------------------------------------------


def _scenarios() -> dict[str, dict[str, Any] | None]:
    scenarios: dict[str, dict[str, Any] | None] = {"default": None}
    for path in sorted((CHART / "ci").glob("*-values.yaml")):
        scenarios[path.name.removesuffix("-values.yaml")] = yaml.safe_load(path.read_text())
    return scenarios


SCENARIOS = _scenarios()


@dataclass(frozen=True)
class Rendered:
    """The objects one `helm template` produced, with accessors for the parts tested."""

    objects: list[dict[str, Any]]
    notes: str
    values: dict[str, Any]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
        return found[0]

    @property
    def workload(self) -> dict[str, Any]:
        found = self.all("StatefulSet") + self.all("Deployment")
        assert len(found) == 1
        return found[0]

    @property
    def pod_spec(self) -> dict[str, Any]:
        return dict(self.workload["spec"]["template"]["spec"])

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod_spec["containers"]
        assert len(containers) == 1
        return dict(containers[0])

    def find_volume(self, name: str) -> dict[str, Any] | None:
        found = [v for v in self.pod_spec.get("volumes", []) if v["name"] == name]
        assert len(found) <= 1, f"two volumes named {name}"
        return dict(found[0]) if found else None

    def volume(self, name: str) -> dict[str, Any]:
        volume = self.find_volume(name)
        assert volume is not None, f"no volume {name}"
        return volume

    @property
    def config_map(self) -> dict[str, Any]:
        return self.one("ConfigMap", FULLNAME)

    @property
    def gate_yaml_text(self) -> str:
        return str(self.config_map["data"]["gate.yaml"])

    @property
    def gate_yaml(self) -> dict[str, Any]:
        document = yaml.safe_load(self.gate_yaml_text)
        assert isinstance(document, dict)
        return document


@functools.cache
def _render_cached(values_json: str) -> Rendered:
    values = json.loads(values_json)
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
        merged = chart.merge_values(values)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(objects, notes, merged)


def render(values: dict[str, Any] | None = None) -> Rendered:
    return _render_cached(json.dumps(values))


def merged(base: dict[str, Any] | None, override: dict[str, Any]) -> dict[str, Any]:
    """`override` laid over `base` (mappings merge, anything else replaces)."""
    result: dict[str, Any] = json.loads(json.dumps(base or {}))
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


@pytest.fixture(params=list(SCENARIOS), ids=list(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> tuple[str, Rendered]:
    return request.param, render(SCENARIOS[request.param])


# -- the chart as Helm sees it --------------------------------------------------------


def test_chart_loads_with_schema() -> None:
    with helm.Chart.load(CHART) as chart:
        assert chart.name == "registry-gate"
        assert chart.metadata["apiVersion"] == "v2"
        assert chart.schema is not None and chart.schema["additionalProperties"] is False
        assert {t["name"] for t in chart.templates} >= {
            "templates/_helpers.tpl",
            "templates/NOTES.txt",
            "templates/workload.yaml",
        }


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART, SCENARIOS[name], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); 2 warning, 3 error.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


def _check_service_monitor(obj: dict[str, Any]) -> None:
    """No schema ships for the Prometheus Operator CRD: check what the operator reads."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    spec = obj["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert spec["selector"]["matchLabels"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    endpoint_keys = {"port", "path", "scheme", "interval", "scrapeTimeout", "tlsConfig"}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= endpoint_keys
        assert endpoint["scheme"] in ("http", "https")
        assert re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint["interval"])


def test_every_object_is_valid_kubernetes(scenario: tuple[str, Rendered]) -> None:
    _, rendered = scenario
    assert rendered.objects
    for obj in rendered.objects:
        if obj["kind"] == "ServiceMonitor":
            _check_service_monitor(obj)
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")
        expected = NAMESPACE
        if obj["metadata"]["name"] == f"{FULLNAME}-dashboard":
            expected = rendered.values["metrics"]["dashboard"]["namespace"] or NAMESPACE
        assert obj["metadata"]["namespace"] == expected
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_chart_creates_no_secrets(scenario: tuple[str, Rendered]) -> None:
    """Credentials and keys are references to existing Secrets, never chart values."""
    _, rendered = scenario
    assert rendered.all("Secret") == []


# -- gate.yaml and policies -----------------------------------------------------------


def _policy_sources(rendered: Rendered) -> dict[str, str]:
    """Policy file name -> content: inline ones from the ConfigMap, existing ones from
    the repository's policies/ folder (the examples create their ConfigMap from it)."""
    data = rendered.config_map["data"]
    sources = {p["name"]: data[f"policy.{p['name']}"] for p in rendered.values["policies"]}
    assert len(data) == 1 + len(sources)
    for name in rendered.values["existingPolicies"]["files"]:
        sources[name] = (ROOT / "policies" / name).read_text()
    return sources


def test_gate_yaml_loads_with_the_gates_settings(scenario: tuple[str, Rendered]) -> None:
    _, rendered = scenario
    settings = pod_settings(rendered)
    port = rendered.values["containerPort"]
    assert settings.listen == f"0.0.0.0:{port}"
    assert str(settings.storage.path) == f"{DATA_DIR}/cache"
    expected = [f"{CONFIG_DIR}/policies/{name}" for name in _policy_sources(rendered)]
    assert [str(p) for p in settings.policy.files] == expected


def test_policies_load_with_the_gates_policy_loader(
    scenario: tuple[str, Rendered], tmp_path: Path
) -> None:
    _, rendered = scenario
    settings = pod_settings(rendered)
    files = []
    for name, content in _policy_sources(rendered).items():
        (tmp_path / name).write_text(content)
        files.append(tmp_path / name)
    load_policy(files, known_registries={u.registry for u in settings.upstreams})


def _quantity_bytes(quantity: str) -> int:
    match = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?", quantity)
    assert match, quantity
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    units.update({"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12})
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def test_cache_size_fits_its_volume(scenario: tuple[str, Rendered]) -> None:
    _, rendered = scenario
    if rendered.gate_yaml["storage"].get("backend") == "s3":
        # The cap is on the bucket; the pod's volume is scratch space only.
        assert rendered.all("PersistentVolumeClaim") == []
        return
    max_size = parse_size(rendered.gate_yaml["storage"].get("max_size", "20GiB"))
    claims = rendered.workload["spec"].get("volumeClaimTemplates", []) + rendered.all(
        "PersistentVolumeClaim"
    )
    for claim in claims:
        assert max_size < _quantity_bytes(claim["spec"]["resources"]["requests"]["storage"])
    limit = (rendered.find_volume("cache") or {}).get("emptyDir", {}).get("sizeLimit")
    if limit:
        assert max_size < _quantity_bytes(limit)


# -- pod security, probes, volumes ----------------------------------------------------


def _dockerfile_uid() -> int:
    match = re.search(r"^ARG GATE_UID=([0-9]+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert match, "Dockerfile has no ARG GATE_UID"
    return int(match.group(1))


def test_pod_security(scenario: tuple[str, Rendered]) -> None:
    _, rendered = scenario
    pod = rendered.pod_spec
    uid = _dockerfile_uid()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["runAsGroup"] == uid
    assert pod["securityContext"]["fsGroup"] == uid
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    container = rendered.container["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["runAsNonRoot"] is True
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert container["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in container
    # A read-only root needs a writable /tmp.
    mounts = {m["mountPath"]: m for m in rendered.container["volumeMounts"]}
    assert "emptyDir" in rendered.volume(mounts["/tmp"]["name"])
    assert all("hostPath" not in v for v in pod["volumes"])
    resources = rendered.container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


# The gate.yaml keys the chart sets through the environment (a Secret, the pod's identity).
CHART_OVERRIDES = {
    "REGISTRY_GATE_UPLOAD_SECRET",
    "REGISTRY_GATE_REPLICA__ID",
    "REGISTRY_GATE_REPLICA__PEER_URL",
}


def test_service_links_are_off_because_the_gate_reads_its_prefix(
    scenario: tuple[str, Rendered],
) -> None:
    """Kubernetes injects REGISTRY_GATE_PORT etc. for a Service named registry-gate;
    the chart turns service links off, and the gate ignores those names anyway."""
    _, rendered = scenario
    assert rendered.pod_spec["enableServiceLinks"] is False
    service_links = {
        "REGISTRY_GATE_SERVICE_HOST": "10.96.0.10",
        "REGISTRY_GATE_SERVICE_PORT": "5000",
        "REGISTRY_GATE_PORT": "tcp://10.96.0.10:5000",
        "REGISTRY_GATE_PORT_5000_TCP_ADDR": "10.96.0.10",
    }
    settings = load_settings(ROOT / "deploy" / "gate.yaml", environ=service_links)
    assert settings.listen == "0.0.0.0:5000"
    with pytest.raises(ConfigError):
        load_settings(ROOT / "deploy" / "gate.yaml", environ={"REGISTRY_GATE_LISTEN": "nope"})
    for env in rendered.container["env"]:
        if env["name"].startswith("REGISTRY_GATE_"):
            assert env["name"] in CHART_OVERRIDES


def test_probes(scenario: tuple[str, Rendered]) -> None:
    _, rendered = scenario
    container = rendered.container
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == rendered.values["containerPort"]
    scheme = "HTTPS" if rendered.values["tls"]["enabled"] else "HTTP"
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http", "scheme": scheme}
    assert (
        container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"]
        >= 60
    )
    assert rendered.pod_spec["terminationGracePeriodSeconds"] >= 30


def test_the_grace_period_covers_the_whole_drain(scenario: tuple[str, Rendered]) -> None:
    """The kubelet SIGKILLs at the grace period, counted from before the preStop sleep:
    it must cover that sleep and the gate's whole drain (shutdown_timeout)."""
    _, rendered = scenario
    drain = pod_settings(rendered).shutdown_timeout
    grace = rendered.pod_spec["terminationGracePeriodSeconds"]
    assert grace >= rendered.values["preStopSleepSeconds"] + drain + 5


@pytest.mark.parametrize(
    ("values", "grace"),
    [
        ({}, 5 + 25 + 5),
        ({"config": {"shutdown_timeout": 50.5}}, 5 + 51 + 5),
        ({"preStopSleepSeconds": 0, "config": {"shutdown_timeout": 10}}, 15),
        ({"terminationGracePeriodSeconds": 90}, 90),
    ],
)
def test_the_grace_period_follows_shutdown_timeout(values: dict[str, Any], grace: int) -> None:
    base = {"config": {"upstreams": [{"registry": "docker.io", "url": "https://x.example"}]}}
    rendered = render(merged(base, values))
    assert rendered.pod_spec["terminationGracePeriodSeconds"] == grace
    # The chart's default is the gate's own.
    assert Settings.model_fields["shutdown_timeout"].default == 25


def _projected_items(rendered: Rendered) -> dict[str, tuple[str, str, str]]:
    """Path inside /etc/registry-gate -> (source kind, object name, key)."""
    items: dict[str, tuple[str, str, str]] = {}
    for source in rendered.volume("config")["projected"]["sources"]:
        ((kind, ref),) = source.items()
        for item in ref["items"]:
            assert item["path"] not in items, f"two sources project {item['path']}"
            items[item["path"]] = (kind, ref["name"], item["key"])
    return items


def test_volumes(scenario: tuple[str, Rendered]) -> None:
    _, rendered = scenario
    container = rendered.container
    assert container["args"] == ["serve", "--config", f"{CONFIG_DIR}/gate.yaml"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # subPath mounts never receive ConfigMap updates: hot reload would silently stop.
    assert all("subPath" not in m and "subPathExpr" not in m for m in mounts.values())
    assert mounts[CONFIG_DIR]["readOnly"] is True
    assert mounts[CONFIG_DIR]["name"] == "config"
    assert mounts[DATA_DIR]["name"] == "cache"
    assert not mounts[DATA_DIR].get("readOnly")

    # Every file gate.yaml names under /etc/registry-gate is projected into the volume,
    # and every path the gate writes is on the cache volume.
    items = _projected_items(rendered)
    assert items["gate.yaml"] == ("configMap", FULLNAME, "gate.yaml")
    settings = pod_settings(rendered)
    named = [*settings.policy.files, settings.auth.signing_key, settings.auth.htpasswd]
    if settings.tls is not None:
        named += [settings.tls.cert_file, settings.tls.key_file]
    for path in filter(None, named):
        relative = path.relative_to(CONFIG_DIR)
        assert str(relative) in items, f"{path} is not in the config volume"
    for path in filter(None, [settings.storage.path, settings.audit.path]):
        assert path.is_relative_to(DATA_DIR)

    cache = rendered.find_volume("cache")
    values = rendered.values
    if settings.storage.backend == "s3":
        # The cache is in the bucket: the pod's volume is scratch, whatever persistence says.
        assert cache is not None and "emptyDir" in cache
    elif rendered.workload["kind"] == "StatefulSet" and values["persistence"]["enabled"]:
        (claim,) = rendered.workload["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "cache"
        assert claim["spec"]["resources"]["requests"]["storage"] == values["persistence"]["size"]
        assert cache is None
    elif values["persistence"]["enabled"]:
        assert cache is not None
        claim_name = values["persistence"]["existingClaim"] or f"{FULLNAME}-cache"
        assert cache["persistentVolumeClaim"] == {"claimName": claim_name}
    else:
        assert cache is not None and "emptyDir" in cache


def test_default_is_a_statefulset_with_a_cache_claim() -> None:
    rendered = render()
    assert rendered.workload["kind"] == "StatefulSet"
    spec = rendered.workload["spec"]
    assert spec["serviceName"] == f"{FULLNAME}-headless"
    assert rendered.one("Service", f"{FULLNAME}-headless")["spec"]["clusterIP"] == "None"
    assert spec["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert rendered.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    service = rendered.one("Service", FULLNAME)
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 5000, "targetPort": "http", "protocol": "TCP"}
    ]
    for kind in ("Ingress", "ServiceMonitor", "PersistentVolumeClaim"):
        assert rendered.all(kind) == []
    assert [c["metadata"]["name"] for c in rendered.all("ConfigMap")] == [FULLNAME]
    assert rendered.gate_yaml["upstreams"] == [
        {"registry": "docker.io", "url": "https://registry-1.docker.io"}
    ]
    lifecycle = rendered.container["lifecycle"]["preStop"]["exec"]["command"]
    assert lifecycle == ["sleep", "5"]


# -- checksum annotation and hot reload -----------------------------------------------


def test_checksum_annotation_follows_gate_yaml_not_policies() -> None:
    def annotations(values: dict[str, Any] | None) -> dict[str, str]:
        return dict(render(values).workload["spec"]["template"]["metadata"]["annotations"])

    base = render()
    checksum = annotations(None)["checksum/config"]
    assert checksum == hashlib.sha256(base.gate_yaml_text.encode()).hexdigest()

    log_debug = {"config": merged(base.values["config"], {"log_level": "debug"})}
    assert annotations(log_debug)["checksum/config"] != checksum

    policy = [{"name": "dockerhub-mirror.yaml", "content": "search: [docker.io]\n"}]
    # A policy edit keeps the pods: the gate reloads the file itself ...
    assert annotations({"policies": policy}) == annotations(None)
    # ... unless the operator asks for a roll.
    rolled = annotations({"policies": policy, "rollOnPolicyChange": True})
    assert rolled["checksum/config"] == checksum
    assert (
        rolled["checksum/policies"]
        != annotations({"rollOnPolicyChange": True})["checksum/policies"]
    )


# -- non-default values ---------------------------------------------------------------


def test_deployment_with_emptydir() -> None:
    rendered = render(SCENARIOS["deployment-emptydir"])
    assert rendered.workload["kind"] == "Deployment"
    assert "strategy" not in rendered.workload["spec"]
    assert rendered.volume("cache")["emptyDir"] == {"sizeLimit": "10Gi"}
    assert rendered.all("PersistentVolumeClaim") == []
    assert rendered.all("PodDisruptionBudget") == []
    assert [s["metadata"]["name"] for s in rendered.all("Service")] == [FULLNAME]
    assert "lifecycle" not in rendered.container
    assert rendered.gate_yaml["audit"] == {"stdout": True}
    assert "emptyDir: it starts cold" in rendered.notes


def test_deployment_with_a_chart_pvc() -> None:
    rendered = render(SCENARIOS["deployment-pvc"])
    assert rendered.workload["spec"]["strategy"] == {"type": "Recreate"}
    claim = rendered.one("PersistentVolumeClaim", f"{FULLNAME}-cache")
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert claim["metadata"]["annotations"] == {"backup.example.com/skip": "true"}
    assert rendered.gate_yaml["policy"]["files"] == [f"{CONFIG_DIR}/policies/mirror.yaml"]
    assert "dockerhub-mirror.yaml" not in json.dumps(rendered.config_map)


def test_existing_secrets_and_policies() -> None:
    rendered = render(SCENARIOS["enterprise"])
    env = {e["name"]: e for e in rendered.container["env"]}
    assert env["DOCKERHUB_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "dockerhub-credentials", "key": "token"}
    }
    assert env["REGISTRY_GATE_UPLOAD_SECRET"]["valueFrom"] == {
        "secretKeyRef": {"name": "registry-gate-upload", "key": "upload-secret"}
    }
    items = _projected_items(rendered)
    assert items["secrets/signing-key.pem"] == ("secret", "registry-gate-signing-key", "token.pem")
    assert items["secrets/htpasswd"] == ("secret", "registry-gate-htpasswd", "htpasswd")
    assert items["policies/enterprise.yaml"] == (
        "configMap",
        "registry-gate-policies",
        "enterprise.yaml",
    )
    projected = rendered.volume("config")["projected"]
    assert projected["defaultMode"] == 0o440  # group-readable through fsGroup, no more
    auth = rendered.gate_yaml["auth"]
    assert auth["signing_key"] == f"{CONFIG_DIR}/secrets/signing-key.pem"
    assert auth["htpasswd"] == f"{CONFIG_DIR}/secrets/htpasswd"
    upstream = rendered.gate_yaml["upstreams"][0]
    assert upstream["password_env"] == "DOCKERHUB_TOKEN"
    assert "password" not in upstream
    # One replica on the filesystem backend: a StatefulSet with its own claim.
    assert rendered.workload["kind"] == "StatefulSet"
    assert rendered.workload["spec"]["replicas"] == 1


# Stand-ins for the Secrets ci/scale-out-values.yaml references, and the pod's own
# downward-API fields.
SCALE_OUT_SECRETS = {
    "registry-gate-s3": {"access-key": "AKIAEXAMPLE", "secret-key": "s3-secret-example"},
    "registry-gate-redis": {"password": "redis-password-example"},
    "registry-gate-upload": {"upload-secret": "5e1f0c2b9a7d4e3f8a6b1c0d2e4f6a8b"},
}
POD_FIELDS = {"metadata.name": "rg-registry-gate-7d9c5-x2kqp", "status.podIP": "10.42.1.17"}


def pod_environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet makes it: Secrets and downward-API
    fields resolved, `$(VAR)` expanded from the variables before it."""
    env: dict[str, str] = {}
    for variable in container["env"]:
        if "value" in variable:
            env[variable["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m.group(1), m.group(0)),
                variable["value"],
            )
            continue
        source = variable["valueFrom"]
        if "fieldRef" in source:
            env[variable["name"]] = POD_FIELDS[source["fieldRef"]["fieldPath"]]
        else:
            ref = source["secretKeyRef"]
            known = SCALE_OUT_SECRETS.get(ref["name"], {})
            env[variable["name"]] = known.get(ref["key"], "placeholder-secret-0123456789abcdef")
    return env


def pod_settings(rendered: Rendered) -> Settings:
    """The settings the pod's gate loads: gate.yaml with the container's
    `REGISTRY_GATE_*` overrides (upload secret, replica id and peer URL in scale-out)."""
    overrides = {
        name: value
        for name, value in pod_environment(rendered.container).items()
        if name.startswith("REGISTRY_GATE_")
    }
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "gate.yaml"
        config.write_text(rendered.gate_yaml_text)
        return load_settings(config, overrides)


def test_scale_out_is_a_deployment_sharing_s3_and_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = render(SCENARIOS["scale-out"])
    workload = rendered.workload
    assert workload["kind"] == "Deployment"
    assert workload["spec"]["replicas"] == 3
    # Nothing per pod to keep: no claim of any kind, the rollout is a rolling update.
    assert "volumeClaimTemplates" not in workload["spec"]
    assert rendered.all("PersistentVolumeClaim") == []
    assert all("persistentVolumeClaim" not in v for v in rendered.pod_spec["volumes"])
    assert "strategy" not in workload["spec"]
    assert rendered.all("StatefulSet") == []
    assert [s["metadata"]["name"] for s in rendered.all("Service")] == [FULLNAME]
    selector = workload["spec"]["selector"]
    assert rendered.one("PodDisruptionBudget")["spec"] == {
        "maxUnavailable": 1,
        "selector": selector,
    }
    spread = rendered.pod_spec["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    assert all(c["labelSelector"] == selector and c["maxSkew"] == 1 for c in spread)

    # Credentials are Secret references only: no secret value anywhere in the objects.
    env = {e["name"]: e for e in rendered.container["env"]}
    assert env["S3_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "registry-gate-s3", "key": "access-key"}
    }
    assert env["S3_SECRET_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "registry-gate-s3", "key": "secret-key"}
    }
    assert env["REDIS_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "registry-gate-redis", "key": "password"}
    }
    assert env["REGISTRY_GATE_UPLOAD_SECRET"]["valueFrom"] == {
        "secretKeyRef": {"name": "registry-gate-upload", "key": "upload-secret"}
    }
    everything = json.dumps(rendered.objects)
    for secret in SCALE_OUT_SECRETS.values():
        for value in secret.values():
            assert value not in everything
    assert rendered.all("Secret") == []
    gate_yaml = rendered.gate_yaml
    assert gate_yaml["storage"]["s3"]["access_key_env"] == "S3_ACCESS_KEY"
    assert gate_yaml["storage"]["s3"]["secret_key_env"] == "S3_SECRET_KEY"
    assert gate_yaml["redis"]["password_env"] == "REDIS_PASSWORD"
    assert "upload_secret" not in gate_yaml and "replica" not in gate_yaml

    # The gate's own loader accepts gate.yaml with the pod's environment, and every
    # secret and the replica identity arrive where the settings expect them.
    environ = pod_environment(rendered.container)
    config = tmp_path / "gate.yaml"
    config.write_text(rendered.gate_yaml_text)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(config, environ)
    assert settings.storage.backend == "s3" and settings.storage.s3 is not None
    assert settings.storage.s3.bucket == "registry-gate"
    assert settings.storage.s3.prefix == "cache/"
    assert settings.storage.s3.credentials() == ("AKIAEXAMPLE", "s3-secret-example")
    assert settings.redis is not None
    assert settings.redis.url == "redis://redis-master.redis.svc:6379/0"
    assert settings.redis.password() == "redis-password-example"
    assert settings.upload_secret == SCALE_OUT_SECRETS["registry-gate-upload"]["upload-secret"]
    assert settings.replica.id == POD_FIELDS["metadata.name"]
    assert settings.replica.peer_url == "http://10.42.1.17:5000"
    # Audit: stdout, one chain per replica, each line naming the pod.
    assert settings.audit.stdout and settings.audit.path is None
    assert "3 replica(s) of one gate" in rendered.notes


def test_scale_out_audit_files_name_the_replica() -> None:
    values = merged(
        SCENARIOS["scale-out"],
        {"config": {"audit": {"path": "/var/lib/registry-gate/audit/{replica}.jsonl"}}},
    )
    settings = pod_settings(render(values))
    assert settings.audit.per_replica
    assert settings.audit_file is not None


SCALE_OUT_REFUSALS = [
    ({"replicaCount": 2}, "replicaCount 2 needs shared storage"),
    ({"config": {"redis": None}}, "replicaCount 3 needs config.redis.url"),
    ({"uploadSecret": {"existingSecret": ""}}, "replicaCount 3 needs uploadSecret"),
    (
        {"config": {"audit": {"path": "/var/lib/registry-gate/audit/audit.jsonl"}}},
        "would be written by every replica",
    ),
    ({"config": {"replica": {"id": "one"}}}, "config.replica is set by the chart"),
    ({"config": {"storage": {"s3": None}}}, "needs config.storage.s3"),
    (
        {"config": {"storage": {"s3": {"access_key_env": "KEY"}}}},
        "config.storage.s3.access_key_env and s3Credentials.existingSecret are both set",
    ),
    (
        {
            "s3Credentials": {"existingSecret": ""},
            "config": {"storage": {"s3": {"access_key_env": "KEY", "secret_key_env": "SECRET"}}},
        },
        "access_key_env KEY is not provided",
    ),
    (
        {"config": {"redis": {"password_env": "PW"}}},
        "config.redis.password_env and redisPassword.existingSecret are both set",
    ),
]


@pytest.mark.parametrize(("override", "complaint"), SCALE_OUT_REFUSALS)
def test_chart_refuses_several_replicas_that_would_not_be_one_gate(
    override: dict[str, Any], complaint: str
) -> None:
    base = SCENARIOS["scale-out"]
    if override == {"replicaCount": 2}:
        base = None  # the default values: filesystem backend
    values = merged(base, override)
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError) as caught:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    assert complaint in str(caught.value)


def test_ingress_with_tls() -> None:
    rendered = render(SCENARIOS["enterprise"])
    ingress = rendered.one("Ingress", FULLNAME)
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [
        {"secretName": "registry-gate-ingress-tls", "hosts": ["registry.corp.example.com"]}
    ]
    (rule,) = spec["rules"]
    assert rule["host"] == "registry.corp.example.com"
    assert rule["http"]["paths"][0]["backend"] == {
        "service": {"name": FULLNAME, "port": {"name": "http"}}
    }
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "0"
    assert "https://registry.corp.example.com" in rendered.notes
    assert "speaks plain HTTP" not in rendered.notes


def test_tls_terminated_by_the_gate() -> None:
    rendered = render(SCENARIOS["gate-tls"])
    assert rendered.gate_yaml["tls"] == {
        "cert_file": f"{CONFIG_DIR}/tls/tls.crt",
        "key_file": f"{CONFIG_DIR}/tls/tls.key",
    }
    items = _projected_items(rendered)
    assert items["tls/tls.crt"] == ("secret", "registry-gate-tls", "tls.crt")
    assert items["tls/tls.key"] == ("secret", "registry-gate-tls", "tls.key")
    service = rendered.one("Service", FULLNAME)
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"][0]["port"] == 443
    assert service["spec"]["ports"][0]["appProtocol"] == "https"
    (endpoint,) = rendered.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {"insecureSkipVerify": True}
    claim = rendered.volume("cache")["persistentVolumeClaim"]
    assert claim == {"claimName": "registry-gate-cache"}
    assert rendered.all("PersistentVolumeClaim") == []
    assert "https://rg-registry-gate.gate.svc:443" in rendered.notes


def test_service_monitor_and_dashboard() -> None:
    rendered = render(SCENARIOS["monitoring"])
    assert rendered.gate_yaml["metrics"] == {"listen": "0.0.0.0:9090"}
    ports = {p["name"]: p["containerPort"] for p in rendered.container["ports"]}
    assert ports == {"http": 5000, "metrics": 9090}
    service = rendered.one("Service", FULLNAME)
    assert {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"} in (
        service["spec"]["ports"]
    )
    monitor = rendered.one("ServiceMonitor", FULLNAME)
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {
        "port": "metrics",
        "scheme": "http",
        "path": "/metrics",
        "interval": "15s",
        "scrapeTimeout": "10s",
    }
    # The selector picks the client Service only, not the StatefulSet's headless one.
    selector = monitor["spec"]["selector"]["matchLabels"]
    matching = [
        s["metadata"]["name"]
        for s in rendered.all("Service")
        if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert matching == [FULLNAME]

    dashboard = rendered.one("ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Registries"}
    document = json.loads(dashboard["data"]["registry-gate.json"])
    assert document == json.loads((CHART / "dashboards" / "registry-gate.json").read_text())


_PROMQL_WORDS = {"sum", "by", "rate", "max", "min", "topk", "histogram_quantile", "le"}


def test_dashboard_queries_use_real_metrics_and_labels() -> None:
    """Every registry_gate_* series and every `by (...)` label in the dashboard exists
    in the gate's own metrics registry (checked against proxy.observability.metrics, not a list)."""
    registry = Metrics(process_collectors=False, version="test").registry
    # prometheus-client keeps sample name -> collector; labels are on the collector.
    collectors = registry._names_to_collectors
    document = json.loads((CHART / "dashboards" / "registry-gate.json").read_text())
    expressions = [t["expr"] for panel in document["panels"] for t in panel["targets"]]
    expressions.append(document["templating"]["list"][1]["query"]["query"])
    required = {
        "registry_gate_requests_total",
        "registry_gate_request_duration_seconds_bucket",
        "registry_gate_cache_hits_total",
        "registry_gate_cache_misses_total",
        "registry_gate_upstream_requests_total",
        "registry_gate_policy_decisions_total",
        "registry_gate_circuit_breaker_state",
        "registry_gate_upstream_ratelimit_remaining",
    }
    seen: set[str] = set()
    for expr in expressions:
        names = set(re.findall(r"\bregistry_gate_[a-z_]+", expr))
        assert names, expr
        seen |= names
        labels: set[str] = set()
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            labels |= {label.strip() for label in group.split(",")}
        for selector in re.findall(r"\{([^}]*)\}", expr):
            labels |= set(re.findall(r"([a-z_]+)\s*=~?", selector))
        labels -= {"le", "job"}
        for name in names:
            assert name in collectors, f"{name} is not a gate metric"
            known = set(getattr(collectors[name], "_labelnames", ()))
            assert labels <= known, f"{expr}: {labels - known} not labels of {name}"
    assert required <= seen


# -- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"workload": {"kind": "DaemonSet"}}, "/workload/kind"),
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"config": {"upstreams": []}}, "/config/upstreams"),
        ({"policies": [{"name": "../escape.yaml", "content": "x"}]}, "/policies/0/name"),
        ({"upstreamCredentials": [{"env": "TOKEN"}]}, "/upstreamCredentials/0"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"service": {"type": "ExternalName"}}, "/service/type"),
    ],
)
def test_schema_refuses(values: dict[str, Any], complaint: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as caught:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    assert complaint in str(caught.value)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"config": {"listen": "0.0.0.0:80"}}, "config.listen is set by the chart"),
        ({"config": {"storage": {"path": "/data"}}}, "config.storage.path is set by the chart"),
        (
            {
                "config": {
                    "upstreams": [
                        {
                            "registry": "docker.io",
                            "url": "https://registry-1.docker.io",
                            "username": "mirror",
                            "password_env": "DOCKERHUB_TOKEN",
                        }
                    ]
                }
            },
            "password_env DOCKERHUB_TOKEN is not provided",
        ),
        ({"config": {"auth": {"mode": "token"}}}, "needs a signing key"),
        (
            {
                "config": {"auth": {"mode": "token"}},
                "auth": {"signingKey": {"existingSecret": "gate-key"}},
                "metrics": {"serviceMonitor": {"enabled": True}},
            },
            "set metrics.separatePort: true",
        ),
        ({"tls": {"enabled": True}}, "tls.enabled needs tls.secretName"),
        (
            {"terminationGracePeriodSeconds": 30, "config": {"shutdown_timeout": 25}},
            "terminationGracePeriodSeconds 30 is shorter than",
        ),
        ({"persistence": {"existingClaim": "cache"}}, "existingClaim is for workload.kind"),
        (
            {"existingPolicies": {"configMap": "p", "files": ["dockerhub-mirror.yaml"]}},
            "must be unique",
        ),
    ],
)
def test_chart_refuses_values_the_gate_would_crash_on(
    values: dict[str, Any], complaint: str
) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError) as caught:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    assert complaint in str(caught.value)


def test_notes_tell_how_to_point_clients() -> None:
    notes = render().notes
    url = f"http://{FULLNAME}.{NAMESPACE}.svc:5000"
    for client in ("containerd", "podman", "docker"):
        assert f"registry-gate client-config {client} --url {url}" in notes
    assert "falls back to Docker Hub" in notes
    assert "speaks plain HTTP" in notes


# -- the rendered pod, run for real ---------------------------------------------------


@dataclass
class Pod:
    """A rendered pod laid out on this machine: its volumes, environment and args."""

    config: AtomicDir
    files: dict[str, bytes]
    port: int
    scheme: str
    args: list[str]
    env: dict[str, str]

    def url(self, path: str) -> str:
        return f"{self.scheme.lower()}://127.0.0.1:{self.port}{path}"


def _fake_secrets(tmp_path: Path) -> dict[str, dict[str, bytes]]:
    """Stand-ins for the Secrets the examples reference (`kubectl create secret ...`)."""
    import bcrypt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    htpasswd = b"alice:" + bcrypt.hashpw(b"wonderland", bcrypt.gensalt(rounds=4)) + b"\n"
    cert, tls_key = self_signed_cert(tmp_path)
    return {
        "dockerhub-credentials": {"token": b"dckr_pat_example"},
        "registry-gate-signing-key": {"token.pem": key},
        "registry-gate-htpasswd": {"htpasswd": htpasswd},
        "registry-gate-upload": {"upload-secret": b"0123456789abcdef0123456789abcdef"},
        "registry-gate-tls": {"tls.crt": cert.read_bytes(), "tls.key": tls_key.read_bytes()},
    }


def lay_out_pod(rendered: Rendered, base: Path) -> Pod:
    """Build the pod's config volume, environment and args from the rendered objects,
    with /etc/registry-gate and /var/lib/registry-gate moved under `base`."""
    etc, data = base / "etc", base / "data"
    moves = {CONFIG_DIR: str(etc), DATA_DIR: str(data)}

    def move(text: str) -> str:
        for old, new in moves.items():
            text = text.replace(old, new)
        return text

    secrets = _fake_secrets(base)
    config_maps = {FULLNAME: rendered.config_map["data"]}
    if rendered.values["existingPolicies"]["configMap"]:
        config_maps[rendered.values["existingPolicies"]["configMap"]] = {
            name: (ROOT / "policies" / name).read_text()
            for name in rendered.values["existingPolicies"]["files"]
        }
    files: dict[str, bytes] = {}
    for path, (kind, name, key) in _projected_items(rendered).items():
        if kind == "configMap":
            files[path] = move(config_maps[name][key]).encode()
        else:
            files[path] = secrets[name][key]
    volume = AtomicDir(etc)
    volume.write(files)

    env: dict[str, str] = {}
    for variable in rendered.container["env"]:
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = secrets[ref["name"]][ref["key"]].decode()
    port = free_port()
    # The one override a test needs: the pod's 0.0.0.0:5000 becomes a free loopback port.
    env["REGISTRY_GATE_LISTEN"] = f"127.0.0.1:{port}"
    env["TMPDIR"] = str(base)
    if rendered.values["metrics"]["separatePort"]:
        env["REGISTRY_GATE_METRICS__LISTEN"] = f"127.0.0.1:{free_port()}"
    scheme = rendered.container["readinessProbe"]["httpGet"]["scheme"]
    args = [move(arg) for arg in rendered.container["args"]]
    return Pod(volume, files, port, scheme, args, env)


def _probe_all(rendered: Rendered, pod: Pod) -> None:
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        status, body = http_get(pod.url(rendered.container[probe]["httpGet"]["path"]))
        assert status == 200, f"{probe}: {status} {body!r}"


def _reload_count(pod: Pod, outcome: str) -> float:
    status, body = http_get(pod.url("/metrics"))
    assert status == 200
    match = re.search(
        rf'^registry_gate_policy_reloads_total\{{outcome="{outcome}"\}} ([0-9.e+]+)$',
        body.decode(),
        re.M,
    )
    return float(match.group(1)) if match else 0.0


def _wait_for(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["enterprise", "gate-tls", "monitoring"])
def test_rendered_pod_starts_a_gate_that_answers_its_probes(name: str, tmp_path: Path) -> None:
    rendered = render(SCENARIOS[name])
    pod = lay_out_pod(rendered, tmp_path)
    gate = GateRun(
        pod.args, health_url=pod.url("/healthz"), log_path=tmp_path / "gate.log", env=pod.env
    )
    with gate:
        _probe_all(rendered, pod)
        status, _ = http_get(pod.url("/v2/"))
        expected = 401 if rendered.gate_yaml["auth"]["mode"] == "token" else 200
        assert status == expected, gate.log()
        assert gate.stop() == 0, gate.log()


@pytest.mark.slow
def test_configmap_update_hot_reloads_policy(tmp_path: Path) -> None:
    """Default values: the ConfigMap's policy changes by a kubelet-style symlink swap;
    the gate reloads it without a restart, and refuses a broken one."""
    rendered = render()
    pod = lay_out_pod(rendered, tmp_path)
    gate = GateRun(
        pod.args, health_url=pod.url("/healthz"), log_path=tmp_path / "gate.log", env=pod.env
    )
    with gate:
        _probe_all(rendered, pod)
        assert _reload_count(pod, "success") == 0
        policy_path = "policies/dockerhub-mirror.yaml"
        edited = pod.files[policy_path].replace(b"default: deny", b"default: allow")
        assert edited != pod.files[policy_path]
        pod.config.write({**pod.files, policy_path: edited})
        _wait_for(lambda: _reload_count(pod, "success") >= 1)

        pod.config.write({**pod.files, policy_path: b"rules: [this is not a rule]\n"})
        _wait_for(lambda: _reload_count(pod, "failure") >= 1)
        _probe_all(rendered, pod)  # the old policy stays in force; still ready
        assert gate.stop(signal.SIGTERM) == 0, gate.log()


def _iter_values_files() -> Iterator[Path]:
    yield CHART / "values.yaml"
    yield from sorted((CHART / "ci").glob("*-values.yaml"))


def test_values_files_are_documented_yaml() -> None:
    for path in _iter_values_files():
        text = path.read_text()
        assert text.startswith("#"), f"{path.name} starts without a comment saying what it is"
        assert isinstance(yaml.safe_load(text), dict)
