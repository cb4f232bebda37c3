"""What an operator and an auditor see of a real gate: /metrics, the audit log, health.

One gate per module fronts hub (docker.io), corp (registry.corp.example) and quay
(quay.io) with ``policies/enterprise.yaml`` as shipped (read in place: nothing here edits
it). ``/metrics`` is read with prometheus-client's own parser (``tests/support/metrics``)
and tests compare scrapes taken before and after what they do, so they do not depend on
each other's traffic. Audit records are found by what a test alone pulls (skopeo pulls
``library/busybox``; the metrics tests ``library/alpine``), and ``registry-gate audit
verify`` runs as the auditor would run it. The rotation test restarts the gate (counters
start again from zero; nothing compares across it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import run_cli
from tests.support.gate import PROJECT_ROOT, GateProcess, standard_upstreams
from tests.support.metrics import Scrape, scrape
from tests.support.registry_client import MANIFEST_ACCEPT
from tests.support.upstreams import Upstreams
from tests.support.wire import Reply, request

ENTERPRISE = PROJECT_ROOT / "policies" / "enterprise.yaml"
CORP = "registry.corp.example"
ACCEPT_LINES: list[tuple[str, str]] = [("Accept", mt) for mt in MANIFEST_ACCEPT]
DOCKER_UA = (
    "docker/20.10.24 go/go1.19.8 git-commit/5d6db84 kernel/6.1.0 os/linux arch/amd64 "
    "UpstreamClient(Docker-Client/20.10.24 \\(linux\\))"
)
# Every name and tag a test here asks for: none may appear in a metric label value.
REQUESTED = ("alpine", "busybox", "team/app", "someone", "mysql", "dba/", "gate/origin", "nosuch")
ROUTES = ("v2", "manifest", "blob", "upload_start", "upload", "tags", "referrers", "unknown")
ROUTES += ("token", "metrics", "healthz", "readyz", "other")
HEX_RUN = re.compile(r"[0-9a-f]{12,}")


@pytest.fixture(scope="module")
def gate(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GateProcess]:
    config = {
        "upstreams": standard_upstreams(upstreams),
        "push_registry": CORP,
        # No authentication: every client is anonymous, so let anyone pin.
        "policy": {"files": [str(ENTERPRISE)], "pin_creators": "anyone"},
    }
    process = GateProcess(tmp_path_factory.mktemp("observed"), config, name="observed")
    with process:
        yield process


def audit_path(gate: GateProcess) -> Path:
    return Path(gate.config["audit"]["path"])


def get(gate: GateProcess, path: str, headers: list[tuple[str, str]] | None = None) -> Reply:
    return request(gate.url, "GET", path, headers or [])


def pull(gate: GateProcess, name: str, ref: str) -> list[Reply]:
    """A client's pull over the wire: manifest, the amd64 child of an index, config and
    layers. Returns every reply (all 200, or the test fails)."""
    replies = [get(gate, f"/v2/{name}/manifests/{ref}", ACCEPT_LINES)]
    assert replies[-1].status == 200, replies[-1]
    document = replies[-1].json()
    if "manifests" in document:
        child = next(m for m in document["manifests"] if m["platform"]["architecture"] == "amd64")
        replies.append(get(gate, f"/v2/{name}/manifests/{child['digest']}", ACCEPT_LINES))
        assert replies[-1].status == 200, replies[-1]
        document = replies[-1].json()
    for blob in [document["config"], *document["layers"]]:
        replies.append(get(gate, f"/v2/{name}/blobs/{blob['digest']}"))
        assert replies[-1].status == 200, replies[-1]
    return replies


def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def settled_scrape(gate: GateProcess, before: Scrape, requests: int) -> Scrape:
    """A scrape once `requests` more client requests were counted. The gate counts a
    request after its handler returns, which for a streamed blob can be a moment after
    the client has read the last byte."""
    deadline = time.monotonic() + 5
    while True:
        after = scrape(gate.url)
        counted = sum(
            moved(before, after, "registry_gate_requests_total", route=route)
            for route in ("manifest", "blob")
        )
        if counted >= requests or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def audit_records(gate: GateProcess, *files: Path) -> list[dict[str, Any]]:
    paths = files or (audit_path(gate),)
    records = []
    for path in paths:
        if path.exists():
            records += [json.loads(line) for line in path.read_text().splitlines() if line]
    return records


def wait_for_records(
    gate: GateProcess, accept: Callable[[dict[str, Any]], bool], count: int = 1
) -> list[dict[str, Any]]:
    """The audit records ``accept`` picks, once there are ``count`` (written by a thread)."""
    deadline = time.monotonic() + 10
    while True:
        found = [r for r in audit_records(gate) if accept(r)]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) >= count, f"{len(found)} of {count} records: {found}"
            return found
        time.sleep(0.05)


# -- health -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_endpoints_answer_200(gate: GateProcess, path: str) -> None:
    reply = get(gate, path)
    assert reply.status == 200, reply
    assert reply.json()["status"] in ("ok", "ready")
    assert reply.header("X-Request-Id")


# -- metrics ------------------------------------------------------------------------------


def test_a_pull_misses_then_hits_and_counts_requests_by_route(
    gate: GateProcess, upstreams: Upstreams
) -> None:
    pushed = upstreams.hub["library/alpine:3.19"]
    child = pushed.manifest.child("amd64")
    blobs = len(child.blobs)
    name = "docker.io/library/alpine"

    before = scrape(gate.url)
    first = pull(gate, name, "3.19")
    cold = settled_scrape(gate, before, len(first))
    second = pull(gate, name, "3.19")
    warm = settled_scrape(gate, cold, len(second))
    assert [r.body for r in first] == [r.body for r in second]

    requests = "registry_gate_requests_total"
    for route, count in (("manifest", 2), ("blob", blobs)):
        ok = {"route": route, "method": "GET", "status": "200"}
        assert moved(before, cold, requests, **ok) == count, route
        assert moved(cold, warm, requests, **ok) == count, route
    assert cold.value("registry_gate_request_duration_seconds_count", route="blob") > 0

    # Cold: every blob and both manifests missed, and were fetched from docker.io.
    misses, hits = "registry_gate_cache_misses_total", "registry_gate_cache_hits_total"
    assert moved(before, cold, misses, kind="blob") == blobs
    assert moved(before, cold, misses) >= blobs + 1
    assert moved(before, cold, hits, kind="blob") == 0
    upstream = "registry_gate_upstream_requests_total"
    assert moved(before, cold, upstream, upstream="docker.io") >= blobs + 2
    assert moved(before, cold, upstream, upstream="docker.io", status="200") >= blobs + 2
    assert cold.value("registry_gate_upstream_request_duration_seconds_count", upstream="docker.io")
    served = "registry_gate_served_bytes_total"
    assert moved(before, cold, served, source="upstream") >= sum(b.size for b in child.blobs)

    # Warm: the same pull is all hits, and docker.io is not asked again.
    assert moved(cold, warm, hits, kind="blob") == blobs
    assert moved(cold, warm, hits) >= blobs + 2
    assert moved(cold, warm, misses) == 0
    assert moved(cold, warm, upstream, upstream="docker.io") == 0
    assert moved(cold, warm, served, source="cache") >= sum(b.size for b in child.blobs)
    assert warm.value("registry_gate_cache_bytes") >= sum(b.size for b in child.blobs)


def test_denials_are_counted_by_action_decision_and_rule(gate: GateProcess) -> None:
    decisions, docker = (
        "registry_gate_policy_decisions_total",
        "registry_gate_denials_to_docker_clients_total",
    )
    before = scrape(gate.url)
    # What a Docker daemon with this gate as registry-mirror sends for `docker pull alpine`.
    reply = get(
        gate, "/v2/library/alpine/manifests/latest", [*ACCEPT_LINES, ("User-Agent", DOCKER_UA)]
    )
    assert reply.status == 403, reply
    after_docker = scrape(gate.url)
    latest = {"action": "pull", "decision": "deny", "rule": "hub-official-images"}
    assert moved(before, after_docker, decisions, **latest) == 1
    assert moved(before, after_docker, docker, action="pull") == 1

    # skopeo / containerd are not Docker daemons: denied, but not counted as such.
    skopeo_ua = [("User-Agent", "skopeo/1.13.3")]
    reply = get(gate, "/v2/docker.io/someone/else/manifests/1", [*ACCEPT_LINES, *skopeo_ua])
    assert reply.status == 403, reply
    after = scrape(gate.url)
    by_default = {"action": "pull", "decision": "deny", "rule": "default"}
    assert moved(after_docker, after, decisions, **by_default) == 1
    assert moved(after_docker, after, docker) == 0
    assert moved(before, after, "registry_gate_requests_total", route="manifest", status="403") == 2

    # Allowed pulls are counted by their rule too.
    assert get(gate, f"/v2/{CORP}/team/app/manifests/1", ACCEPT_LINES).status == 200
    allowed = scrape(gate.url)
    corp = {"action": "pull", "decision": "allow", "rule": "corp-internal"}
    assert moved(after, allowed, decisions, **corp) == 1


def test_short_name_resolutions_are_counted_by_outcome(gate: GateProcess) -> None:
    name = "registry_gate_shortname_resolutions_total"
    before = scrape(gate.url)
    assert get(gate, "/v2/team/app/manifests/1", ACCEPT_LINES).status == 200  # search/pin
    assert get(gate, "/v2/team/app/manifests/1", ACCEPT_LINES).status == 200  # pin
    assert get(gate, "/v2/mysql/manifests/8.0", ACCEPT_LINES).status == 404  # alias
    assert get(gate, "/v2/nosuch/thing/manifests/1", ACCEPT_LINES).status == 404
    after = scrape(gate.url)
    assert moved(before, after, name, outcome="pin") >= 1
    assert (
        moved(before, after, name, outcome="search") + moved(before, after, name, outcome="pin")
        == 2
    )
    assert moved(before, after, name, outcome="alias") == 1
    assert moved(before, after, name, outcome="not_found") == 1
    assert after.label_values(name, "outcome") <= {
        "alias",
        "pin",
        "search",
        "denied",
        "not_found",
        "error",
    }


def test_metric_labels_are_bounded(gate: GateProcess, upstreams: Upstreams) -> None:
    """After pulls by tag and digest of several repositories, allowed and denied, no
    label value is a repository, a tag or a digest."""
    digest = upstreams.hub["library/busybox:1.36"].digest
    get(gate, f"/v2/docker.io/library/busybox/manifests/{digest}", ACCEPT_LINES)
    get(gate, "/v2/alpine/manifests/3.19", ACCEPT_LINES)
    get(gate, "/v2/docker.io/someone/else/blobs/sha256:" + "0" * 64)
    get(gate, "/v2/quay.io/gate/origin/tags/list")
    current = scrape(gate.url)
    values = {(s.name, k, v) for s in current.gate_samples() for k, v in s.labels.items()}
    assert values, current.text
    for name, label, value in values:
        assert not HEX_RUN.search(value), (name, label, value)
        assert "sha256" not in value and "/" not in value, (name, label, value)
        for requested in REQUESTED:
            assert requested not in value, (name, label, value)
    # Routes are the gate's endpoint names (middleware.route_label), never a path.
    assert current.label_values("registry_gate_requests_total", "route") <= set(ROUTES)
    assert {"manifest", "blob", "tags", "metrics"} <= current.label_values(
        "registry_gate_requests_total", "route"
    )
    assert current.label_values("registry_gate_upstream_requests_total", "upstream") <= {
        "docker.io",
        "quay.io",
        CORP,
    }


# -- audit ----------------------------------------------------------------------------------


def skopeo(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """skopeo reading only an empty registries.conf (no host mirrors or aliases)."""
    conf = tmp / "registries.conf"
    conf.write_text('unqualified-search-registries = []\nshort-name-mode = "enforcing"\n')
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HOME=str(tmp), CONTAINERS_REGISTRIES_CONF=str(conf))
    return subprocess.run(
        ["skopeo", "--insecure-policy", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_skopeo_pull_and_a_denial_are_audited(
    gate: GateProcess, upstreams: Upstreams, tmp_path: Path
) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    pushed = upstreams.hub["library/busybox:1.36"]
    copied = skopeo(
        tmp_path,
        "copy",
        "--src-tls-verify=false",
        f"docker://{gate.host}/docker.io/library/busybox:1.36",
        f"dir:{tmp_path / 'busybox'}",
    )
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "busybox" / "manifest.json").read_bytes() == pushed.raw

    (record, *_) = wait_for_records(
        gate,
        lambda r: r["event"] == "manifest_pull" and r["name"] == "docker.io/library/busybox:1.36",
    )
    assert record["action"] == "pull"
    assert record["principal"] == {"user": None, "groups": []}
    assert record["resolved"] == "docker.io/library/busybox:1.36"
    assert record["digest"] == pushed.digest
    assert (record["decision"], record["rule"]) == ("allow", "hub-official-images")
    assert (record["upstream"], record["status"]) == ("docker.io", 200)
    assert record["client"] == "127.0.0.1" and record["request_id"]
    assert record["bytes"] == len(pushed.raw)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])

    # A short name through a real client: resolved corp-first, with its resolution path.
    corp_app = upstreams.corp["team/app:1"]
    copied = skopeo(
        tmp_path,
        "copy",
        "--src-tls-verify=false",
        f"docker://{gate.host}/team/app:1",
        f"dir:{tmp_path / 'app'}",
    )
    assert copied.returncode == 0, copied.stderr
    (short, *_) = wait_for_records(
        gate, lambda r: r["event"] == "manifest_pull" and r["name"] == "team/app:1"
    )
    assert (short["resolved"], short["upstream"]) == (f"{CORP}/team/app:1", CORP)
    assert (short["digest"], short["rule"]) == (corp_app.digest, "corp-internal")
    resolution = short["extra"]["resolution"]
    assert resolution["reason"] in ("search", "pin")

    # A denial: skopeo fails, the record says who, what, and which rule.
    denied = skopeo(
        tmp_path,
        "inspect",
        "--tls-verify=false",
        "--raw",
        f"docker://{gate.host}/docker.io/library/busybox:latest",
    )
    assert denied.returncode != 0
    (refusal, *_) = wait_for_records(
        gate,
        lambda r: (
            r["event"] == "denial"
            and r["name"] == "docker.io/library/busybox"
            and "busybox:latest" in r["reason"]
        ),
    )
    assert (refusal["action"], refusal["decision"], refusal["status"]) == ("pull", "deny", 403)
    assert refusal["rule"] == "hub-official-images"
    # The refused reference, tag included, is the resolved field.
    assert refusal["resolved"] == "docker.io/library/busybox:latest"
    assert "hub-official-images" in refusal["reason"]
    assert refusal["principal"] == {"user": None, "groups": []}


def tampered_copies(source: Path, directory: Path) -> dict[str, Path]:
    """Copies of a verified audit file with line 2 edited, line 2 deleted, and lines 2
    and 3 swapped."""
    lines = source.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 4, f"{source} has {len(lines)} lines"
    record = json.loads(lines[1])
    edited_record = dict(record, client="10.9.9.9")
    edited = json.dumps(edited_record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    variants = {
        "edited": [lines[0], edited, *lines[2:]],
        "deleted": [lines[0], *lines[2:]],
        "swapped": [lines[0], lines[2], lines[1], *lines[3:]],
    }
    paths = {}
    for kind, content in variants.items():
        path = directory / f"audit-{kind}.jsonl"
        path.write_bytes(b"".join(content))
        paths[kind] = path
    return paths


def test_audit_verify_passes_and_names_the_tampered_line(gate: GateProcess, tmp_path: Path) -> None:
    for _ in range(2):  # a few records of its own, whatever ran before
        get(gate, f"/v2/{CORP}/team/app/manifests/1", ACCEPT_LINES)
        get(gate, "/v2/docker.io/library/alpine/manifests/latest", ACCEPT_LINES)
    wait_for_records(gate, lambda r: True, count=4)
    # A consistent snapshot: whole lines only (the writer may be appending).
    snapshot = tmp_path / "audit.jsonl"
    data = audit_path(gate).read_bytes()
    snapshot.write_bytes(data[: data.rindex(b"\n") + 1])
    copies = tampered_copies(snapshot, tmp_path)

    live, edited, deleted, swapped = run_cli(
        ["audit", "verify", str(audit_path(gate))],
        *(["audit", "verify", str(copies[kind])] for kind in ("edited", "deleted", "swapped")),
    )
    assert live.returncode == 0, live.stdout + live.stderr
    assert live.stdout.startswith("OK: ") or "\nOK: " in live.stdout, live.stdout
    for kind, result in (("edited", edited), ("deleted", deleted), ("swapped", swapped)):
        assert result.returncode != 0, (kind, result.stdout)
        assert f"FAILED: {copies[kind]}:2: " in result.stdout, (kind, result.stdout)
    assert "edited" in edited.stdout
    assert "deleted" in deleted.stdout or "missing" in deleted.stdout
    assert "reordered" in swapped.stdout


def test_the_chain_continues_across_rotation(gate: GateProcess) -> None:
    """Operator rotation: stop, rename, start again. The new file's first record links
    to the old file's last one; verified together, oldest first, they pass."""
    assert get(gate, f"/v2/{CORP}/gate/origin/manifests/latest", ACCEPT_LINES).status == 200
    wait_for_records(gate, lambda r: r["name"] == f"{CORP}/gate/origin:latest")
    current = audit_path(gate)
    rotated = current.with_name(current.name + ".1")
    gate.stop()
    current.rename(rotated)
    gate.start()
    assert get(gate, f"/v2/{CORP}/gate/origin/manifests/latest", ACCEPT_LINES).status == 200
    (first, *_) = wait_for_records(gate, lambda r: True)
    last = json.loads(rotated.read_bytes().splitlines()[-1])
    assert (first["prev"], first["seq"]) == (last["hash"], last["seq"] + 1)

    together, backwards, alone = run_cli(
        ["audit", "verify", str(rotated), str(current)],
        ["audit", "verify", str(current), str(rotated)],
        ["audit", "verify", str(current)],
    )
    assert together.returncode == 0, together.stdout + together.stderr
    assert "OK: " in together.stdout and "2 files" in together.stdout
    assert backwards.returncode != 0, backwards.stdout
    # Alone, the new file says where its chain comes from instead of passing silently.
    assert alone.returncode != 0 and f"{current}:1" in alone.stdout, alone.stdout
