"""Mutual exclusion across replicas, in Redis, for read-modify-writes of upstream state.

Owns `RedisMutexes`: `async with mutexes.hold(name):` runs its block while no other
replica of the gate (sharing `redis.key_prefix`) runs a block under the same name. The
lock is `<prefix>mutex:<name>`, taken with `SET NX PX` under a random token (redis-py's
`Lock`, whose Lua scripts release only what the token still holds) and renewed while the
block runs, so a long block keeps it and a replica that dies loses it within `lease`
seconds. Taking it waits at most `wait` seconds.

Used where the upstream offers no conditional write: the referrers tag schema of an
upstream without the referrers API is read, extended and written back, and two replicas
doing that at once would drop one referrer. When Redis cannot be asked, or the lock is not
free within `wait`, `hold` raises `SharedStateUnavailable` before the block runs: the
caller decides what to do without the exclusion (the referrers path leaves the tag to the
client, as the spec has clients do for registries that do not keep it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError

from proxy.storage.redis_client import RedisState, SharedStateUnavailable

log = logging.getLogger(__name__)

STORE = "mutexes"
# A holder renews every third of this; a dead holder's lock is free after at most this.
LEASE_SECONDS = 15.0
# Longest wait for a lock another replica holds (a referrers update takes two upstream
# requests; a queue of them behind a slow upstream is what this bounds).
WAIT_SECONDS = 60.0


class RedisMutexes:
    """Named locks shared by every replica of one gate."""

    def __init__(
        self, state: RedisState, *, lease: float = LEASE_SECONDS, wait: float = WAIT_SECONDS
    ) -> None:
        self._state = state
        self.lease = lease
        self.wait = wait

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        """Run the block holding the lock `name`; SharedStateUnavailable (before the
        block) when Redis cannot be asked or the lock stays taken past `wait`."""
        lock = Lock(
            self._state.client,
            self._state.key("mutex", name),
            timeout=self.lease,
            blocking=True,
            blocking_timeout=self.wait,
            thread_local=False,
        )
        # The whole wait is one call: Redis failing while we wait is a failure to take it.
        acquired = await self._state.call(STORE, lock.acquire)
        if not acquired:
            raise SharedStateUnavailable(f"the lock {name} is still held after {self.wait:g} s")
        async with renewed(lock, self.lease, f"the lock {name}"):
            yield


@contextlib.asynccontextmanager
async def renewed(lock: Lock, lease: float, what: str) -> AsyncIterator[None]:
    """Keep an acquired `lock` while the block runs (renewed every third of `lease`),
    then release it. Failures to renew or release are logged, not raised: the lock then
    expires on its own within `lease`, and the block goes on (`what` names it in logs)."""
    renewal = asyncio.create_task(_renew(lock, lease, what), name=f"renew {what}")
    try:
        yield
    finally:
        renewal.cancel()
        # Not `await renewal`: its CancelledError must not pass for this task's own.
        await asyncio.wait([renewal])
        try:
            await lock.release()
        except (LockError, RedisError, OSError) as exc:
            log.warning("could not release %s: %s", what, exc)


async def _renew(lock: Lock, lease: float, what: str) -> None:
    while True:
        await asyncio.sleep(lease / 3)
        try:
            await lock.reacquire()
        except LockError:
            log.warning("%s was lost (Redis restarted, or a pause past %.1f s)", what, lease)
            return
        except (RedisError, OSError) as exc:
            # Tried again next period; the lock may expire meanwhile.
            log.warning("could not renew %s: %s", what, exc)
