"""What every `BlobLedger` promises (MemoryLedger, and RedisLedger on a real redis-server).

"Replicas" are several ledger objects over one cache: for MemoryLedger the one object a
process shares, for RedisLedger separate objects (separate connections) on one key prefix,
as separate gate processes would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from proxy.storage.ledger import BlobLedger, CacheFull, LedgerUnavailable, MemoryLedger
from proxy.storage.redis_ledger import RedisLedger
from tests.support.engines import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[2]
EVALS = ("eval", "evalsha", "eval_ro", "evalsha_ro")

Replicas = Callable[..., BlobLedger]


@pytest.fixture(params=["memory", "redis"])
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[Replicas]:
    """`replicas(**options)` -> one more ledger over the same cache."""
    made: list[BlobLedger] = []
    clients: list[Redis] = []
    if request.param == "memory":
        shared = MemoryLedger()

        def make(**_: float) -> BlobLedger:
            return shared

    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"test-{uuid.uuid4().hex}:"

        def make(**options: float) -> BlobLedger:
            client = Redis.from_url(server.redis_url)
            clients.append(client)
            ledger = RedisLedger(client, key_prefix=prefix, **options)
            made.append(ledger)
            return ledger

    try:
        yield make
    finally:
        for ledger in made:
            await ledger.close()
        for client in clients:
            await client.aclose()


async def holding(ledger: BlobLedger, *blobs: tuple[str, int]) -> None:
    for digest, size in blobs:
        await ledger.published(digest, size)


async def test_published_blobs_are_held_in_lru_order(replicas: Replicas) -> None:
    ledger = replicas()
    await holding(ledger, ("a", 100), ("b", 200), ("c", 300))
    assert await ledger.entries() == [("a", 100), ("b", 200), ("c", 300)]
    ledger.touched("a")
    ledger.touched("gone")  # not held: a touch does not bring it back
    assert await ledger.entries() == [("b", 200), ("c", 300), ("a", 100)]
    assert (await ledger.size_of("b"), await ledger.size_of("gone")) == (200, None)
    usage = await ledger.usage()
    assert (usage.blobs, usage.bytes, usage.reserved, usage.used) == (3, 600, 0, 600)


async def test_reserve_evicts_the_least_recently_used(replicas: Replicas) -> None:
    ledger = replicas()
    await holding(ledger, ("a", 100), ("b", 100), ("c", 100))
    ledger.touched("a")
    reservation, eviction = await ledger.reserve(150, max_size=300)
    assert eviction.victims == [("b", 100), ("c", 100)]
    assert await ledger.entries() == [("a", 100)]
    assert (await ledger.size_of("b"), await ledger.size_of("c")) == (None, None)
    # The victims' bytes count until the caller has deleted them, beyond what the fill
    # reserved (it writes once they are gone): never above the cap.
    usage = await ledger.usage()
    assert (usage.bytes, usage.filling, usage.draining, usage.used) == (100, 150, 50, 300)
    await ledger.release(eviction.draining)
    usage = await ledger.usage()
    assert (usage.bytes, usage.filling, usage.draining, usage.used) == (100, 150, 0, 250)
    assert reservation.size == 150


async def test_reserve_that_fits_evicts_nothing(replicas: Replicas) -> None:
    ledger = replicas()
    await holding(ledger, ("a", 100))
    _, eviction = await ledger.reserve(200, max_size=300)
    assert (eviction.victims, eviction.draining.size) == ([], 0)
    await ledger.release(eviction.draining)  # releasing an empty one is harmless
    assert (await ledger.usage()).used == 300
    assert await ledger.entries() == [("a", 100)]


async def test_reserve_skips_leased_and_protected_blobs(replicas: Replicas) -> None:
    ledger = replicas()
    await holding(ledger, ("a", 100), ("b", 100), ("c", 100), ("d", 100))
    _, eviction = await ledger.reserve(150, max_size=400, skip={"a", "c"})
    assert eviction.victims == [("b", 100), ("d", 100)]
    assert await ledger.entries() == [("a", 100), ("c", 100)]


async def test_cache_full_evicts_and_reserves_nothing(replicas: Replicas) -> None:
    ledger = replicas()
    await holding(ledger, ("a", 100), ("b", 100), ("c", 100))
    held = await ledger.reserve(50, max_size=400)
    before = (await ledger.entries(), await ledger.usage())
    with pytest.raises(CacheFull) as refused:
        await ledger.reserve(200, max_size=400, skip=["a", "b"])
    assert not refused.value.never
    with pytest.raises(CacheFull) as never:
        await ledger.reserve(401, max_size=400)
    assert never.value.never
    with pytest.raises(CacheFull):
        await ledger.reserve(60, max_size=400, reservation=held[0], skip=["a", "b", "c"])
    assert (await ledger.entries(), await ledger.usage()) == before
    assert held[0].size == 50


async def test_a_reservation_grows_and_ends(replicas: Replicas) -> None:
    ledger = replicas()
    reservation, _ = await ledger.reserve(100, max_size=1000)
    same, _ = await ledger.reserve(50, max_size=1000, reservation=reservation)
    assert same is reservation and reservation.size == 150
    assert (await ledger.usage()).filling == 150
    await ledger.release(reservation)
    assert (await ledger.usage()).filling == 0
    # Publishing turns the fill's reservation into the blob.
    reservation, _ = await ledger.reserve(120, max_size=1000)
    await ledger.published("x", 120, reservation)
    usage = await ledger.usage()
    assert (usage.blobs, usage.bytes, usage.filling) == (1, 120, 0)
    # Published again (a refill of the same digest): one entry, the most recent.
    await holding(ledger, ("y", 10), ("x", 120))
    assert await ledger.entries() == [("y", 10), ("x", 120)]
    assert (await ledger.usage()).bytes == 130


async def test_forget_drains_until_released(replicas: Replicas) -> None:
    ledger = replicas()
    await holding(ledger, ("a", 100), ("b", 70))
    eviction = await ledger.forget("a")
    assert eviction is not None and eviction.victims == [("a", 100)]
    assert await ledger.forget("a") is None
    usage = await ledger.usage()
    assert (usage.blobs, usage.bytes, usage.draining) == (1, 70, 100)
    await ledger.release(eviction.draining)
    gone = await ledger.forget("b", gone=True)
    assert gone is not None and gone.victims == [("b", 70)]
    usage = await ledger.usage()
    assert (usage.blobs, usage.bytes, usage.draining) == (0, 0, 0)


async def test_gc_evicts_until_under_the_cap(replicas: Replicas) -> None:
    ledger = replicas()
    await holding(ledger, ("a", 100), ("b", 100), ("c", 100), ("d", 100))
    eviction = await ledger.victims_for_gc(max_size=250, skip={"a"})
    assert (eviction.victims, eviction.over) == ([("b", 100), ("c", 100)], 0)
    await ledger.release(eviction.draining)
    # What is skipped stays; the rest is reported as still over.
    eviction = await ledger.victims_for_gc(max_size=50, skip={"a", "d"})
    assert (eviction.victims, eviction.over) == ([], 150)
    assert await ledger.entries() == [("a", 100), ("d", 100)]
    nothing = await ledger.victims_for_gc(max_size=1000)
    assert (nothing.victims, nothing.over) == ([], 0)


async def test_seed_adds_what_it_does_not_know_in_last_use_order(replicas: Replicas) -> None:
    ledger = replicas()
    assert not await ledger.seeded()
    await holding(ledger, ("known", 5))
    assert not await ledger.seeded()  # what a store publishes is no listing of it
    await ledger.seed([("new", 30, 2000.0), ("old", 20, 1000.0), ("known", 999, 1.0)])
    assert await ledger.entries() == [("old", 20), ("new", 30), ("known", 5)]
    assert (await ledger.usage()).bytes == 55
    assert await ledger.seeded() and await replicas().seeded()


async def test_replicas_agree(replicas: Replicas) -> None:
    a, b = replicas(), replicas()
    await holding(a, ("x", 100), ("y", 100))
    assert await b.size_of("x") == 100
    b.touched("x")
    await b.entries()  # applies b's touches (RedisLedger batches them)
    reservation, eviction = await a.reserve(100, max_size=200)
    assert eviction.victims == [("y", 100)]
    assert await b.entries() == [("x", 100)]
    assert (await b.usage()).filling == 100
    await b.published("z", 100)
    await a.release(reservation)
    await a.release(eviction.draining)
    assert await a.entries() == [("x", 100), ("z", 100)]


async def test_concurrent_fills_on_replicas_never_exceed_the_cap(replicas: Replicas) -> None:
    cap = 1000
    ledgers = [replicas(), replicas(), replicas()]
    rng = random.Random(12)
    published: list[str] = []
    evicted: list[str] = []
    refused = 0

    async def fill(ledger: BlobLedger, n: int) -> None:
        nonlocal refused
        digest, size = f"blob-{n}", rng.randint(40, 160)
        try:
            reservation, eviction = await ledger.reserve(size, max_size=cap)
        except CacheFull:
            refused += 1
            return
        evicted.extend(d for d, _ in eviction.victims)
        usage = await ledger.usage()
        assert usage.used <= cap
        await asyncio.sleep(0)  # "delete the victims"
        await ledger.release(eviction.draining)
        await asyncio.sleep(0)  # "write the bytes"
        await ledger.published(digest, size, reservation)
        published.append(digest)
        if n % 3 == 0:
            ledger.touched(digest)

    async def replica_client(worker: int) -> None:
        ledger = ledgers[worker % len(ledgers)]
        for n in range(10):
            await fill(ledger, worker * 10 + n)

    await asyncio.gather(*(replica_client(worker) for worker in range(9)))
    usage = await ledgers[0].usage()
    assert (usage.filling, usage.draining) == (0, 0)
    assert usage.used <= cap
    held = [digest for digest, _ in await ledgers[1].entries()]
    # Each published blob is either held or was evicted exactly once: nothing counted twice.
    assert sorted(held + evicted) == sorted(published)
    assert len(published) + refused == 90 and len(evicted) > 0
    # Nothing was evicted for bytes that were about to be freed anyway.
    assert usage.bytes > cap - 9 * 160


_DYING_REPLICA = """
import asyncio, sys
from redis.asyncio import Redis
from proxy.storage.redis_ledger import RedisLedger

async def main():
    ledger = RedisLedger(Redis.from_url(sys.argv[1]), key_prefix=sys.argv[2],
                         reservation_ttl=1.0)
    await ledger.reserve(700, max_size=1000)
    print("reserved", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_dead_replicas_reservation_expires(redis_server: RedisServer) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    client = Redis.from_url(redis_server.redis_url)
    live = RedisLedger(client, key_prefix=prefix, reservation_ttl=1.5)
    dying = await asyncio.create_subprocess_exec(
        *[sys.executable, "-c", _DYING_REPLICA, redis_server.redis_url, prefix],
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert dying.stdout is not None
        # Every wait is bounded: a stuck step fails with its name instead of hanging the run.
        async with asyncio.timeout(30):
            assert await dying.stdout.readline() == b"reserved\n"
        async with asyncio.timeout(10):
            mine, _ = await live.reserve(200, max_size=1000)
            assert (await live.usage()).filling == 900
            with pytest.raises(CacheFull):
                await live.reserve(200, max_size=1000)
        dying.kill()
        async with asyncio.timeout(10):
            await dying.wait()
        deadline = asyncio.get_running_loop().time() + 30
        while (await live.usage()).filling != 200:
            assert asyncio.get_running_loop().time() < deadline, (
                "a dead replica's reservation never expired"
            )
            await asyncio.sleep(0.1)
        # Its own lives on past the TTL: the live replica refreshes it.
        await asyncio.sleep(3.0)
        async with asyncio.timeout(10):
            assert (await live.usage()).filling == 200 and mine.size == 200
            await live.reserve(700, max_size=1000)
            assert (await live.usage()).filling == 900
    finally:
        if dying.returncode is None:
            dying.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dying.wait(), 10)
        await live.close()
        await client.aclose()


async def test_after_redis_restarts_empty_the_ledger_works_again(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.redis_url)
    ledger = RedisLedger(client, key_prefix=f"test-{uuid.uuid4().hex}:")
    try:
        await ledger.seed([])
        assert await ledger.seeded()
        await holding(ledger, ("a", 100))
        ledger.touched("a")
        redis_server.restart()
        # Connections and loaded scripts are gone; the ledger reconnects and reloads.
        for _ in range(50):
            try:
                usage = await ledger.usage()
                break
            except LedgerUnavailable:
                await asyncio.sleep(0.1)
        assert (usage.blobs, usage.bytes) == (0, 0)
        # The store learns that the listing is gone (and seeds the ledger again).
        assert not await ledger.seeded()
        await ledger.seed([("b", 10, 0.0)])
        assert await ledger.seeded() and await ledger.size_of("b") == 10
        await ledger.reserve(100, max_size=100)
        assert (await ledger.usage()).filling == 100
    finally:
        await ledger.close()
        await client.aclose()


async def test_hits_touch_redis_in_batches_not_one_call_each(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.redis_url)
    ledger = RedisLedger(client, key_prefix=f"test-{uuid.uuid4().hex}:", touch_interval=60)

    async def calls() -> int:
        """Script calls (every RedisLedger change is one; the commands a script runs
        inside are counted too, under their own names, so they are left out)."""
        stats = await client.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in EVALS)

    async def everything() -> int:
        stats = await client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")

    try:
        await holding(ledger, *((f"blob-{n}", 10) for n in range(200)))
        await ledger.entries()  # scripts loaded, nothing pending
        before, sent = await calls(), await everything()
        for n in range(200):
            ledger.touched(f"blob-{n}")
        assert await everything() == sent  # nothing sent yet
        order = [digest for digest, _ in await ledger.entries()]
        # One call applied the 200 touches (in order), one read the entries.
        assert await calls() == before + 2
        assert order == [f"blob-{n}" for n in range(200)]
    finally:
        await ledger.close()
        await client.aclose()
