"""What only the Redis stores promise: replicas agree, and losing Redis loses efficiency,
not correctness (README, "Shared state").

Tests that kill or empty Redis use a redis-server of their own, so the session's one
keeps its data for everyone else.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from proxy.names.references import Repository
from proxy.storage.manifest_cache import TagEntry
from proxy.storage.pins import Creator, FilePinStore, PinStoreError
from proxy.storage.redis_client import BREAKER_FAILURES, RedisState, SharedStateUnavailable
from proxy.storage.redis_indexes import RedisRepositoryIndex, RedisTagIndex
from proxy.storage.redis_pins import SEEDED, RedisPinStore
from tests.contract.conftest import redis_state, unique_prefix
from tests.support.engines import RedisServer

UBUNTU_HUB = Repository.of("docker.io", "ubuntu")
UBUNTU_CORP = Repository.of("registry.corp.example", "ubuntu")
UBUNTU_QUAY = Repository.of("quay.io", "ubuntu")
ALPINE = Repository.of("docker.io", "alpine")
BOB = Creator("bob", ("dev",), "10.1.2.3", "req-42")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


Replicas = Callable[..., RedisPinStore]


@pytest.fixture
async def replicas(own_redis: RedisServer, tmp_path: Path) -> AsyncIterator[Replicas]:
    """``replicas(on_error=None)`` -> another replica's pin store: its own Redis client,
    the one Redis and the one archive file."""
    prefix = unique_prefix()
    states: list[RedisState] = []

    def make(on_error: Callable[[str], None] | None = None) -> RedisPinStore:
        state = redis_state(own_redis.redis_url, prefix, on_error=on_error)
        states.append(state)
        return RedisPinStore(state, FilePinStore(tmp_path / "pins.json"))

    yield make
    for state in states:
        await state.close()


async def test_two_replicas_racing_first_pins_agree(replicas: Replicas) -> None:
    a, b = replicas(), replicas()
    calls = [
        (a if i % 2 else b).setdefault(name, (UBUNTU_HUB, UBUNTU_CORP, UBUNTU_QUAY)[i % 3], BOB)
        for name in ("ubuntu", "team/app", "x")
        for i in range(60)
    ]
    results = await asyncio.gather(*calls)
    for name in ("ubuntu", "team/app", "x"):
        mine = [(pin, created) for pin, created in results if pin.name == name]
        assert len({pin.repository for pin, _ in mine}) == 1, name
        assert sum(created for _, created in mine) == 1, name
        # What Redis says, the archive says too.
        shared = await a.get(name)
        archived = await a.archive.get(name)
        assert shared is not None and archived is not None
        assert archived.repository == shared.repository == mine[0][0].repository
        assert archived.created_by == BOB


async def test_redis_restarted_empty_pins_come_back_from_the_archive(
    own_redis: RedisServer, replicas: Replicas
) -> None:
    a, b = replicas(), replicas()
    _, created = await a.setdefault("ubuntu", UBUNTU_CORP, BOB)
    assert created
    await a.set("team/app", Repository.of("quay.io", "team/app"))

    own_redis.restart()  # back, empty

    # B would pin the name elsewhere; the archive's pin is what it gets.
    pin, created = await b.setdefault("ubuntu", UBUNTU_HUB)
    assert not created and pin.repository == UBUNTU_CORP and pin.created_by == BOB
    again = await a.get("ubuntu")
    assert again is not None and again.repository == UBUNTU_CORP
    assert [p.name for p in await replicas().list()] == ["team/app", "ubuntu"]
    # Redis holds them again (seeded, marked), and a new name still pins normally.
    state = redis_state(own_redis.redis_url, "unused:")
    try:
        raw = await state.client.hkeys(a._key)
    finally:
        await state.close()
    assert sorted(raw) == sorted([SEEDED, b"ubuntu", b"team/app"])
    fresh, created = await b.setdefault("alpine", ALPINE)
    assert created and (await a.get("alpine")) == fresh


async def test_a_flushed_pins_hash_is_seeded_again(
    own_redis: RedisServer, replicas: Replicas
) -> None:
    """Eviction or FLUSHDB drops the hash with its marker: the next miss seeds it."""
    a = replicas()
    await a.setdefault("ubuntu", UBUNTU_CORP)
    await a._state.client.delete(a._key)
    pin, created = await replicas().setdefault("ubuntu", UBUNTU_HUB)
    assert not created and pin.repository == UBUNTU_CORP


async def test_redis_down_pinned_names_resolve_unpinned_fail_closed(
    own_redis: RedisServer, replicas: Replicas
) -> None:
    errors: list[str] = []
    a = replicas(errors.append)
    await a.setdefault("ubuntu", UBUNTU_CORP, BOB)

    own_redis.stop()
    try:
        pin = await a.get("ubuntu")
        assert pin is not None and pin.repository == UBUNTU_CORP
        pin, created = await a.setdefault("ubuntu", UBUNTU_HUB)
        assert not created and pin.repository == UBUNTU_CORP
        with pytest.raises(PinStoreError, match=r"not pinned.*unreachable") as refused:
            await a.get("alpine")
        assert refused.value.status == 503
        with pytest.raises(PinStoreError, match="unreachable"):
            await a.setdefault("alpine", ALPINE)
        assert await a.archive.get("alpine") is None  # nothing pinned behind Redis's back
        assert [p.name for p in await a.list()] == ["ubuntu"]  # the archive's view
        with pytest.raises(PinStoreError, match="in the archive, but redis is unreachable"):
            await a.set("team/app", Repository.of("quay.io", "team/app"))
        assert errors and set(errors) == {"pins"}
    finally:
        own_redis.start()
    # Back (empty): the operator's pin made while it was down is seeded from the archive.
    listed = {p.name: p.repository for p in await a.list()}
    assert listed == {"ubuntu": UBUNTU_CORP, "team/app": Repository.of("quay.io", "team/app")}
    fresh, created = await a.setdefault("alpine", ALPINE)
    assert created and fresh.repository == ALPINE


async def test_a_pin_the_archive_cannot_keep_is_withdrawn(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    state = redis_state(own_redis.redis_url, unique_prefix())
    try:
        store = RedisPinStore(state, FilePinStore(blocker / "pins.json"))
        with pytest.raises(PinStoreError):
            await store.setdefault("ubuntu", UBUNTU_HUB)
        assert await state.client.hget(store._key, "ubuntu") is None
    finally:
        await state.close()


async def test_indexes_degrade_while_redis_is_down(own_redis: RedisServer) -> None:
    errors: list[str] = []
    state = redis_state(own_redis.redis_url, unique_prefix(), on_error=errors.append)
    tags, repos = RedisTagIndex(state), RedisRepositoryIndex(state)
    entry = TagEntry(sha(b"m"), "application/vnd.oci.image.manifest.v1+json", 100.0)
    try:
        await tags.put(ALPINE, "latest", entry)
        await repos.record(ALPINE, [entry.digest])
        own_redis.stop()
        try:
            # Misses, "not known", dropped writes: the upstream is asked instead.
            assert await tags.get(ALPINE, "latest") is None
            assert await tags.put(ALPINE, "latest", entry) is None
            assert await tags.tags(ALPINE) == []
            assert not await tags.delete(ALPINE, "latest")
            assert not await repos.holds(ALPINE, entry.digest)
            await repos.record(ALPINE, [entry.digest])
            await repos.forget(entry.digest)
            assert await repos.digests(ALPINE) == []
        finally:
            own_redis.start()
        assert set(errors) == {"tags", "repositories"}
        # Back, empty: a miss until the next answer is shared again.
        assert await tags.get(ALPINE, "latest") is None
        await tags.put(ALPINE, "latest", entry)
        assert await tags.get(ALPINE, "latest") == entry
    finally:
        await state.close()


async def test_unreadable_entries(replicas: Replicas) -> None:
    store = replicas()
    client = store._state.client
    await client.hset(store._key, "ubuntu", b"{not json")
    with pytest.raises(PinStoreError, match="corrupt"):
        await store.get("ubuntu")
    tags = RedisTagIndex(store._state)
    await client.hset(tags._key(ALPINE), "latest", b'{"d": "sha256:../../x", "m": "", "t": 1}')
    assert await tags.get(ALPINE, "latest") is None  # a miss, never that digest


async def test_the_breaker_stops_asking_a_dead_redis(own_redis: RedisServer) -> None:
    errors: list[str] = []
    state = redis_state(
        own_redis.redis_url, unique_prefix(), cooldown=3600.0, on_error=errors.append
    )
    attempts = 0

    async def counted() -> object:
        nonlocal attempts
        attempts += 1
        return await state.client.ping()

    try:
        own_redis.stop()
        try:
            for _ in range(10):
                with pytest.raises(SharedStateUnavailable):
                    await state.call("test", counted)
        finally:
            own_redis.start()
        # Three failures opened it; the other seven were refused without asking Redis,
        # and all ten were counted.
        assert attempts == BREAKER_FAILURES == 3
        assert errors == ["test"] * 10
    finally:
        await state.close()


async def test_a_repositorys_tags_expire_once_they_can_no_longer_be_served(
    states: Callable[[], RedisState],
) -> None:
    state = states()
    tags = RedisTagIndex(state, expire_after=86460.5)
    entry = TagEntry(sha(b"m"), "application/vnd.oci.image.manifest.v1+json", 100.0)
    await tags.put(ALPINE, "latest", entry)
    assert 86000 < await state.client.ttl(tags._key(ALPINE)) <= 86461
    assert await RedisTagIndex(state).get(ALPINE, "latest") == entry
