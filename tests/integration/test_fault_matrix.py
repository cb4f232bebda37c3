"""The fault matrix: for each upstream fault, what the client gets, what is cached, what is
audited and what is counted.

One row per fault (down, slow, hang, truncate, corrupt, HTML 200, 5xx, 429 with
`Retry-After`, redirect loop, token service down, token service slow), each checked on the
four columns the README's fault-matrix table states. The upstream is a real Distribution
registry behind a fault-injecting pass-through (`tests/support/fault_proxy.py`); for the
token-service rows a real Distribution registry with token auth whose realm is a
fault-injecting pass-through in front of the token issuer.

Every test pushes content of its own (a unique repository), so the cache can only answer
what the test itself fetched, and uses a registry name of its own (all names point at the
same pass-through), so one test's failures cannot open the circuit breaker for the next.

"Cached" is read off the wire: after the fault is cleared, the same request either reaches
the upstream again (nothing was cached) or does not (it was). "Audited" reads the gate's
audit log; "counted" compares two scrapes of `/metrics`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import require_tools
from tests.support.fault_proxy import Fault, FaultProxy, LoopThread
from tests.support.gate import GateProcess
from tests.support.images import MT_OCI_MANIFEST
from tests.support.metrics import Scrape, scrape
from tests.support.registries import DistributionRegistry
from tests.support.registry_client import MANIFEST_ACCEPT, RegistryClient
from tests.support.token_issuer import TokenIssuer
from tests.support.wire import Reply

pytestmark = pytest.mark.slow

READ_TIMEOUT = 1.5  # the gate's timeouts.read: a hang costs this much
SLOW = 0.4  # a slow upstream: well inside READ_TIMEOUT
POOL = 40  # registry names per upstream (one per test)
TOKEN_USER, TOKEN_PASSWORD = "matrix", "matrix-password-4711"
ACCEPT = [("Accept", mt) for mt in MANIFEST_ACCEPT]
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
BLOB_SIZE = 256 * 1024


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Image:
    """A one-layer image pushed for one test: its repository and layer."""

    repository: str
    manifest_digest: str
    layer: bytes

    @property
    def layer_digest(self) -> str:
        return sha256(self.layer)


def push_image(client: RegistryClient, repository: str) -> Image:
    """Push a unique one-layer OCI image as ``repository:v1`` (straight to the registry)."""
    layer = os.urandom(BLOB_SIZE)
    config = json.dumps({"architecture": "amd64", "os": "linux", "id": repository}).encode()
    for blob in (layer, config):
        scope = f"repository:{repository}:pull,push"
        started = client.request("POST", f"/v2/{repository}/blobs/uploads/", scope=scope)
        location = started.headers["Location"]
        path = location.split("://", 1)[-1].split("/", 1)[-1]
        sep = "&" if "?" in path else "?"
        client.request(
            "PUT",
            f"/{path}{sep}digest={sha256(blob)}",
            data=blob,
            headers={"Content-Type": "application/octet-stream"},
            scope=scope,
        )
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": MT_LAYER, "digest": sha256(layer), "size": len(layer)}],
        }
    ).encode()
    digest = client.put_manifest(repository, "v1", manifest, MT_OCI_MANIFEST)
    return Image(repository, digest, layer)


class RealmProxyIssuer(TokenIssuer):
    """The token issuer, announced to the registry at a pass-through's address."""

    realm_url = ""

    @property
    def realm(self) -> str:
        return self.realm_url or super().realm


@dataclass
class Rig:
    """The upstreams, their pass-throughs and the gate in front of them."""

    gate: GateProcess
    registry: DistributionRegistry
    registry_proxy: FaultProxy  # between the gate and the anonymous registry
    token_registry: DistributionRegistry
    token_proxy: FaultProxy  # between the gate and the token registry
    issuer_proxy: FaultProxy  # between the gate and the token issuer (the realm)
    names: Iterator[str]
    token_names: Iterator[str]

    def clear(self) -> None:
        for proxy in (self.registry_proxy, self.token_proxy, self.issuer_proxy):
            proxy.clear_fault()
            if not proxy.listening:
                proxy.up()
            proxy.reset()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_tools()
    root = tmp_path_factory.mktemp("fault-matrix")
    with ExitStack() as stack:
        loops = LoopThread("fault-matrix")
        stack.callback(loops.close)
        registry = DistributionRegistry(root / "registry", name="matrix")
        stack.callback(registry.stop)
        registry.start()
        issuer = RealmProxyIssuer(
            root / "issuer", users={TOKEN_USER: TOKEN_PASSWORD}, anonymous_actions=None
        )
        stack.callback(issuer.stop)
        issuer.start()
        issuer_proxy = FaultProxy(lambda: f"http://127.0.0.1:{issuer.port}", loop=loops)
        stack.enter_context(issuer_proxy)
        issuer.realm_url = f"{issuer_proxy.url}/token"
        token_registry = DistributionRegistry(
            root / "token-registry", name="matrix-token", token_auth=issuer
        )
        stack.callback(token_registry.stop)
        token_registry.start()
        registry_proxy = FaultProxy(lambda: registry.url, loop=loops, name="matrix-upstream")
        stack.enter_context(registry_proxy)
        token_proxy = FaultProxy(lambda: token_registry.url, loop=loops, name="matrix-token")
        stack.enter_context(token_proxy)
        timeouts = {"connect": 1.0, "read": READ_TIMEOUT}
        table: list[dict[str, Any]] = [
            {"registry": f"m{i}.example", "url": registry_proxy.url, "timeouts": timeouts}
            for i in range(POOL)
        ]
        table += [
            {
                "registry": f"t{i}.example",
                "url": token_proxy.url,
                "timeouts": timeouts,
                "username": TOKEN_USER,
                "password_env": "MATRIX_PASSWORD",
            }
            for i in range(POOL)
        ]
        gate = GateProcess(
            root / "gate",
            {"upstreams": table, "storage": {"tag_ttl": 0, "stale_limit": 0}},
            env={"MATRIX_PASSWORD": TOKEN_PASSWORD},
            name="fault-matrix-gate",
        )
        stack.enter_context(gate)
        yield Rig(
            gate,
            registry,
            registry_proxy,
            token_registry,
            token_proxy,
            issuer_proxy,
            (f"m{i}.example" for i in range(POOL)),
            (f"t{i}.example" for i in range(POOL)),
        )


@dataclass
class Case:
    """One test's upstream name, image, and the pass-through that carries its requests."""

    rig: Rig
    upstream: str
    image: Image
    proxy: FaultProxy  # where the content's requests pass
    before: Scrape
    audit_offset: int

    def path(self, kind: str) -> str:
        base = f"/v2/{self.upstream}/{self.image.repository}"
        if kind == "manifest":
            return f"{base}/manifests/v1"
        return f"{base}/blobs/{self.image.layer_digest}"

    def get(self, kind: str) -> Reply:
        return get_tolerating_short_bodies(self.rig.gate.url, self.path(kind))

    def upstream_gets(self, kind: str) -> int:
        return self.proxy.count("GET", kind, contains=self.image.repository)

    def counted(self, name: str, **labels: str) -> float:
        return scrape(self.rig.gate.url).value(name, **labels) - self.before.value(name, **labels)

    def audit_records(self, expect: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """This test's audit records (waits for ``expect`` of them: the writer is a thread)."""
        deadline = time.monotonic() + timeout
        while True:
            records = [
                r
                for r in read_audit(self.rig.gate.directory / "audit.jsonl", self.audit_offset)
                if self.image.repository in (r.get("name") or "")
            ]
            if len(records) >= expect or time.monotonic() > deadline:
                return records
            time.sleep(0.05)


def get_tolerating_short_bodies(base_url: str, path: str) -> Reply:
    """GET like ``wire.request``, but a body that ends short of its Content-Length is
    returned as far as it came (that is what a cut-off blob looks like to a client)."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in ACCEPT:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        try:
            return Reply(response.status, response.headers, response.read())
        except http.client.IncompleteRead as short:
            # Cut off: short of its Content-Length, or a chunked body without its last
            # chunk. Marked so that no test can mistake it for a whole body.
            response.headers["X-Test-Body-Cut"] = "1"
            return Reply(response.status, response.headers, short.partial)
    finally:
        conn.close()


def read_audit(path: Path, offset: int) -> list[dict[str, Any]]:
    with path.open("rb") as handle:
        handle.seek(offset)
        return [json.loads(line) for line in handle.read().splitlines() if line.strip()]


def audit_size(gate: GateProcess) -> int:
    path = gate.directory / "audit.jsonl"
    return path.stat().st_size if path.exists() else 0


@pytest.fixture
def case(rig: Rig) -> Case:
    rig.clear()
    name = next(rig.names)
    repository = f"matrix/{uuid.uuid4().hex[:12]}"
    image = push_image(RegistryClient(rig.registry.host), repository)
    return Case(rig, name, image, rig.registry_proxy, scrape(rig.gate.url), audit_size(rig.gate))


@pytest.fixture
def token_case(rig: Rig) -> Case:
    rig.clear()
    name = next(rig.token_names)
    repository = f"matrix/{uuid.uuid4().hex[:12]}"
    client = RegistryClient(rig.token_registry.host, credentials=(TOKEN_USER, TOKEN_PASSWORD))
    image = push_image(client, repository)
    rig.issuer_proxy.reset()
    return Case(rig, name, image, rig.token_proxy, scrape(rig.gate.url), audit_size(rig.gate))


def assert_oci_error(reply: Reply, status: int, code: str, upstream: str) -> None:
    assert reply.status == status, reply
    assert reply.error_codes[:1] == [code], reply
    text = reply.body.decode(errors="replace")
    assert "Traceback" not in text, text
    assert TOKEN_PASSWORD not in text, text
    assert "127.0.0.1" not in text, f"an internal address reached the client: {text}"
    assert upstream in " ".join(reply.error_messages), f"error does not name {upstream}: {text}"


def assert_short_body(reply: Reply) -> None:
    """A blob the gate could not verify: the body is cut off (short of its Content-Length,
    or a chunked body without its last chunk) or the answer is an error, so no client
    accepts it."""
    if reply.status == 200:
        assert reply.header("X-Test-Body-Cut") == "1", reply.headers
    else:
        assert reply.status >= 500, reply


def assert_refetched(case: Case, kind: str) -> None:
    """Nothing was cached: once the fault is gone, the request reaches the upstream."""
    case.proxy.clear_fault()
    if not case.proxy.listening:
        case.proxy.up()
    before = case.upstream_gets(kind)
    reply = case.get(kind)
    assert reply.status == 200, reply
    if kind == "blob":
        assert reply.body == case.image.layer
    assert case.upstream_gets(kind) == before + 1, case.proxy.summary()


def assert_failed_pull_audited(case: Case, status: int) -> None:
    records = case.audit_records(1)
    failed = [r for r in records if r["event"] == "manifest_pull" and r["status"] == status]
    assert failed, records
    assert failed[0]["decision"] == "allow"
    assert failed[0]["upstream"] == case.upstream
    assert failed[0]["reason"], failed[0]


# -- down, hang, 5xx, 429: no body at all ------------------------------------------------


@pytest.mark.parametrize("kind", ["manifest", "blob"])
def test_upstream_down(case: Case, kind: str) -> None:
    case.proxy.down()
    reply = case.get(kind)
    assert_oci_error(reply, 502, "UNAVAILABLE", case.upstream)
    assert (
        case.counted(
            "registry_gate_upstream_requests_total", upstream=case.upstream, status="error"
        )
        >= 1
    )
    if kind == "manifest":
        assert_failed_pull_audited(case, 502)
    assert_refetched(case, kind)


@pytest.mark.parametrize("kind", ["manifest", "blob"])
def test_upstream_hang(case: Case, kind: str) -> None:
    case.proxy.set_fault(Fault("hang", kinds={kind}, timeout=READ_TIMEOUT * 4))
    reply = case.get(kind)
    case.proxy.release()
    assert_oci_error(reply, 504, "UNAVAILABLE", case.upstream)
    assert (
        case.counted(
            "registry_gate_upstream_requests_total", upstream=case.upstream, status="error"
        )
        >= 1
    )
    if kind == "manifest":
        assert_failed_pull_audited(case, 504)
    assert_refetched(case, kind)


@pytest.mark.parametrize("kind", ["manifest", "blob"])
def test_upstream_5xx(case: Case, kind: str) -> None:
    case.proxy.set_fault(Fault("status", kinds={kind}, status=503))
    reply = case.get(kind)
    assert_oci_error(reply, 502, "UNAVAILABLE", case.upstream)
    assert (
        case.counted("registry_gate_upstream_requests_total", upstream=case.upstream, status="503")
        >= 1
    )
    if kind == "manifest":
        assert_failed_pull_audited(case, 502)
    assert_refetched(case, kind)


@pytest.mark.parametrize("kind", ["manifest", "blob"])
def test_upstream_429_with_retry_after(case: Case, kind: str) -> None:
    case.proxy.set_fault(Fault("429", kinds={kind}, retry_after="23"))
    reply = case.get(kind)
    assert_oci_error(reply, 429, "TOOMANYREQUESTS", case.upstream)
    assert reply.header("Retry-After") == "23"
    assert (
        case.counted("registry_gate_upstream_requests_total", upstream=case.upstream, status="429")
        >= 1
    )
    if kind == "manifest":
        assert_failed_pull_audited(case, 429)
    assert_refetched(case, kind)


# -- slow: served, and cached --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["manifest", "blob"])
def test_slow_upstream_is_served_and_cached(case: Case, kind: str) -> None:
    case.proxy.set_fault(Fault("slow", kinds={kind}, methods={"GET"}, delay=SLOW))
    reply = case.get(kind)
    assert reply.status == 200, reply
    if kind == "blob":
        assert reply.body == case.image.layer
        assert case.counted("registry_gate_cache_misses_total", kind="blob") >= 1
    else:
        assert reply.header("Docker-Content-Digest") == case.image.manifest_digest
        records = case.audit_records(1)
        assert [r["status"] for r in records if r["event"] == "manifest_pull"] == [200]
    gets = case.upstream_gets(kind)
    again = case.get(kind)
    assert again.status == 200
    if kind == "blob":
        # A blob is content-addressed: the second GET is a cache hit, no upstream GET.
        assert case.upstream_gets(kind) == gets, case.proxy.summary()
        assert case.counted("registry_gate_cache_hits_total", kind="blob") >= 1
    else:
        # tag_ttl is 0 here: the tag is revalidated by HEAD, the body comes from the cache.
        assert case.upstream_gets(kind) == gets, case.proxy.summary()


# -- bodies that are not the content: never cached, never accepted -------------------------


@pytest.mark.parametrize("fault", ["truncate", "corrupt", "html", "short"])
def test_blob_body_faults(case: Case, fault: str) -> None:
    case.proxy.set_fault(Fault(fault, kinds={"blob"}, contains=case.image.repository))
    reply = case.get("blob")
    assert_short_body(reply)
    assert reply.body != case.image.layer
    if fault in ("corrupt", "html"):
        assert case.counted("registry_gate_digest_mismatches_total", upstream=case.upstream) == 1
    assert case.counted("registry_gate_cache_fill_failures_total", upstream=case.upstream) >= 1
    assert_refetched(case, "blob")


@pytest.mark.parametrize("fault", ["corrupt", "html", "truncate"])
def test_manifest_body_faults(case: Case, fault: str) -> None:
    # By tag: the gate learns the digest from the upstream's HEAD, then verifies the GET.
    case.proxy.set_fault(Fault(fault, kinds={"manifest"}, methods={"GET"}))
    reply = case.get("manifest")
    assert_oci_error(reply, 502, "UNAVAILABLE", case.upstream)
    assert_failed_pull_audited(case, 502)
    assert_refetched(case, "manifest")


def test_blob_redirect_loop(case: Case) -> None:
    case.proxy.set_fault(Fault("redirect", kinds={"blob"}, methods={"GET"}))
    reply = case.get("blob")
    assert_oci_error(reply, 502, "UNAVAILABLE", case.upstream)
    # The gate stops at its hop limit (10) instead of following forever.
    assert case.upstream_gets("blob") <= 11, case.proxy.summary()
    assert case.counted("registry_gate_cache_fill_failures_total", upstream=case.upstream) >= 1
    assert_refetched(case, "blob")


# -- the upstream's token service ------------------------------------------------------------


def test_token_service_down(token_case: Case) -> None:
    case = token_case
    case.rig.issuer_proxy.down()
    reply = case.get("manifest")
    assert_oci_error(reply, 502, "UNAVAILABLE", case.upstream)
    assert case.counted("registry_gate_upstream_token_failures_total", upstream=case.upstream) >= 1
    assert_failed_pull_audited(case, 502)
    case.rig.issuer_proxy.up()
    tokens = case.rig.issuer_proxy.count("GET")
    assert_refetched(case, "manifest")
    # The failure was not cached: the gate asked the token service again.
    assert case.rig.issuer_proxy.count("GET") > tokens


def test_token_service_hang(token_case: Case) -> None:
    case = token_case
    case.rig.issuer_proxy.set_fault(Fault("hang", timeout=READ_TIMEOUT * 4))
    reply = case.get("manifest")
    case.rig.issuer_proxy.release()
    assert_oci_error(reply, 504, "UNAVAILABLE", case.upstream)
    assert case.counted("registry_gate_upstream_token_failures_total", upstream=case.upstream) >= 1
    assert_failed_pull_audited(case, 504)
    assert_refetched(case, "manifest")


def test_token_service_slow(token_case: Case) -> None:
    case = token_case
    case.rig.issuer_proxy.set_fault(Fault("slow", delay=SLOW))
    reply = case.get("blob")
    assert reply.status == 200, reply
    assert reply.body == case.image.layer
    assert case.rig.issuer_proxy.count("GET") >= 1
    gets = case.upstream_gets("blob")
    assert case.get("blob").status == 200
    assert case.upstream_gets("blob") == gets
    assert case.counted("registry_gate_upstream_token_failures_total", upstream=case.upstream) == 0
