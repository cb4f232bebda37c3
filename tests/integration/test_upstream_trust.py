"""A hostile token-auth upstream against the real gate process: where its credentials go,
what a failed token dance leaves behind, what clients are told, and breaker recovery.

The upstream (tests/support/hostile_upstream.py) runs on 127.0.0.1 and is configured
under the registry name ``quay.io``, whose built-in host lists hold object-store and CDN
names; the operator lists the foreign host 127.0.0.2 as a blob-redirect host. Being on
loopback, the upstream may send the gate to internal addresses, so only the realm /
redirect distinction stands between the gate's password and 127.0.0.2: a gate that
approved realms from the redirect list would send it there, and the foreign host, which
answers with a token, records it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support.fault_proxy import LoopThread
from tests.support.gate import GateProcess
from tests.support.hostile_upstream import (
    PASSWORD,
    USER,
    HostileUpstream,
    blob_for,
    manifest_for,
    sha256,
)
from tests.support.metrics import scrape
from tests.support.wire import Reply, request

REGISTRY = "quay.io"
ACCEPT = [("Accept", "application/vnd.oci.image.manifest.v1+json")]
TOKEN_FAILURES = "registry_gate_upstream_token_failures_total"


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileUpstream]:
    loop = LoopThread("hostile-upstream")
    fake = HostileUpstream()
    try:
        yield fake.start(loop)
    finally:
        fake.stop()
        loop.close()


@pytest.fixture(scope="module")
def trust_gate(
    hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GateProcess]:
    upstream = {
        "registry": REGISTRY,
        "url": hostile.registry.url,
        "username": USER,
        "password_env": "HOSTILE_PASSWORD",
        "timeouts": {"connect": 2.0, "read": 5.0},
        "allowed_redirect_hosts": [hostile.foreign.host],
        # Probe at once after opening: recovery is then a matter of requests, not time.
        "circuit": {"failures": 2, "cooldown": 0},
    }
    process = GateProcess(
        tmp_path_factory.mktemp("trust-gate"),
        {"upstreams": [upstream]},
        env={"HOSTILE_PASSWORD": PASSWORD},
        name="trust-gate",
    )
    with process:
        yield process


@pytest.fixture
def gate(trust_gate: GateProcess, hostile: HostileUpstream) -> Iterator[GateProcess]:
    hostile.realm, hostile.token_mode, hostile.redirect_to = None, "ok", None
    hostile.up(*hostile.servers())
    hostile.clear()
    yield trust_gate
    hostile.realm, hostile.token_mode, hostile.redirect_to = None, "ok", None
    hostile.up(*hostile.servers())


def repository() -> str:
    """A repository no other request used: a new token scope, nothing cached."""
    return f"team/r{uuid.uuid4().hex[:10]}"


def pull_manifest(gate: GateProcess, repo: str) -> Reply:
    return request(gate.url, "GET", f"/v2/{REGISTRY}/{repo}/manifests/v1", ACCEPT)


def assert_no_address(reply: Reply, hostile: HostileUpstream, *extra: str) -> None:
    """The client learns which registry failed, never where the upstream pointed."""
    text = reply.body.decode(errors="replace") + "".join(
        f"{k}: {v}" for k, v in reply.headers.items()
    )
    assert REGISTRY in " ".join(reply.error_messages), reply
    for leak in ("127.0.0.", "localhost", PASSWORD, *extra):
        assert leak not in text, f"{leak!r} in {text}"
    for server in hostile.servers():
        assert str(server.port) not in text, f"port of {server.name} in {text}"


@pytest.mark.parametrize(
    "realm",
    [
        "{foreign}/token",  # listed by the operator, but for blob redirects
        "http://attacker.s3.amazonaws.com:{port}/token",  # quay.io's built-in CDN list
        "http://x.execute-api.us-east-1.amazonaws.com:{port}/token",
        "http://169.254.169.254/latest/api/token",
    ],
)
def test_a_realm_not_approved_for_credentials_gets_none(
    gate: GateProcess, hostile: HostileUpstream, realm: str
) -> None:
    hostile.realm = realm.format(foreign=hostile.foreign.url, port=hostile.foreign.port)
    before = scrape(gate.url).value(TOKEN_FAILURES, upstream=REGISTRY, reason="realm_refused")
    reply = pull_manifest(gate, repository())
    assert reply.status == 502, reply
    assert reply.error_codes == ["UNAVAILABLE"]
    assert_no_address(reply, hostile, "amazonaws", "169.254")
    # Refused by name, before any connection: nothing reached the foreign host, and the
    # refusal is counted as such (not as an unreachable token service).
    assert hostile.foreign.requests() == []
    assert set(hostile.authorized_hosts()) <= {"registry", "token"}
    after = scrape(gate.url).value(TOKEN_FAILURES, upstream=REGISTRY, reason="realm_refused")
    assert after == before + 1
    # The host goes to the operator's log.
    assert "token realm host" in gate.log_text()


def test_blob_redirects_reach_the_listed_host_without_credentials(
    gate: GateProcess, hostile: HostileUpstream
) -> None:
    hostile.redirect_to = f"{hostile.foreign.url}/blob"
    repo = repository()
    blob = blob_for(repo)
    reply = request(gate.url, "GET", f"/v2/{REGISTRY}/{repo}/blobs/{sha256(blob)}")
    assert reply.status == 200, reply
    assert reply.body == blob
    foreign = hostile.foreign.requests()
    assert foreign, "the redirect was not followed"
    for seen in foreign:
        assert "Authorization" not in seen.headers, seen
        assert "Cookie" not in seen.headers, seen  # the upstream set one on the redirect
    assert set(hostile.authorized_hosts()) <= {"registry", "token"}


def test_a_refused_realm_does_not_poison_the_upstream(
    gate: GateProcess, hostile: HostileUpstream
) -> None:
    repo = repository()
    hostile.realm = f"{hostile.foreign.url}/token"
    assert pull_manifest(gate, repo).status == 502
    hostile.realm = None  # the upstream is fixed (or was only briefly compromised)
    hostile.clear()
    reply = pull_manifest(gate, repo)
    assert reply.status == 200, reply
    assert reply.body == manifest_for(repo)
    # Asked again, not answered from a remembered challenge.
    assert hostile.registry.requests("/manifests/")
    assert [s.headers["Authorization"] for s in hostile.token.requests()]
    assert hostile.foreign.requests() == []


def test_a_failed_token_service_does_not_poison_the_upstream(
    gate: GateProcess, hostile: HostileUpstream
) -> None:
    repo = repository()
    hostile.token_mode = "503"
    reply = pull_manifest(gate, repo)
    assert reply.status == 502, reply
    assert_no_address(reply, hostile)
    hostile.token_mode = "ok"
    reply = pull_manifest(gate, repo)
    assert reply.status == 200, reply


def test_the_gate_recovers_when_upstream_and_token_service_come_back(
    gate: GateProcess, hostile: HostileUpstream
) -> None:
    assert pull_manifest(gate, repository()).status == 200  # challenge and a token known
    unreachable = {"upstream": REGISTRY, "reason": "unreachable"}
    breaker_state = "registry_gate_circuit_breaker_state"
    failures_before = scrape(gate.url).value(TOKEN_FAILURES, **unreachable)
    hostile.down(hostile.registry, hostile.token)
    for _ in range(3):
        reply = pull_manifest(gate, repository())
        assert reply.status in (502, 504), reply
        assert_no_address(reply, hostile)
    assert scrape(gate.url).value(breaker_state, upstream=REGISTRY) != 0
    # The registry is back, its token service is not: every request (each a half-open
    # probe, cooldown 0) fails in the token fetch, and those failures keep it open.
    hostile.up(hostile.registry)
    for _ in range(3):
        reply = pull_manifest(gate, repository())
        assert reply.status in (502, 504), reply
        assert_no_address(reply, hostile)
    during = scrape(gate.url)
    assert during.value(TOKEN_FAILURES, **unreachable) >= failures_before + 3
    assert during.value(breaker_state, upstream=REGISTRY) != 0
    # Both back: the next request recovers, without a restart.
    hostile.up(hostile.token)
    repo = repository()
    reply = pull_manifest(gate, repo)
    assert reply.status == 200, reply
    assert reply.body == manifest_for(repo)
    assert scrape(gate.url).value(breaker_state, upstream=REGISTRY) == 0
