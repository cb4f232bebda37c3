"""Fill leases (proxy/content/fill_leases.py) against a real redis-server.

One holder at a time per digest; the holder renews past the lease duration and releases
at the end; a holder that stops renewing (a dead replica) loses the lease within the
bound; a waiter sees the change; a Redis that is down is `LeasesUnavailable`, quickly.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from proxy.content.fill_leases import (
    FillLeases,
    LeaseOwner,
    LeasesUnavailable,
)
from proxy.settings import RedisSettings
from proxy.storage.redis_client import RedisState
from tests.support.engines import RedisServer
from tests.support.registries import free_port

LEASE = 0.6

# Where a lease of the default key prefix lives.
LEASE_KEY = "registry-gate:fill:"


def fresh_digest() -> str:
    return "sha256:" + os.urandom(32).hex()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = RedisState.from_settings(RedisSettings(url=redis_server.redis_url)).client
    yield client
    await client.aclose()


def replica(redis: Redis, name: str, duration: float = LEASE) -> FillLeases:
    # Each FillLeases has its own nonce: two of them are two replicas.
    return FillLeases(redis, name, "http://127.0.0.1:1", duration)


async def test_one_holder_at_a_time_and_the_others_learn_who(redis: Redis) -> None:
    a, b = replica(redis, "a"), replica(redis, "b")
    digest = fresh_digest()
    async with a.claim(digest) as held:
        assert held.held and held.owner == a.me
        async with b.claim(digest) as other:
            assert not other.held
            assert other.owner == a.me
            assert other.token is not None and LeaseOwner.parse(other.token) == a.me
        # A second claim by the holder's own process is refused too: one fill per digest.
        async with a.claim(digest) as again:
            assert not again.held
    # Released at the end: the next claim holds it.
    assert await a.holder(digest) is None
    async with b.claim(digest) as after:
        assert after.held


async def test_the_holder_renews_past_the_lease_duration(redis: Redis) -> None:
    a, b = replica(redis, "a"), replica(redis, "b")
    digest = fresh_digest()
    async with a.claim(digest) as held:
        assert held.held
        await asyncio.sleep(LEASE * 3)  # three lease periods: only renewals keep it
        async with b.claim(digest) as other:
            assert not other.held and other.owner == a.me
        ttl = await redis.pttl(LEASE_KEY + digest)
        assert 0 < ttl <= LEASE * 1000


async def test_a_dead_holder_loses_the_lease_within_the_bound(redis: Redis) -> None:
    a, b = replica(redis, "a"), replica(redis, "b")
    digest = fresh_digest()
    # A replica killed mid-fill: its token is in Redis, nobody renews it.
    await redis.set(LEASE_KEY + digest, a.me.token(), px=int(LEASE * 1000))
    async with b.claim(digest) as other:
        assert not other.held and other.owner == a.me
        assert await b.wait_changed(digest, other.token)
    async with b.claim(digest) as taken:
        assert taken.held


async def test_a_live_holder_outlasts_a_waiter(redis: Redis) -> None:
    a, b = replica(redis, "a"), replica(redis, "b")
    digest = fresh_digest()
    async with a.claim(digest) as held:
        assert held.held
        token = await b.holder(digest)
        assert token is not None
        # Waits the bound (1.5 leases) and reports the holder is still there.
        assert not await b.wait_changed(digest, token)


async def test_a_waiter_sees_the_release(redis: Redis) -> None:
    a, b = replica(redis, "a", duration=30), replica(redis, "b", duration=30)
    digest = fresh_digest()
    claimed, released = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with a.claim(digest) as held:
            assert held.held
            claimed.set()
            await released.wait()

    holder = asyncio.create_task(hold())
    await claimed.wait()
    token = await b.holder(digest)
    assert token is not None
    waiting = asyncio.create_task(b.wait_changed(digest, token))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # a 30 s lease: only the release can end the wait now
    released.set()
    assert await asyncio.wait_for(waiting, 5)
    await holder


async def test_a_lost_lease_does_not_stop_the_holder(redis: Redis) -> None:
    a, b = replica(redis, "a"), replica(redis, "b")
    digest = fresh_digest()
    async with a.claim(digest) as held:
        assert held.held
        # Redis restarted empty under a running fill: another replica may claim it.
        await redis.delete(LEASE_KEY + digest)
        async with b.claim(digest) as other:
            assert other.held
            await asyncio.sleep(LEASE)  # a's renewal finds b's token: it stops, logs
            assert LeaseOwner.parse(await a.holder(digest) or b"") == b.me
    # a's release did not remove b's lease (b released its own at its end).
    assert await a.holder(digest) is None


async def test_tokens_from_elsewhere_name_no_owner() -> None:
    assert LeaseOwner.parse(b"not json") is None
    assert LeaseOwner.parse(b'{"replica": "x"}') is None
    assert LeaseOwner.parse(b'{"replica": "x", "url": "file:///etc", "nonce": "1"}') is None
    assert LeaseOwner.parse(b"[1, 2]") is None
    owner = LeaseOwner("x", "http://10.0.0.1:5000", "ab")
    assert LeaseOwner.parse(owner.token()) == owner


async def test_redis_down_is_leases_unavailable() -> None:
    client = RedisState.from_settings(
        RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0")
    ).client
    try:
        leases = replica(client, "a")
        with pytest.raises(LeasesUnavailable):
            async with leases.claim(fresh_digest()):
                pass
        with pytest.raises(LeasesUnavailable):
            await leases.holder(fresh_digest())
    finally:
        await client.aclose()
