"""The enterprise perimeter of design §11, enforced by a real gate against real upstreams.

The policy is ``policies/enterprise.yaml`` exactly as the repository ships it (copied
into each gate's directory, so a test can edit its copy), with docker.io -> hub,
quay.io -> quay and registry.corp.example -> corp. hub and corp both serve
``library/alpine:3.19`` and ``team/app:1`` with different content; the ``gate.origin``
label of the config blob says which one a pull came from.

Gates (started together, in parallel, once per module):

- ``enterprise``: the policy as shipped, plus a registries.conf blocking
  ``docker.io/library/busybox``; read-only tests share it.
- ``mutable``: the policy as shipped; tests rewrite its copy and reload (file watch,
  SIGHUP), restart it, remove pins. Each test writes the policy it starts from.
- ``corp_down``: registry.corp.example points at a closed port.
- ``auth``: token auth with an htpasswd (bcrypt) and ``groups: {platform: [alice]}``;
  ``policy.pin_creators`` is the default (authenticated principals only).

The gates without authentication set ``policy.pin_creators: anyone`` (every client is
anonymous there, and the default would create no pin at all).

Corp holds ``library/alpine``, not ``alpine``: the short name ``alpine`` means
``registry.corp.example/alpine`` there (absent, a 404 that falls through to Docker Hub),
so "internal images resolve first" is shown with ``team/app``, which both hold.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.cli import run_cli
from tests.support.gate import PROJECT_ROOT, GateProcess, standard_upstreams
from tests.support.images import ORIGIN_LABEL
from tests.support.metrics import scrape, wait_for_value
from tests.support.registries import free_port
from tests.support.registry_client import MANIFEST_ACCEPT
from tests.support.upstreams import Upstreams
from tests.support.wire import HeaderLines, Reply, request

ENTERPRISE = PROJECT_ROOT / "policies" / "enterprise.yaml"
POLICY_NAME = "enterprise.yaml"
SHIPPED_SEARCH = "search: [registry.corp.example, docker.io]"
SHIPPED_MODE = "short_name_mode: permissive"
CORP = "registry.corp.example"
Headers = Sequence[tuple[str, str]]
ACCEPT_LINES: list[tuple[str, str]] = [("Accept", mt) for mt in MANIFEST_ACCEPT]
# containers/image (and so the gate) wants `location` with a non-wildcard prefix.
BLOCK_BUSYBOX = """
[[registry]]
prefix = "docker.io/library/busybox"
location = "docker.io/library/busybox"
blocked = true
"""
RELOADS = "registry_gate_policy_reloads_total"
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret"}


def shipped_policy(*, search: str = SHIPPED_SEARCH, mode: str = SHIPPED_MODE) -> str:
    """``policies/enterprise.yaml`` as shipped, with its search list or mode replaced."""
    text = ENTERPRISE.read_text()
    assert text.count(SHIPPED_SEARCH) == 1 and text.count(SHIPPED_MODE) == 1, (
        "policies/enterprise.yaml changed: update this test's expectations"
    )
    return text.replace(SHIPPED_SEARCH, search).replace(SHIPPED_MODE, mode)


def enterprise_gate(
    directory: Path,
    upstream_table: list[dict[str, Any]],
    *,
    name: str,
    extra: dict[str, Any] | None = None,
) -> GateProcess:
    """A (not yet started) gate whose only policy file is a copy of enterprise.yaml."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / POLICY_NAME
    policy.write_text(shipped_policy())
    extra = dict(extra or {})
    policy_section = {"files": [str(policy)], **extra.pop("policy", {})}
    if "auth" not in extra:
        policy_section["pin_creators"] = "anyone"
    config: dict[str, Any] = {
        "upstreams": upstream_table,
        "push_registry": CORP,
        "policy": policy_section,
        **extra,
    }
    return GateProcess(directory, config, name=name)


def auth_files(directory: Path) -> dict[str, Any]:
    """htpasswd (bcrypt, cost 4: fast) and an EC signing key; the ``auth`` section."""
    directory.mkdir(parents=True, exist_ok=True)
    htpasswd = directory / "htpasswd"
    htpasswd.write_text(
        "".join(
            f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
            for user, pw in PASSWORDS.items()
        )
    )
    key = directory / "token.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {
        "mode": "token",
        "htpasswd": str(htpasswd),
        "signing_key": str(key),
        "groups": {"platform": ["alice"]},
    }


@dataclass
class Gates:
    enterprise: GateProcess
    mutable: GateProcess
    corp_down: GateProcess
    auth: GateProcess


@pytest.fixture(scope="module")
def gates(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gates]:
    root = tmp_path_factory.mktemp("enterprise")
    table = standard_upstreams(upstreams)
    conf = root / "registries.conf"
    conf.write_text(BLOCK_BUSYBOX)
    corp_down_table = [
        dict(u, url=f"http://127.0.0.1:{free_port()}") if u["registry"] == CORP else u
        for u in table
    ]
    made = Gates(
        enterprise=enterprise_gate(
            root / "enterprise",
            table,
            name="enterprise",
            extra={"policy": {"registries_conf": str(conf)}},
        ),
        mutable=enterprise_gate(root / "mutable", table, name="mutable"),
        corp_down=enterprise_gate(root / "corp-down", corp_down_table, name="corp-down"),
        auth=enterprise_gate(
            root / "auth", table, name="auth", extra={"auth": auth_files(root / "auth-files")}
        ),
    )
    processes = list(vars(made).values())
    with ExitStack() as stack:
        for process in processes:
            stack.callback(process.stop)
        # Each start is mostly a Python interpreter importing the gate: do them at once.
        with ThreadPoolExecutor(len(processes)) as pool:
            list(pool.map(GateProcess.start, processes))
        yield made


# -- helpers ------------------------------------------------------------------------------


def get(gate: GateProcess, path: str, headers: HeaderLines = (), method: str = "GET") -> Reply:
    return request(gate.url, method, path, headers)


def manifest(gate: GateProcess, name: str, ref: str, headers: Headers = ()) -> Reply:
    return get(gate, f"/v2/{name}/manifests/{ref}", [*ACCEPT_LINES, *headers])


def origin(gate: GateProcess, name: str, ref: str, headers: Headers = ()) -> str:
    """Pull ``name:ref`` through the gate (manifest, amd64 child of an index, config) and
    return the config's ``gate.origin`` label: which upstream served it."""
    reply = manifest(gate, name, ref, headers)
    assert reply.status == 200, reply
    document = reply.json()
    if "manifests" in document:
        child = next(m for m in document["manifests"] if m["platform"]["architecture"] == "amd64")
        reply = manifest(gate, name, child["digest"], headers)
        assert reply.status == 200, reply
        document = reply.json()
    config = get(gate, f"/v2/{name}/blobs/{document['config']['digest']}", headers)
    assert config.status == 200, config
    return str(json.loads(config.body)["config"]["Labels"][ORIGIN_LABEL])


def assert_denied(reply: Reply, *fragments: str) -> str:
    """403 DENIED whose message holds every fragment; returns the message."""
    assert reply.status == 403, reply
    assert reply.error_codes == ["DENIED"], reply
    message = reply.error_messages[0]
    for fragment in fragments:
        assert fragment in message, message
    return message


def explain(gate: GateProcess, **query: str | list[str]) -> dict[str, Any]:
    """``GET /policy/explain`` with ``query`` (a list value repeats the parameter)."""
    pairs = [(k, v) for k, vs in query.items() for v in ([vs] if isinstance(vs, str) else vs)]
    reply = get(gate, "/policy/explain?" + "&".join(f"{k}={v}" for k, v in pairs))
    assert reply.status == 200, reply
    result: dict[str, Any] = reply.json()
    return result


def pinned_file(gate: GateProcess) -> dict[str, Any]:
    """The pins the gate persisted (``<storage.path>/pins.json``), name -> entry."""
    path = Path(gate.config["storage"]["path"]) / "pins.json"
    if not path.exists():
        return {}
    pins: dict[str, Any] = json.loads(path.read_text())["pins"]
    return pins


def rewrite_policy(gate: GateProcess, text: str, *, sighup: bool) -> None:
    """Replace the gate's policy file and wait until it reloaded it successfully (by
    SIGHUP, or by noticing the change itself: it polls every 2 s)."""
    before = scrape(gate.url).value(RELOADS, outcome="success")
    path = gate.directory / POLICY_NAME
    path.write_text(text)
    if sighup:
        assert gate.pid is not None
        os.kill(gate.pid, signal.SIGHUP)
    wait_for_value(gate.url, RELOADS, lambda v: v > before, outcome="success")


def upstream_requests(gate: GateProcess, registry: str) -> float:
    return scrape(gate.url).value("registry_gate_upstream_requests_total", upstream=registry)


# -- Docker Hub: official images only, never :latest -------------------------------------------


def test_official_hub_images_pull_by_tag_and_digest(gates: Gates, upstreams: Upstreams) -> None:
    gate = gates.enterprise
    pushed = upstreams.hub["library/alpine:3.19"]
    by_tag = manifest(gate, "docker.io/library/alpine", "3.19")
    assert by_tag.status == 200, by_tag
    assert by_tag.body == pushed.raw
    by_digest = manifest(gate, "docker.io/library/alpine", pushed.digest)
    assert by_digest.status == 200, by_digest
    assert by_digest.body == pushed.raw
    assert origin(gate, "docker.io/library/alpine", "3.19") == "hub"
    # index.docker.io and the ?ns= form are the same repository to policy.
    reply = manifest(gate, "library/alpine", "3.19?ns=index.docker.io")
    assert reply.status == 200, reply
    # `latest` names the same index, and a pull by its digest is allowed: only the tag
    # is refused.
    assert upstreams.hub["library/alpine:latest"].digest == pushed.digest


@pytest.mark.parametrize(
    "path",
    [
        "/v2/docker.io/library/alpine/manifests/latest",
        "/v2/library/alpine/manifests/latest?ns=docker.io",
        "/v2/index.docker.io/library/alpine/manifests/latest",
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_latest_of_an_official_image_is_refused_naming_the_rule(
    gates: Gates, path: str, method: str
) -> None:
    reply = get(gates.enterprise, path, ACCEPT_LINES, method=method)
    assert reply.status == 403, reply
    if method == "GET":
        assert_denied(reply, "hub-official-images", "docker.io/library/alpine:latest", "latest")


def test_unknown_public_repositories_are_refused_by_the_default(gates: Gates) -> None:
    gate = gates.enterprise
    before = upstream_requests(gate, "docker.io")
    message = assert_denied(
        manifest(gate, "docker.io/someone/else", "1.0"), "docker.io/someone/else:1.0"
    )
    assert "policy default: deny" in message
    # Decided before anything is asked upstream (hub has no someone/else: 404 otherwise).
    assert upstream_requests(gate, "docker.io") == before
    # hub serves team/app:1, but it is no official image.
    assert_denied(manifest(gate, "docker.io/team/app", "1"), "policy default: deny")
    # quay-coreos applies to the platform group only: anonymous falls to the default.
    assert_denied(manifest(gate, "quay.io/coreos/etcd", "v3.5.0"), "policy default: deny")


def test_pushes_to_public_registries_are_refused(gates: Gates) -> None:
    reply = get(gates.enterprise, "/v2/docker.io/library/alpine/blobs/uploads/", method="POST")
    assert_denied(reply, "no-public-push", "docker.io/library/alpine")


# -- short names ----------------------------------------------------------------------------


def test_a_short_name_resolves_to_the_internal_registry_first_and_is_pinned(
    gates: Gates, upstreams: Upstreams
) -> None:
    gate = gates.enterprise
    before = scrape(gate.url)
    assert origin(gate, "team/app", "1") == "corp"
    reply = manifest(gate, "team/app", "1")
    assert reply.body == upstreams.corp["team/app:1"].raw
    result = explain(gate, action="pull", reference="team/app:1")
    assert result["reason"] == "pin" and result["resolved"] == f"{CORP}/team/app"
    assert pinned_file(gate)["team/app"]["repository"] == f"{CORP}/team/app"
    # (`policy pins list` shows it: test_policy_explain_command_works_without_any_upstream)
    after = scrape(gate.url)
    name = "registry_gate_shortname_resolutions_total"
    moved = {
        outcome: after.value(name, outcome=outcome) - before.value(name, outcome=outcome)
        for outcome in ("search", "pin")
    }
    # Resolved once by the search list; the manifest request after it followed the pin.
    assert moved["search"] <= 1 and moved["search"] + moved["pin"] >= 2, moved


def test_a_short_name_absent_internally_falls_through_to_hub_and_is_pinned(
    gates: Gates, upstreams: Upstreams
) -> None:
    """registry.corp.example/alpine answers 404 (corp has library/alpine, which is not
    what the short name means there), so Docker Hub's official image wins, and is pinned;
    a Docker daemon mirror request (``library/alpine``) is the same short name."""
    gate = gates.enterprise
    assert origin(gate, "alpine", "3.19") == "hub"
    assert origin(gate, "library/alpine", "3.19") == "hub"
    reply = manifest(gate, "alpine", "3.19")
    assert reply.body == upstreams.hub["library/alpine:3.19"].raw
    result = explain(gate, action="pull", reference="alpine:3.19")
    assert result["reason"] == "pin" and result["resolved"] == "docker.io/library/alpine"
    # The pin leads to an official image, whose :latest stays refused.
    assert_denied(manifest(gate, "alpine", "latest"), "hub-official-images")


def test_the_mysql_alias_is_the_only_candidate(gates: Gates) -> None:
    """``mysql`` means registry.corp.example/dba/mysql, whatever the search list says;
    corp has no such image, so the answer is corp's 404, and Docker Hub is never asked."""
    gate = gates.enterprise
    before = scrape(gate.url)
    reply = manifest(gate, "mysql", "8.0")
    assert reply.status == 404, reply
    assert reply.error_codes[0] in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN"), reply
    after = scrape(gate.url)
    hub = "registry_gate_upstream_requests_total"
    assert after.value(hub, upstream="docker.io") == before.value(hub, upstream="docker.io")
    assert after.value(hub, upstream=CORP) > before.value(hub, upstream=CORP)
    name = "registry_gate_shortname_resolutions_total"
    assert after.value(name, outcome="alias") == before.value(name, outcome="alias") + 1
    result = explain(gate, action="pull", reference="mysql:8.0")
    assert result["reason"] == "alias"
    assert result["resolved"] == f"{CORP}/dba/mysql"
    assert result["decision"]["rule"]["name"] == "corp-internal"


def test_a_registries_conf_block_denies(gates: Gates) -> None:
    gate = gates.enterprise
    message = assert_denied(
        manifest(gate, "docker.io/library/busybox", "1.36"), "docker.io/library/busybox"
    )
    assert "registries.conf" in message and "blocks" in message
    # Its tag list too; the official alpine next to it is unaffected.
    assert get(gate, "/v2/docker.io/library/busybox/tags/list").status == 403
    assert manifest(gate, "docker.io/library/alpine", "3.19").status == 200


# -- resolution failures ------------------------------------------------------------------


def test_a_down_first_search_registry_fails_the_request(gates: Gates) -> None:
    """Corp is down: a short name must not fall through to Docker Hub (squatting)."""
    gate = gates.corp_down
    before = scrape(gate.url)
    for name, ref in (("team/app", "1"), ("alpine", "3.19")):
        reply = manifest(gate, name, ref)
        assert reply.status == 502, reply
        assert CORP in reply.body.decode(), reply
    after = scrape(gate.url)
    assert after.value("registry_gate_upstream_requests_total", upstream="docker.io") == 0
    assert after.value("registry_gate_upstream_requests_total", upstream=CORP, status="error") >= 2
    resolutions = "registry_gate_shortname_resolutions_total"
    assert (
        after.value(resolutions, outcome="error") - before.value(resolutions, outcome="error") == 2
    )
    assert pinned_file(gate) == {}
    # Fully-qualified Docker Hub pulls do not depend on corp.
    assert manifest(gate, "docker.io/library/alpine", "3.19").status == 200


# -- policy edits: pins hold, invalid edits are refused, enforcing mode -----------------------


def test_a_pin_holds_after_the_search_list_changes_and_a_restart(gates: Gates) -> None:
    gate = gates.mutable
    rewrite_policy(gate, shipped_policy(), sighup=True)
    assert origin(gate, "team/app", "1") == "corp"
    assert explain(gate, action="pull", reference="team/app:1")["reason"] == "pin"

    # Docker Hub first now; the watcher notices the edit by itself (no SIGHUP).
    rewrite_policy(gate, shipped_policy(search=f"search: [docker.io, {CORP}]"), sighup=False)
    assert f"search ['docker.io', '{CORP}']" in gate.log_text()
    fresh = explain(gate, action="pull", reference="gate/origin:latest")
    assert [c["repository"] for c in fresh["candidates"]] == [
        "docker.io/gate/origin",
        f"{CORP}/gate/origin",
    ]
    assert origin(gate, "team/app", "1") == "corp"

    gate.restart()
    assert origin(gate, "team/app", "1") == "corp"
    result = explain(gate, action="pull", reference="team/app:1")
    assert result["reason"] == "pin" and result["resolved"] == f"{CORP}/team/app"

    # The operator removes the pin: the new search order applies, and Docker Hub's
    # team/app is no official image.
    (removed,) = run_cli(
        ["policy", "pins", "remove", "team/app", "--config", str(gate.config_path)]
    )
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert_denied(manifest(gate, "team/app", "1"), "docker.io/team/app", "policy default: deny")


def test_an_invalid_policy_edit_is_refused_and_the_old_policy_stays(gates: Gates) -> None:
    gate = gates.mutable
    rewrite_policy(gate, shipped_policy(), sighup=True)
    before = scrape(gate.url)
    fingerprint = explain(gate, action="pull", reference="docker.io/library/alpine:3.19")
    log_offset = len(gate.log_text())

    broken = shipped_policy(mode="short_name_mode: sometimes")
    (gate.directory / POLICY_NAME).write_text(broken)
    assert gate.pid is not None
    os.kill(gate.pid, signal.SIGHUP)
    wait_for_value(
        gate.url, RELOADS, lambda v: v > before.value(RELOADS, outcome="failure"), outcome="failure"
    )
    after = scrape(gate.url)
    assert after.value(RELOADS, outcome="success") == before.value(RELOADS, outcome="success")
    log = gate.log_text()[log_offset:]
    refused = [line for line in log.splitlines() if "policy reload refused" in line]
    assert refused, log
    assert POLICY_NAME in refused[0] and "short_name_mode" in refused[0], refused[0]

    # The previous policy is in force: same fingerprint, same decisions.
    still = explain(gate, action="pull", reference="docker.io/library/alpine:3.19")
    assert still["policy"] == fingerprint["policy"]
    assert manifest(gate, "docker.io/library/alpine", "3.19").status == 200
    assert_denied(manifest(gate, "docker.io/library/alpine", "latest"), "hub-official-images")

    rewrite_policy(gate, shipped_policy(), sighup=True)


def test_enforcing_mode_refuses_an_ambiguous_short_name(gates: Gates) -> None:
    gate = gates.mutable
    rewrite_policy(gate, shipped_policy(mode="short_name_mode: enforcing"), sighup=True)
    try:
        before = scrape(gate.url)
        message = assert_denied(
            manifest(gate, "team/app", "1"), f"{CORP}/team/app", "docker.io/team/app"
        )
        assert "ambiguous" in message and "alias" in message
        resolutions = "registry_gate_shortname_resolutions_total"
        denied = scrape(gate.url).value(resolutions, outcome="denied")
        assert denied == before.value(resolutions, outcome="denied") + 1
        # An alias is unambiguous: resolved (to corp's 404), not refused.
        reply = manifest(gate, "mysql", "8.0")
        assert reply.status == 404, reply
    finally:
        rewrite_policy(gate, shipped_policy(), sighup=True)


# -- authentication: quay-coreos for the platform group -----------------------------------------


def token(gate: GateProcess, user: str | None, scope: str) -> str:
    headers = {}
    if user is not None:
        basic = base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
        headers["Authorization"] = f"Basic {basic}"
    reply = get(gate, f"/token?service=registry-gate&scope={scope}", headers)
    assert reply.status == 200, reply
    return str(reply.json()["token"])


def test_quay_coreos_is_for_the_platform_group_only(gates: Gates, upstreams: Upstreams) -> None:
    gate = gates.auth
    scope = "repository:quay.io/coreos/etcd:pull"
    path = "/v2/quay.io/coreos/etcd/manifests/v3.5.0"
    assert get(gate, path, ACCEPT_LINES).status == 401  # no token at all

    alice = [("Authorization", f"Bearer {token(gate, 'alice', scope)}")]
    reply = get(gate, path, [*ACCEPT_LINES, *alice])
    assert reply.status == 200, reply
    assert reply.body == upstreams.quay["coreos/etcd:v3.5.0"].raw
    assert origin(gate, "quay.io/coreos/etcd", "v3.5.0", alice) == "quay"

    # The token endpoint grants only what policy may allow. Anonymous: a login could
    # help, so 401 and a challenge. bob is logged in and no member of platform: no token
    # would help, so 403 DENIED by the default, audited under his name.
    anonymous = [("Authorization", f"Bearer {token(gate, None, scope)}")]
    reply = get(gate, path, [*ACCEPT_LINES, *anonymous])
    assert reply.status == 401, reply
    assert (reply.header("WWW-Authenticate") or "").startswith("Bearer "), reply.headers
    bob = [("Authorization", f"Bearer {token(gate, 'bob', scope)}")]
    reply = get(gate, path, [*ACCEPT_LINES, *bob])
    assert_denied(reply, "quay.io/coreos/etcd", "policy default: deny")
    wanted = {("manifest_pull", "alice", "quay-coreos"), ("denial", "bob", "default")}
    deadline = time.monotonic() + 10
    while True:  # the audit log is written by a thread: give it a moment
        lines = (gate.directory / "audit.jsonl").read_text().splitlines()
        seen = {(r["event"], r["principal"]["user"], r["rule"]) for r in map(json.loads, lines)}
        if wanted <= seen or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert wanted <= seen, seen

    # Official images are for everyone, bob included.
    hub_scope = "repository:docker.io/library/alpine:pull"
    bob = [("Authorization", f"Bearer {token(gate, 'bob', hub_scope)}")]
    assert manifest(gate, "docker.io/library/alpine", "3.19", bob).status == 200
    assert_denied(manifest(gate, "docker.io/library/alpine", "latest", bob), "hub-official-images")


def audit_records(gate: GateProcess, event: str, count: int) -> list[dict[str, Any]]:
    """The gate's audit records of an event, once there are ``count`` (written by a thread)."""
    deadline = time.monotonic() + 10
    while True:
        lines = (gate.directory / "audit.jsonl").read_text().splitlines()
        found = [r for r in map(json.loads, lines) if r["event"] == event]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_anonymous_pulls_do_not_pin_and_an_authenticated_pull_does(
    gates: Gates, upstreams: Upstreams
) -> None:
    """``alpine`` exists only at the later search registry (corp has no ``alpine``): an
    anonymous pull is served from Docker Hub by the search order, but does not bind the
    name for everyone (squatting); bob's pull pins it, audited, and ``policy pins list``
    names him and when."""
    gate = gates.auth
    scope = "repository:alpine:pull"
    anonymous = [("Authorization", f"Bearer {token(gate, None, scope)}")]
    for _ in range(2):
        assert origin(gate, "alpine", "3.19", anonymous) == "hub"
    assert "alpine" not in pinned_file(gate)
    assert audit_records(gate, "pin_created", 0) == []

    bob = [("Authorization", f"Bearer {token(gate, 'bob', scope)}")]
    reply = manifest(gate, "alpine", "3.19", bob)
    assert reply.status == 200 and reply.body == upstreams.hub["library/alpine:3.19"].raw
    entry = pinned_file(gate)["alpine"]
    assert entry["repository"] == "docker.io/library/alpine"
    assert entry["created_by"]["user"] == "bob" and entry["created"]
    (created,) = audit_records(gate, "pin_created", 1)
    assert created["principal"]["user"] == "bob" and created["name"] == "alpine"
    assert (created["resolved"], created["upstream"]) == ("docker.io/library/alpine", "docker.io")
    assert created["request_id"] == entry["created_by"]["request_id"]
    # Later pulls (anonymous ones too) follow the pin, and create no other.
    assert manifest(gate, "alpine", "3.19", anonymous).status == 200
    assert len(audit_records(gate, "pin_created", 2)) == 1

    (listed,) = run_cli(["policy", "pins", "list", "--config", str(gate.config_path)])
    assert listed.returncode == 0, listed.stdout + listed.stderr
    pins = {d["name"]: d for d in map(json.loads, listed.stdout.splitlines())}
    assert pins["alpine"]["created_by"]["user"] == "bob"
    assert pins["alpine"]["created"] == entry["created"]


# -- explain: why, before anyone pulls ------------------------------------------------------


def test_the_explain_endpoint(gates: Gates) -> None:
    gate = gates.enterprise
    latest = explain(gate, action="pull", reference="docker.io/library/alpine:latest")
    assert latest["allowed"] is False and latest["reason"] == "qualified"
    rule = latest["decision"]["rule"]
    assert (rule["name"], rule["index"]) == ("hub-official-images", 2)
    assert rule["file"].endswith(POLICY_NAME)

    unknown = explain(gate, action="pull", reference="docker.io/someone/else:1")
    assert unknown["allowed"] is False and unknown["decision"]["rule"] is None
    assert "policy default: deny" in unknown["decision"]["message"]

    etcd = "quay.io/coreos/etcd:v3.5.0"
    assert explain(gate, action="pull", reference=etcd)["allowed"] is False
    platform = explain(gate, action="pull", reference=etcd, user="alice", group="platform")
    assert platform["allowed"] is True
    assert platform["decision"]["rule"]["name"] == "quay-coreos"

    push = explain(gate, action="push", reference="docker.io/library/alpine:3.19")
    assert push["allowed"] is False and push["decision"]["rule"]["name"] == "no-public-push"

    # A short name nobody pulled yet: the search list in order, each with its decision.
    fresh = explain(gate, action="pull", reference="busybox:1.36")
    assert fresh["short_name"] == "busybox" and fresh["reason"] == "undetermined"
    assert [c["repository"] for c in fresh["candidates"]] == [
        f"{CORP}/busybox",
        "docker.io/library/busybox",
    ]
    assert [c["search_position"] for c in fresh["candidates"]] == [0, 1]
    assert fresh["candidates"][1]["decision"]["rule"]["section"] == "registry"

    assert get(gate, "/policy/explain?action=pull&reference=Bad%20Name").status == 400


class Listener:
    """A port that accepts TCP connections and remembers whether any arrived."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def connections(self) -> int:
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def close(self) -> None:
        self.sock.close()


def test_policy_explain_command_works_without_any_upstream(gates: Gates, tmp_path: Path) -> None:
    """Every upstream of this configuration is a port that would notice a connection;
    pins are read from the enterprise gate's storage."""
    gate = gates.enterprise
    assert origin(gate, "team/app", "1") == "corp"  # make sure the pin exists
    listeners = [Listener() for _ in range(3)]
    try:
        config = dict(gate.config)
        config["upstreams"] = [
            dict(u, url=f"http://127.0.0.1:{listener.port}")
            for u, listener in zip(config["upstreams"], listeners, strict=True)
        ]
        config["listen"] = f"127.0.0.1:{free_port()}"
        path = tmp_path / "gate.yaml"
        path.write_text(json.dumps(config))
        base = ["policy", "explain", "--config", str(path)]
        latest, pinned, fresh, alias, listed = run_cli(
            [*base, "pull", "docker.io/library/alpine:latest"],
            [*base, "pull", "team/app:1"],
            [*base, "pull", "gate/origin:v1"],
            [*base, "pull", "mysql:8.0", "--json"],
            ["policy", "pins", "list", "--config", str(path)],
        )
        assert sum(listener.connections() for listener in listeners) == 0
    finally:
        for listener in listeners:
            listener.close()

    policy_file = gate.directory / POLICY_NAME
    assert latest.returncode == 1, latest.stdout + latest.stderr
    assert "fully qualified: docker.io/library/alpine:latest" in latest.stdout
    assert (
        f'DENIED by rule "hub-official-images" ({policy_file} rules[2]): '
        'tag "latest" is refused' in latest.stdout
    ), latest.stdout

    # Allowed, through the pin the enterprise gate wrote.
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    assert 'short name "team/app"' in pinned.stdout, pinned.stdout
    assert "resolved by pin" in pinned.stdout and f"pin {CORP}/team/app:1" in pinned.stdout
    corp_internal = f'ALLOWED by rule "corp-internal" ({policy_file} rules[0])'
    assert f"decision: {corp_internal}" in pinned.stdout, pinned.stdout

    # Never pulled: both search positions, in order, each with its own decision.
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "resolved by search list" in fresh.stdout
    lines = fresh.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if f"search[0] {CORP}/gate/origin:v1" in line)
    second = next(i for i, line in enumerate(lines) if "search[1] docker.io/gate/origin:v1" in line)
    assert first < second, fresh.stdout
    assert corp_internal in lines[first + 1]
    assert "DENIED by the policy default" in lines[second + 1]
    assert "depends on which candidate has the reference" in fresh.stdout

    assert alias.returncode == 0, alias.stdout + alias.stderr
    document = json.loads(alias.stdout)
    assert (document["reason"], document["resolved"]) == ("alias", f"{CORP}/dba/mysql")
    assert document["resolution"]["candidates"] == [
        {
            "repository": f"{CORP}/dba/mysql",
            "location": f"{CORP}/dba/mysql",
            "search_position": None,
        }
    ]
    rule = document["decision"]["rule"]
    assert (rule["name"], rule["index"], rule["file"]) == ("corp-internal", 0, str(policy_file))

    assert listed.returncode == 0, listed.stdout + listed.stderr
    listing = {d["name"]: d["repository"] for d in map(json.loads, listed.stdout.splitlines())}
    assert listing["team/app"] == f"{CORP}/team/app"
