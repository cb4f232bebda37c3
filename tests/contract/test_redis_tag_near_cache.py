"""The tag index's near-cache (proxy/storage/redis_near_cache.py) on a real redis-server:
warm lookups cost no Redis command while the invalidation subscription is live, and two
replicas still behave as one gate (README, "Shared state").

Each test runs two or three `RedisTagIndex` objects, each with a Redis client of its own,
as replicas would. Tests that change the server (ACLs, pauses, restarts, FLUSHDB, command
counts) use a redis-server of their own. Invalidations are awaited with a bounded poll;
where the memory's own age bound could also explain what is awaited, the test sets that
bound out of reach (an hour), so only the notice or the loss can.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.names.references import Repository
from proxy.storage.manifest_cache import TagEntry
from proxy.storage.redis_client import RedisState
from proxy.storage.redis_indexes import RedisTagIndex
from proxy.storage.redis_near_cache import TagNearCache
from tests.contract.conftest import redis_state, unique_prefix
from tests.support.engines import RedisServer

ALPINE = Repository.of("docker.io", "alpine")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
HOUR = 3600.0


def entry(name: bytes, fetched_at: float = 1000.0) -> TagEntry:
    return TagEntry("sha256:" + hashlib.sha256(name).hexdigest(), OCI_MANIFEST, fetched_at)


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `condition` for up to 10 s (a bound on waiting, not a claim about speed)."""
    for _ in range(1000):
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached in 10 s: {what}")


async def live(*indexes: RedisTagIndex) -> None:
    async def all_live() -> bool:
        return all(index.near.live for index in indexes)

    await eventually(all_live, "every subscription confirmed")


async def hget_calls(client: Any) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_hget", {}).get("calls", 0))


Replicas = Callable[..., RedisTagIndex]


def replica_factory(url: str) -> tuple[Replicas, list[RedisTagIndex], list[RedisState]]:
    prefix = unique_prefix()
    indexes: list[RedisTagIndex] = []
    states: list[RedisState] = []

    def make(*, start: bool = True, url: str = url, **near: Any) -> RedisTagIndex:
        state = redis_state(url, prefix)
        states.append(state)
        index = RedisTagIndex(state, near=TagNearCache(state, **({"max_age": HOUR} | near)))
        indexes.append(index)
        if start:
            index.start()
        return index

    return make, indexes, states


async def close_all(indexes: list[RedisTagIndex], states: list[RedisState]) -> None:
    for index in indexes:
        await index.close()
    for state in states:
        await state.close()


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Replicas]:
    """``replicas(start=True, url=..., **near_cache_options)`` -> another replica's tag
    index on the session's Redis (this test's own prefix); near-caches keep entries an
    hour unless told otherwise."""
    make, indexes, states = replica_factory(redis_server.redis_url)
    yield make
    await close_all(indexes, states)


@pytest.fixture
async def own_replicas(own_redis: RedisServer) -> AsyncIterator[Replicas]:
    """The same, on this test's own redis-server."""
    make, indexes, states = replica_factory(own_redis.redis_url)
    yield make
    await close_all(indexes, states)


def kept(index: RedisTagIndex, repository: Repository, tag: str) -> TagEntry | None:
    """What `index` would answer from memory, without asking Redis."""
    return index.near.get(index._key(repository), tag)


async def keeps(index: RedisTagIndex, tag: str, expected: TagEntry) -> None:
    """Look `tag` up until `index` answers `expected` from memory: an entry read right
    after a write is dropped again when that write's notice arrives."""

    async def answered_from_memory() -> bool:
        assert await index.get(ALPINE, tag) == expected
        return kept(index, ALPINE, tag) == expected

    await eventually(answered_from_memory, f"the replica keeping {expected}")


async def pair_b_keeping_one(own_replicas: Replicas) -> tuple[RedisTagIndex, RedisTagIndex]:
    """Two subscribed replicas; A wrote `latest` -> one, and B keeps it in memory."""
    a, b = own_replicas(), own_replicas()
    await live(a, b)
    await a.put(ALPINE, "latest", entry(b"one"))
    await keeps(b, "latest", entry(b"one"))
    return a, b


async def test_a_put_or_delete_through_one_replica_is_seen_by_another_that_kept_the_tag(
    replicas: Replicas,
) -> None:
    a, b = replicas(), replicas()
    await live(a, b)
    first, second = entry(b"one"), entry(b"two")
    await a.put(ALPINE, "latest", first)
    await keeps(b, "latest", first)

    await a.put(ALPINE, "latest", second)

    async def b_sees_second() -> bool:
        return await b.get(ALPINE, "latest") == second

    await eventually(b_sees_second, "B serving the digest A put")
    await keeps(b, "latest", second)  # read again, and kept again

    assert await a.delete(ALPINE, "latest")

    async def b_sees_nothing() -> bool:
        return await b.get(ALPINE, "latest") is None

    await eventually(b_sees_nothing, "B forgetting the tag A deleted")
    assert kept(b, ALPINE, "latest") is None


async def test_a_replica_reads_its_own_writes_at_once(replicas: Replicas) -> None:
    a = replicas()
    await live(a)
    await a.put(ALPINE, "latest", entry(b"one"))
    await keeps(a, "latest", entry(b"one"))
    # Not waiting for its own notice: the write itself dropped the kept entry.
    assert await a.put(ALPINE, "latest", entry(b"two")) == entry(b"one")
    assert await a.get(ALPINE, "latest") == entry(b"two")
    assert await a.delete(ALPINE, "latest")
    assert await a.get(ALPINE, "latest") is None


@pytest.mark.parametrize("writer", ["other replica", "same replica"])
async def test_a_lookup_that_raced_a_write_does_not_keep_the_older_answer(
    replicas: Replicas, writer: str
) -> None:
    a, b = replicas(), replicas()
    await live(a, b)
    old, new = entry(b"old"), entry(b"new")
    drops: list[tuple[str, str]] = []
    original_drop = b.near.drop

    def counted_drop(key: str, tag: str) -> None:
        drops.append((key, tag))
        original_drop(key, tag)

    b.near.drop = counted_drop  # type: ignore[method-assign]

    async def b_dropped() -> bool:
        return bool(drops)

    await a.put(ALPINE, "latest", old)
    await eventually(b_dropped, "the first put's notice on B")
    drops.clear()

    # B's lookup reads Redis (the old entry), then is held until the write is done and
    # B has dropped the entry (its own write, or the other replica's notice).
    read_done, release = asyncio.Event(), asyncio.Event()
    original_call = b._state.call

    async def held_call(store: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        result = await original_call(store, operation)
        read_done.set()
        await release.wait()
        return result

    b._state.call = held_call  # type: ignore[method-assign]
    lookup = asyncio.create_task(b.get(ALPINE, "latest"))
    await read_done.wait()
    b._state.call = original_call  # type: ignore[method-assign]
    await (a if writer == "other replica" else b).put(ALPINE, "latest", new)
    await eventually(b_dropped, "the write's drop on B")
    release.set()
    assert await lookup == old  # what Redis said when it was asked
    assert kept(b, ALPINE, "latest") is None  # but not kept past the write
    assert await b.get(ALPINE, "latest") == new
    await keeps(b, "latest", new)


async def test_warm_lookups_send_no_redis_command_while_subscribed(
    own_replicas: Replicas, own_redis: RedisServer
) -> None:
    a, b = own_replicas(), own_replicas()
    unsubscribed = own_replicas(start=False)
    await live(a, b)
    await a.put(ALPINE, "latest", entry(b"one"))
    await keeps(b, "latest", entry(b"one"))
    counter = redis_state(own_redis.redis_url, "unused:")
    try:
        before = await hget_calls(counter.client)
        for _ in range(20):
            assert await b.get(ALPINE, "latest") == entry(b"one")
        assert await hget_calls(counter.client) == before
        # Without its subscription a replica asks Redis every time (the count does move).
        for _ in range(20):
            assert await unsubscribed.get(ALPINE, "latest") == entry(b"one")
        assert await hget_calls(counter.client) == before + 20
    finally:
        await counter.close()


async def test_a_lost_subscription_stops_the_memory_until_subscribed_again(
    own_replicas: Replicas, own_redis: RedisServer
) -> None:
    a, b = await pair_b_keeping_one(own_replicas)

    admin = redis_state(own_redis.redis_url, "unused:")
    try:
        # Subscribing is refused from now on, and every subscription is cut: the
        # replicas stay unsubscribed while A writes (its notice reaches nobody).
        await admin.client.execute_command("ACL", "SETUSER", "default", "-subscribe")
        await admin.client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")

        async def b_lost() -> bool:
            return not b.near.live

        await eventually(b_lost, "B noticing its subscription is gone")
        assert kept(b, ALPINE, "latest") is None
        await a.put(ALPINE, "latest", entry(b"two"))
        before = await hget_calls(admin.client)
        for _ in range(3):
            assert await b.get(ALPINE, "latest") == entry(b"two")
        assert await hget_calls(admin.client) == before + 3  # each asked Redis
        assert not b.near.live

        await admin.client.execute_command("ACL", "SETUSER", "default", "+subscribe")
        await live(a, b)
    finally:
        await admin.close()
    # Subscribed again: kept again, and notices reach it again.
    await keeps(b, "latest", entry(b"two"))
    await a.put(ALPINE, "latest", entry(b"three"))

    async def b_sees_third() -> bool:
        return await b.get(ALPINE, "latest") == entry(b"three")

    await eventually(b_sees_third, "B serving the digest A put after the re-subscription")


class Relay:
    """A TCP relay to a redis-server that can go silent: while ``silent``, bytes are held
    in both directions and no connection is closed (a dead host or a dropped flow)."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    def silence(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self._target
            )
            await asyncio.gather(
                self._pump(reader, upstream_writer),
                self._pump(upstream_reader, writer),
                return_exceptions=True,
            )
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


async def test_a_subscription_that_stops_answering_is_lost(
    own_replicas: Replicas, own_redis: RedisServer
) -> None:
    """No end of stream (a dead host, a dropped flow): the heartbeat notices it."""
    relay = await Relay(own_redis.port).start()
    try:
        b = own_replicas(url=relay.url, heartbeat=0.2, pong_timeout=0.2)
        await live(b)
        await b.put(ALPINE, "latest", entry(b"one"))
        await keeps(b, "latest", entry(b"one"))

        relay.silence()

        async def b_lost() -> bool:
            return not b.near.live

        await eventually(b_lost, "B noticing its subscription stopped answering")
        assert kept(b, ALPINE, "latest") is None
        relay.resume()
        await live(b)
        await keeps(b, "latest", entry(b"one"))
    finally:
        await relay.close()


async def test_redis_restarted_empty_leaves_no_kept_answer(
    own_replicas: Replicas, own_redis: RedisServer
) -> None:
    a, b = await pair_b_keeping_one(own_replicas)

    own_redis.restart()  # back, empty; the memory keeps entries an hour, so only the
    # broken subscription can make B forget it

    async def b_misses() -> bool:
        return await b.get(ALPINE, "latest") is None

    await eventually(b_misses, "B missing the tag Redis lost")
    await live(a, b)
    await a.put(ALPINE, "latest", entry(b"two"))
    await keeps(b, "latest", entry(b"two"))


async def test_redis_down_lookups_degrade_to_misses(
    own_replicas: Replicas, own_redis: RedisServer
) -> None:
    b = own_replicas()
    await live(b)
    await b.put(ALPINE, "latest", entry(b"one"))
    await keeps(b, "latest", entry(b"one"))
    own_redis.stop()
    try:

        async def b_lost() -> bool:
            return not b.near.live

        await eventually(b_lost, "B noticing Redis is gone")
        # Nothing kept, and Redis cannot answer: a miss (the upstream is asked), as
        # without the near-cache; writes are dropped.
        assert await b.get(ALPINE, "latest") is None
        assert await b.put(ALPINE, "latest", entry(b"two")) is None
        assert not await b.delete(ALPINE, "latest")
    finally:
        own_redis.start()
    await live(b)
    assert await b.get(ALPINE, "latest") is None  # back, empty


async def test_what_no_notice_announces_is_seen_within_the_age_bound(
    own_replicas: Replicas, own_redis: RedisServer
) -> None:
    """FLUSHDB (as expiry, eviction or a hand edit) publishes nothing: a kept entry is
    read again once it is `max_age` old."""
    b = own_replicas(max_age=0.5)
    await live(b)
    await b.put(ALPINE, "latest", entry(b"one"))
    await keeps(b, "latest", entry(b"one"))
    admin = redis_state(own_redis.redis_url, "unused:")
    try:
        await admin.client.flushdb()
    finally:
        await admin.close()

    async def b_misses() -> bool:
        return await b.get(ALPINE, "latest") is None

    await eventually(b_misses, "B reading the flushed tag again")
    assert b.near.live  # the subscription never broke: the age bound did it


async def test_an_unreadable_notice_forgets_every_kept_entry(replicas: Replicas) -> None:
    b = replicas()
    await live(b)
    await b.put(ALPINE, "latest", entry(b"one"))
    await b.put(ALPINE, "3.20", entry(b"two"))
    await keeps(b, "latest", entry(b"one"))
    await keeps(b, "3.20", entry(b"two"))
    await b._state.client.publish(b.near.channel, b"{not a notice")

    async def forgotten() -> bool:
        return kept(b, ALPINE, "latest") is None and kept(b, ALPINE, "3.20") is None

    await eventually(forgotten, "B forgetting what it kept")
    assert b.near.live
