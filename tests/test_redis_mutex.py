"""Cross-replica locks (proxy/storage/redis_mutex.py) against a real redis-server.

Two `RedisMutexes` on one Redis are two replicas: blocks under one name never overlap,
under different names they do; a holder keeps the lock past its lease while its block
runs and frees it at the end; a lock held past the wait, or a Redis that is down, is
`SharedStateUnavailable` before the block runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from proxy.settings import RedisSettings
from proxy.storage.redis_client import RedisState, SharedStateUnavailable
from proxy.storage.redis_mutex import RedisMutexes
from tests.support.engines import RedisServer
from tests.support.registries import free_port


@pytest.fixture
async def state(redis_server: RedisServer) -> AsyncIterator[RedisState]:
    shared = RedisState.from_settings(RedisSettings(url=redis_server.redis_url))
    yield shared
    await shared.close()


def fresh_name() -> str:
    return "test:" + os.urandom(6).hex()


async def test_blocks_under_one_name_never_overlap(state: RedisState) -> None:
    replicas = [RedisMutexes(state, lease=2.0, wait=10.0) for _ in range(2)]
    name = fresh_name()
    inside: list[int] = []
    most = 0

    async def work(index: int) -> None:
        nonlocal most
        async with replicas[index % 2].hold(name):
            inside.append(index)
            most = max(most, len(inside))
            await asyncio.sleep(0.05)
            inside.remove(index)

    await asyncio.gather(*(work(i) for i in range(6)))
    assert most == 1


async def test_different_names_do_not_wait_for_each_other(state: RedisState) -> None:
    a, b = RedisMutexes(state, wait=0.5), RedisMutexes(state, wait=0.5)
    async with a.hold(fresh_name()), b.hold(fresh_name()):
        pass


async def test_the_holder_keeps_the_lock_past_its_lease_and_frees_it(state: RedisState) -> None:
    a, b = RedisMutexes(state, lease=0.6, wait=0.3), RedisMutexes(state, lease=0.6, wait=5.0)
    name = fresh_name()
    key = state.key("mutex", name)
    async with a.hold(name):
        await asyncio.sleep(1.5)  # more than two leases: renewed meanwhile
        assert await state.client.exists(key)
        with pytest.raises(SharedStateUnavailable, match="still held"):
            async with RedisMutexes(state, wait=0.3).hold(name):
                pytest.fail("entered a held lock")
    assert not await state.client.exists(key)
    async with b.hold(name):
        pass


async def test_a_dead_holders_lock_frees_within_its_lease(state: RedisState) -> None:
    name = fresh_name()
    # A replica that took the lock and died: nothing renews it.
    await state.client.set(state.key("mutex", name), "dead-replica", px=500)
    async with RedisMutexes(state, wait=5.0).hold(name):
        pass


async def test_redis_down_is_shared_state_unavailable_before_the_block() -> None:
    shared = RedisState.from_settings(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        with pytest.raises(SharedStateUnavailable):
            async with RedisMutexes(shared, wait=1.0).hold(fresh_name()):
                pytest.fail("ran without the lock")
    finally:
        await shared.close()
