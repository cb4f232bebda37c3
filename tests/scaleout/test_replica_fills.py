"""One upstream fetch across replicas (issue 12): real gate processes sharing a real
redis-server, each with its own local cache directory (as separate pods would have), in
front of a real Distribution registry reached through a counting ``FaultProxy``.

The proxy is there to count what reached the upstream, and to hold a blob body mid-way
(``stall``: a slow link, which a loopback registry never is), so that "while the fill is
still running" is a state the test holds, not a timing it hopes for. Proved: 20
concurrent cold GETs spread over three replicas make one upstream GET and all get the
right bytes; a client on replica B receives bytes while A's fill is held mid-body; a
``kill -9`` of the filling replica ends the other replicas' clients short (not a hang)
and the next request refills through another replica once the lease expired; the
replica endpoint refuses anything not signed with the shared secret and is not
reachable through ``/v2/``; with Redis down a replica still serves, unleased.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from proxy.auth.replica_auth import HEADER, ReplicaSigner
from tests.integration.test_cache import (
    MIB,
    Fetched,
    fetch,
    push_blob,
    unique_repo,
    wait_for,
)
from tests.support.engines import RedisServer
from tests.support.fault_proxy import FaultProxy
from tests.support.gate import GateFactory, GateProcess, all_running
from tests.support.metrics import scrape, wait_for_value
from tests.support.registries import DistributionRegistry, free_port
from tests.support.registry_client import RegistryClient
from tests.support.wire import request

ORIGIN = "origin.example"
SECRET = "replica-test-shared-secret-0123456789"
LEASE = 2.0
# Far above the lease bound: a client that hangs instead of ending short fails the test
# by timing out (recorded as a timeout error, which the assertions refuse).
CLIENT_TIMEOUT = 60.0
SOURCES = "registry_gate_replica_fill_sources_total"
SERVED = "registry_gate_replica_streams_served_total"


@pytest.fixture(scope="module")
def origin_client(origin: DistributionRegistry) -> RegistryClient:
    return RegistryClient(origin.host)


def replica_config(proxy: FaultProxy, redis_url: str, replica: str) -> dict[str, Any]:
    upstream = {"registry": ORIGIN, "url": proxy.url, "timeouts": {"connect": 2, "read": 30}}
    return {
        "upstreams": [upstream],
        "redis": {"url": redis_url},
        "replica": {"id": replica, "fill_lease": LEASE},
        "upload_secret": SECRET,
    }


@pytest.fixture(scope="module")
def trio(
    proxy_module: FaultProxy,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[GateProcess]]:
    """Three replicas (a, b, c) for the tests that kill none of them."""
    gates = [
        GateProcess(
            tmp_path_factory.mktemp(f"replica-{name}"),
            replica_config(proxy_module, redis_server.redis_url, name),
            name=f"replica-{name}",
        )
        for name in ("a", "b", "c")
    ]
    with all_running(gates) as running:
        yield running


@pytest.fixture
def replicas(trio: list[GateProcess], proxy: FaultProxy) -> list[GateProcess]:
    return trio


def blob_url(repo: str, digest: str) -> str:
    return f"/v2/{ORIGIN}/{repo}/blobs/{digest}"


def stored(gate: GateProcess, digest: str) -> Path:
    return Path(gate.config["storage"]["path"]) / "blobs" / "sha256" / digest.split(":", 1)[1]


def upstream_gets(proxy: FaultProxy, digest: str) -> int:
    return proxy.count("GET", "blob", digest)


def stalled(proxy: FaultProxy, digest: str, at: int, gets: int = 1) -> Callable[[], bool]:
    """Whether the `gets`-th upstream GET of `digest` has been held at `at` bytes."""

    def check() -> bool:
        log = [
            p for p in proxy.log() if p.method == "GET" and p.kind == "blob" and digest in p.path_qs
        ]
        return len(log) >= gets and log[gets - 1].body_bytes >= at

    return check


def assert_whole(result: Fetched, digest: str, size: int) -> None:
    assert result.status == 200, result
    assert result.complete and result.received == size and result.digest == digest, result


def assert_ended_short(result: Fetched) -> None:
    assert result.status == 200, result
    assert not result.complete, result
    # Cut (fewer bytes than Content-Length, or a reset), not timed out: no hang.
    assert result.received < (result.length or 0), result
    assert result.error is None or "timed out" not in result.error.lower(), result


def test_20_concurrent_cold_gets_over_three_replicas_make_one_upstream_get(
    replicas: list[GateProcess], proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    repo, data = unique_repo("replicas"), os.urandom(8 * MIB)
    digest = push_blob(origin_client, repo, data)
    # The upstream body is held after 2 MiB until every client has its headers: all 20
    # requests are attached to fills before the first one can end.
    proxy.set_fault("stall", keep=2 * MIB, contains=digest)
    before = [scrape(g.url) for g in replicas]
    clients = 20
    headers = threading.Semaphore(0)
    barrier = threading.Barrier(clients)

    def one(index: int) -> Fetched:
        gate = replicas[index % len(replicas)]
        barrier.wait()
        return fetch(
            gate.url, blob_url(repo, digest), on_headers=headers.release, timeout=CLIENT_TIMEOUT
        )

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one, i) for i in range(clients)]
        for _ in range(clients):
            assert headers.acquire(timeout=CLIENT_TIMEOUT), "a client got no headers"
        wait_for(stalled(proxy, digest, 2 * MIB), "the fill to be held mid-body")
        proxy.release()
        results = [f.result() for f in futures]
    for result in results:
        assert_whole(result, digest, len(data))
    assert upstream_gets(proxy, digest) == 1, proxy.summary()
    assert proxy.body_bytes("blob") == len(data)
    after = [scrape(g.url) for g in replicas]

    def added(source: str) -> float:
        return sum(
            a.value(SOURCES, source=source) - b.value(SOURCES, source=source)
            for a, b in zip(after, before, strict=True)
        )

    # One replica fetched under the lease, the two others streamed from it.
    assert (added("upstream"), added("peer"), added("unleased")) == (1, 2, 0)
    for gate in replicas:
        wait_for(lambda g=gate: stored(g, digest).exists(), f"{gate.name} to cache the blob")


def test_a_client_on_another_replica_gets_bytes_while_the_fill_runs(
    replicas: list[GateProcess], proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    a, b, _ = replicas
    repo, data = unique_repo("replicas"), os.urandom(8 * MIB)
    digest = push_blob(origin_client, repo, data)
    keep = 3 * MIB
    proxy.set_fault("stall", keep=keep, contains=digest)
    before_b = scrape(b.url).value(SOURCES, source="peer")
    before_a = scrape(a.url).value(SERVED, outcome="ok")
    with ThreadPoolExecutor(1) as pool:
        on_a = pool.submit(fetch, a.url, blob_url(repo, digest), timeout=CLIENT_TIMEOUT)
        wait_for(stalled(proxy, digest, keep), "replica a's fill to be held mid-body")
        # B's client reads its first MiB and leaves, while the upstream is still held.
        on_b = fetch(b.url, blob_url(repo, digest), stop_after=MIB, timeout=CLIENT_TIMEOUT)
        (upstream_get,) = [p for p in proxy.log() if p.method == "GET" and p.kind == "blob"]
        print(
            f"\nreplica b's client had {on_b.received / MIB:.1f} MiB while the upstream had "
            f"sent {upstream_get.body_bytes / MIB:.1f} of {len(data) / MIB:.0f} MiB"
        )
        assert on_b.status == 200 and on_b.received >= MIB, on_b
        assert upstream_get.body_bytes <= keep < len(data), upstream_get
        assert not stored(a, digest).exists() and not stored(b, digest).exists()
        proxy.release()
        assert_whole(on_a.result(), digest, len(data))
    # B's fill (from A) outlived its client: B now holds the blob too.
    wait_for(lambda: stored(b, digest).exists(), "replica b to cache the blob")
    assert_whole(fetch(b.url, blob_url(repo, digest)), digest, len(data))
    assert upstream_gets(proxy, digest) == 1, proxy.summary()
    assert scrape(b.url).value(SOURCES, source="peer") == before_b + 1
    wait_for_value(a.url, SERVED, lambda v: v == before_a + 1, outcome="ok")


def test_the_replica_endpoint_answers_only_signed_requests_outside_v2(
    replicas: list[GateProcess], proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    a = replicas[0]
    repo, data = unique_repo("replicas"), os.urandom(MIB)
    digest = push_blob(origin_client, repo, data)
    assert_whole(fetch(a.url, blob_url(repo, digest)), digest, len(data))
    wait_for(lambda: stored(a, digest).exists(), "replica a to cache the blob")
    path = f"/_replica/fills/{digest}"
    signer = ReplicaSigner(SECRET.encode())
    refused_before = scrape(a.url).value(SERVED, outcome="refused")

    unsigned = request(a.url, "GET", path)
    assert unsigned.status == 401 and data not in unsigned.body, unsigned
    wrong_key = ReplicaSigner(b"not the shared secret").sign("GET", path)
    assert request(a.url, "GET", path, list(wrong_key.items())).status == 401
    other = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    other_path = ReplicaSigner(SECRET.encode()).sign("GET", f"/_replica/fills/{other}")
    assert request(a.url, "GET", path, list(other_path.items())).status == 401
    stale = signer.sign("GET", path, now=1_000_000_000)
    assert request(a.url, "GET", path, list(stale.items())).status == 401
    garbage = [(HEADER, "v1 99999999999 " + "z" * 64)]
    assert request(a.url, "GET", path, garbage).status == 401
    assert scrape(a.url).value(SERVED, outcome="refused") == refused_before + 5

    # The same request signed with the shared secret is served: the refusals were the
    # signature's doing.
    signed = request(a.url, "GET", path, list(signer.sign("GET", path).items()))
    assert signed.status == 200 and signed.body == data, signed
    # Only what this replica fills or holds: a digest it never saw is 404, not fetched.
    gets_before = proxy.count("GET", "blob")
    unknown = "sha256:" + os.urandom(32).hex()
    unknown_path = f"/_replica/fills/{unknown}"
    missing = request(a.url, "GET", unknown_path, list(signer.sign("GET", unknown_path).items()))
    assert missing.status == 404 and missing.error_codes == ["BLOB_UNKNOWN"], missing
    assert proxy.count("GET", "blob") == gets_before
    # Not an OCI route: through /v2/ the same path, signed or not, is no blob.
    for through in (f"/v2{path}", f"/v2/{ORIGIN}{path}"):
        reply = request(a.url, "GET", through, list(signer.sign("GET", through).items()))
        assert reply.status == 404 and data not in reply.body, (through, reply)
    assert request(a.url, "HEAD", path, list(signer.sign("HEAD", path).items())).status == 405


@pytest.mark.slow
def test_kill_9_of_the_filling_replica_ends_waiting_clients_short_and_another_refills(
    gate_factory: GateFactory,
    proxy: FaultProxy,
    redis_server: RedisServer,
    origin_client: RegistryClient,
) -> None:
    a, b, c = (
        gate_factory(replica_config(proxy, redis_server.redis_url, name), name=f"replica-{name}")
        for name in ("a", "b", "c")
    )
    repo, data = unique_repo("replicas"), os.urandom(8 * MIB)
    digest = push_blob(origin_client, repo, data)
    keep = 2 * MIB
    proxy.set_fault("stall", keep=keep, contains=digest)
    attached = threading.Semaphore(0)

    def waiting(gate: GateProcess) -> Future[Fetched]:
        return pool.submit(
            fetch,
            gate.url,
            blob_url(repo, digest),
            on_headers=attached.release,
            timeout=CLIENT_TIMEOUT,
        )

    with ThreadPoolExecutor(3) as pool:
        on_a = waiting(a)
        wait_for(stalled(proxy, digest, keep), "replica a's fill to be held mid-body")
        on_b, on_c = waiting(b), waiting(c)
        for _ in range(3):
            # b's and c's headers come once a's endpoint answered: they stream from a.
            assert attached.acquire(timeout=CLIENT_TIMEOUT), "a client got no headers"
        a.kill9()
        crashed = [on_a.result(), on_b.result(), on_c.result()]
    for result in crashed:
        assert_ended_short(result)
    assert upstream_gets(proxy, digest) == 1, proxy.summary()
    assert not stored(b, digest).exists() and not stored(c, digest).exists()

    # The next request takes over once a's lease expired (a is dead: connection refused),
    # and is held mid-body again, so a client on c arrives while b's refill runs.
    proxy.set_fault("stall", keep=keep, contains=digest)
    with ThreadPoolExecutor(2) as pool:
        on_b = waiting(b)
        wait_for(stalled(proxy, digest, keep, gets=2), "replica b's refill to be held")
        on_c = waiting(c)
        for _ in range(2):
            assert attached.acquire(timeout=CLIENT_TIMEOUT), "a client got no headers"
        proxy.release()
        assert_whole(on_b.result(), digest, len(data))
        assert_whole(on_c.result(), digest, len(data))
    assert upstream_gets(proxy, digest) == 2, proxy.summary()
    # b streamed from a (cut by the crash), then refilled from upstream under the lease.
    assert scrape(b.url).value(SOURCES, source="upstream") == 1
    assert scrape(b.url).value(SOURCES, source="peer") == 1
    assert scrape(b.url).value(SOURCES, source="unleased") == 0
    # c streamed both times: from a (cut by the crash), then from b.
    assert scrape(c.url).value(SOURCES, source="peer") == 2
    assert scrape(c.url).value(SOURCES, source="unleased") == 0
    wait_for(lambda: stored(c, digest).exists(), "replica c to cache the blob")


def test_with_redis_down_a_replica_still_serves_unleased(
    gate_factory: GateFactory, proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    gate = gate_factory(replica_config(proxy, dead_redis, "lonely"), name="replica-lonely")
    repo, data = unique_repo("replicas"), os.urandom(2 * MIB)
    digest = push_blob(origin_client, repo, data)
    assert_whole(fetch(gate.url, blob_url(repo, digest)), digest, len(data))
    assert upstream_gets(proxy, digest) == 1, proxy.summary()
    assert scrape(gate.url).value(SOURCES, source="unleased") == 1
    wait_for(lambda: stored(gate, digest).exists(), "the blob to be cached")
    assert_whole(fetch(gate.url, blob_url(repo, digest)), digest, len(data))
    assert upstream_gets(proxy, digest) == 1, proxy.summary()
