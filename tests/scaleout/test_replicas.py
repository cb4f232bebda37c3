"""Three real gate processes on real SeaweedFS (S3) and a real redis-server are one gate.

Each replica has its own directory (as separate pods would) and reaches the upstreams
through a counting `FaultProxy` in front of real Distribution registries; what they share
comes only through the bucket and Redis (tests/support/replicas.py). What is proved
(issue 12): content and tags filled through one replica are hits on the others, and a
tag moved through one is what the others serve although they answer warm tags from
memory; a
multi-layer image pulled with skopeo through A is served by B with no upstream blob GET;
concurrent cold misses spread over the replicas make one upstream GET; a pin made
through one replica is what every replica resolves, after restarts too, and racing
replicas agree; kill -9 of the filling replica never leaves an unverified object; the
size cap holds across replicas; Redis restarted empty loses efficiency, not pins.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_cache import (
    HUB,
    MIB,
    ORIGIN,
    Fetched,
    blob_path,
    fetch,
    get,
    manifest_path,
    push_blob,
    push_image,
    skopeo_copy,
    unique_repo,
    upstream_table,
    wait_for,
)
from tests.support.engines import RedisServer, SeaweedS3
from tests.support.fault_proxy import FaultProxy, LoopThread
from tests.support.gate import policy_document
from tests.support.registries import DistributionRegistry
from tests.support.registry_client import RegistryClient
from tests.support.replicas import ReplicaSet
from tests.support.upstreams import Upstreams

pytestmark = pytest.mark.slow

CORP = "registry.corp.example"


@pytest.fixture(scope="module")
def corp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    registry = DistributionRegistry(tmp_path_factory.mktemp("corp"), name="corp")
    with registry:
        yield registry


@pytest.fixture(scope="module")
def proxies(
    origin: DistributionRegistry,
    corp: DistributionRegistry,
    upstreams: Upstreams,
    loops: LoopThread,
) -> Iterator[dict[str, FaultProxy]]:
    with (
        FaultProxy(lambda: origin.url, name="origin-proxy", loop=loops) as origin_proxy,
        FaultProxy(lambda: corp.url, name="corp-proxy", loop=loops) as corp_proxy,
        FaultProxy(upstreams.hub.registry.url, name="hub-proxy", loop=loops) as hub_proxy,
    ):
        yield {ORIGIN: origin_proxy, CORP: corp_proxy, HUB: hub_proxy}


@pytest.fixture
def counted(proxies: dict[str, FaultProxy]) -> Iterator[dict[str, FaultProxy]]:
    for proxy in proxies.values():
        proxy.clear_fault()
        proxy.reset()
    yield proxies
    for proxy in proxies.values():
        proxy.clear_fault()


MakeSet = Callable[..., ReplicaSet]


@pytest.fixture
def make_set(
    tmp_path: Path,
    counted: dict[str, FaultProxy],
    redis_server: RedisServer,
    seaweed_s3: SeaweedS3,
) -> Iterator[MakeSet]:
    """``make_set(count=3, config={...}, policy=...)``: started replicas, stopped after."""
    started: list[ReplicaSet] = []

    def make(count: int = 3, config: dict[str, Any] | None = None, **kwargs: Any) -> ReplicaSet:
        base: dict[str, Any] = {
            "upstreams": upstream_table(counted, 10.0),
            "policy": {"pin_creators": "anyone"},
        }
        for key, value in (config or {}).items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        replicas = ReplicaSet(
            tmp_path / f"set-{len(started)}",
            base,
            redis_server=redis_server,
            s3=seaweed_s3,
            count=count,
            **kwargs,
        )
        started.append(replicas)
        return replicas.start()

    yield make
    for replicas in started:
        replicas.stop()


def blob_key(replicas: ReplicaSet, digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"{replicas.prefix}blobs/{algorithm}/{hexpart}"


def test_content_and_tags_filled_through_one_replica_are_hits_on_the_others(
    make_set: MakeSet, counted: dict[str, FaultProxy], origin: DistributionRegistry
) -> None:
    replicas = make_set()
    upstream = counted[ORIGIN]
    repo = unique_repo("shared")
    image = push_image(RegistryClient(origin.host), repo, "v1", [os.urandom(300_000)])
    a, b, c = replicas

    by_tag = get(a, manifest_path(ORIGIN, repo, "v1"))
    assert by_tag.status == 200 and by_tag.body == image.manifest, by_tag
    for digest, data in image.blobs.items():
        got = fetch(a.url, blob_path(ORIGIN, repo, digest), keep_body=True)
        assert got.complete and got.body == data, got
    wait_for(
        lambda: all(blob_key(replicas, d) in replicas.objects() for d in image.blobs),
        "the blobs to be published in the bucket",
    )
    upstream.reset()

    for replica in (b, c):
        reply = get(replica, manifest_path(ORIGIN, repo, "v1"))
        assert reply.status == 200 and reply.body == image.manifest, reply
        for digest, data in image.blobs.items():
            got = fetch(replica.url, blob_path(ORIGIN, repo, digest), keep_body=True)
            assert got.complete and got.body == data, (replica, got)
            ranged = fetch(
                replica.url, blob_path(ORIGIN, repo, digest), {"Range": "bytes=10-19"},
                keep_body=True,
            )  # fmt: skip
            assert ranged.status == 206 and ranged.body == data[10:20], ranged
    print(f"\nupstream after A's fill, pulling through B and C: {upstream.summary()}")
    assert upstream.count("GET", "blob") == 0, upstream.summary()
    assert upstream.count("GET", "manifest") == 0, upstream.summary()
    assert upstream.count("HEAD", "manifest") == 0, upstream.summary()


def test_a_tag_moved_through_one_replica_is_served_by_another_that_kept_it(
    make_set: MakeSet, counted: dict[str, FaultProxy], origin: DistributionRegistry
) -> None:
    """Warm tags are answered from each replica's memory (no Redis command) while the
    invalidation notices arrive; a tag A recorded anew is then what B serves, read from
    Redis after A's notice, with no upstream request from B. (That the notice, not the
    memory's 10 s age bound, is what made B read it again is proved in
    tests/contract/test_redis_tag_near_cache.py, where that bound is out of reach.)"""
    replicas = make_set(count=2, config={"storage": {"tag_ttl": 3600}})
    a, b = replicas
    # A asks the upstream on every tag request; for B the tag stays fresh for an hour.
    a.stop()
    a.config["storage"]["tag_ttl"] = 0
    a.start()
    upstream = counted[ORIGIN]
    client = RegistryClient(origin.host)
    repo = unique_repo("near")
    path = manifest_path(ORIGIN, repo, "v1")
    first = push_image(client, repo, "v1", [os.urandom(1000)])
    assert get(a, path).body == first.manifest

    with replicas.redis() as shared:
        channel = "registry-gate:tag-invalidations"
        # Subscribed from start-up, one subscriber each (pub/sub ignores the database).
        wait_for(
            lambda: shared.pubsub_numsub(channel) == [(channel.encode(), 2)],
            "both replicas subscribed to the tag invalidations",
        )

        def hgets() -> int:
            return int(shared.info("commandstats").get("cmdstat_hget", {}).get("calls", 0))

        def served_from_memory(manifest: bytes) -> bool:
            before = hgets()
            reply = get(b, path)
            assert reply.status == 200 and reply.body == manifest, reply
            return hgets() == before

        wait_for(lambda: served_from_memory(first.manifest), "B answering the tag from memory")
        before = hgets()
        for _ in range(10):
            assert get(b, path).body == first.manifest
        assert hgets() == before

        second = push_image(client, repo, "v1", [os.urandom(1000)])  # the tag moves
        assert get(a, path).body == second.manifest  # A asked upstream and recorded it
        upstream.reset()
        wait_for(lambda: get(b, path).body == second.manifest, "B serving the moved tag")
        assert upstream.summary() == "none", upstream.summary()
        wait_for(lambda: served_from_memory(second.manifest), "B keeping the moved tag")


def test_skopeo_pulls_a_multi_layer_image_through_a_then_b_with_one_upstream_fetch(
    make_set: MakeSet,
    counted: dict[str, FaultProxy],
    origin: DistributionRegistry,
    tmp_path: Path,
) -> None:
    replicas = make_set(count=2)
    upstream = counted[ORIGIN]
    repo = unique_repo("skopeo")
    layers = [os.urandom(size) for size in (2 * MIB, 700_000, 9 * MIB)]
    image = push_image(RegistryClient(origin.host), repo, "1.0", layers)

    skopeo_copy(replicas[0], f"{ORIGIN}/{repo}:1.0", tmp_path / "through-a")
    wait_for(
        lambda: all(blob_key(replicas, d) in replicas.objects() for d in image.blobs),
        "A's fills to be published",
    )
    fetched_by_a = upstream.count("GET", "blob")
    upstream.reset()
    skopeo_copy(replicas[1], f"{ORIGIN}/{repo}:1.0", tmp_path / "through-b")
    print(f"\nskopeo through A: {fetched_by_a} blob GETs; then B: {upstream.summary()}")
    assert fetched_by_a == len(image.blobs)
    assert upstream.count("GET", "blob") == 0, upstream.summary()


def test_concurrent_cold_gets_spread_over_replicas_make_one_upstream_get(
    make_set: MakeSet, counted: dict[str, FaultProxy], origin: DistributionRegistry
) -> None:
    replicas = make_set()
    upstream = counted[ORIGIN]
    repo, data = unique_repo("stampede"), os.urandom(24 * MIB)
    digest = push_blob(RegistryClient(origin.host), repo, data)
    # The upstream sends 2 MiB, then holds the rest until every client has its headers:
    # all 20 arrive while the one fill is still running.
    upstream.set_fault("stall", keep=2 * MIB, contains=digest)
    clients = 20
    barrier = threading.Barrier(clients)
    answered = threading.Semaphore(0)

    def one(index: int) -> Fetched:
        barrier.wait()
        replica = replicas[index % len(replicas.gates)]
        return fetch(
            replica.url,
            blob_path(ORIGIN, repo, digest),
            timeout=120,
            on_headers=answered.release,
        )

    def release_when_all_answered() -> None:
        for _ in range(clients):
            answered.acquire(timeout=60)
        upstream.release()

    threading.Thread(target=release_when_all_answered, daemon=True).start()

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    print(f"\n{clients} cold GETs over 3 replicas; upstream saw {upstream.summary()}")
    for result in results:
        assert result.status == 200 and result.complete, result
        assert result.digest == digest
    assert upstream.count("GET", "blob", digest) == 1, upstream.summary()


def test_a_pin_made_through_one_replica_is_what_every_replica_resolves(
    make_set: MakeSet, counted: dict[str, FaultProxy], corp: DistributionRegistry
) -> None:
    policy = policy_document([CORP, HUB])
    replicas = make_set(policy=policy)
    name = unique_repo("team")
    image = push_image(RegistryClient(corp.host), name, "1", [os.urandom(1000)])

    # Racing first resolutions of one short name on every replica: they agree.
    barrier = threading.Barrier(len(replicas.gates) * 2)

    def resolve(index: int) -> Any:
        barrier.wait()
        return get(replicas[index % 3], f"/v2/{name}/manifests/1")

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(resolve, range(6)))
    assert all(a.status == 200 and a.body == image.manifest for a in answers), answers

    # Every replica explains the short name by its pin, also after all restart.
    for replica in replicas:
        replica.restart()
    for replica in replicas:
        reply = get(replica, f"/policy/explain?action=pull&reference={name}:1")
        assert reply.status == 200, reply
        result = reply.json()
        assert result["reason"] == "pin", result
        assert result["resolved"] == f"{CORP}/{name}", result
    assert counted[HUB].count(None, "manifest", name) == 0, counted[HUB].summary()


def test_kill_9_of_the_filling_replica_never_leaves_an_unverified_object(
    make_set: MakeSet, counted: dict[str, FaultProxy], origin: DistributionRegistry
) -> None:
    replicas = make_set(count=2)
    upstream = counted[ORIGIN]
    repo, data = unique_repo("crash"), os.urandom(20 * MIB)
    digest = push_blob(RegistryClient(origin.host), repo, data)
    # The upstream sends 12 MiB (more than one multipart part), then stalls.
    upstream.set_fault("stall", keep=12 * MIB, contains=digest)
    filler, other = replicas
    results: list[Fetched | Exception] = []

    def pull(url: str) -> None:
        # Killed before its headers were sent, the filler's client has no response at
        # all: an exception, which counts as not complete too.
        try:
            results.append(fetch(url, blob_path(ORIGIN, repo, digest), timeout=120))
        except OSError as exc:
            results.append(exc)

    waiting = threading.Thread(target=pull, args=(other.url,))
    first = threading.Thread(target=pull, args=(filler.url,))
    first.start()
    wait_for(lambda: upstream.count("GET", "blob", digest) == 1, "the fill to start")
    waiting.start()
    filler.kill9()
    first.join(timeout=120)
    waiting.join(timeout=120)
    assert not first.is_alive() and not waiting.is_alive(), "a client hung"
    assert len(results) == 2, results
    assert not any(isinstance(r, Fetched) and r.complete for r in results), results
    assert blob_key(replicas, digest) not in replicas.objects(), "an unverified object"

    upstream.clear_fault()
    filler.start()
    again = fetch(other.url, blob_path(ORIGIN, repo, digest), timeout=120)
    assert again.complete and again.digest == digest, again
    wait_for(lambda: blob_key(replicas, digest) in replicas.objects(), "the refill")


def test_the_size_cap_holds_across_replicas(
    make_set: MakeSet, counted: dict[str, FaultProxy], origin: DistributionRegistry
) -> None:
    cap = 3 * MIB
    replicas = make_set(count=2, config={"storage": {"max_size": cap}})
    client = RegistryClient(origin.host)
    repo = unique_repo("cap")
    digests = [push_blob(client, repo, os.urandom(1_000_000)) for _ in range(6)]
    for index, digest in enumerate(digests):
        got = fetch(replicas[index % 2].url, blob_path(ORIGIN, repo, digest))
        assert got.complete and got.digest == digest, got
        wait_for(lambda d=digest: blob_key(replicas, d) in replicas.objects(), "the fill")
    kept = [d for d in digests if blob_key(replicas, d) in replicas.objects()]
    print(f"\n6 x 1 MB through 2 replicas under a {cap} byte cap: {len(kept)} kept")
    assert len(kept) * 1_000_000 <= cap
    # The most recent ones are kept, whichever replica filled them.
    assert kept == digests[-len(kept) :] and len(kept) == 3


def test_redis_restarted_empty_loses_efficiency_not_pins(
    make_set: MakeSet,
    counted: dict[str, FaultProxy],
    corp: DistributionRegistry,
    redis_server: RedisServer,
) -> None:
    replicas = make_set(count=2, policy=policy_document([CORP, HUB]))
    name = unique_repo("team")
    image = push_image(RegistryClient(corp.host), name, "1", [os.urandom(1000)])
    first = get(replicas[0], f"/v2/{name}/manifests/1")
    assert first.status == 200 and first.body == image.manifest, first

    redis_server.restart()  # back, empty
    for replica in replicas:
        reply = get(replica, f"/v2/{name}/manifests/1")
        assert reply.status == 200 and reply.body == image.manifest, reply
        result = get(replica, f"/policy/explain?action=pull&reference={name}:1").json()
        assert result["reason"] == "pin" and result["resolved"] == f"{CORP}/{name}", result
