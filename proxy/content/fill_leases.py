"""Fill leases in Redis: which replica fetches a digest from upstream, across replicas.

Owns the Redis side of single-flight across replicas. A replica about to fill a digest
claims `<redis.key_prefix>fill:<digest>` with `SET NX PX` (redis-py's `Lock`, whose Lua
scripts renew and release only what the token still holds). The token says who holds
the lease: the replica's id, the URL other replicas reach it at, and a random nonce (a
replica restarted under the same id is not its former self). While the fill runs the
holder renews the lease every third of its duration; it releases it when the fill ends.
A holder that dies stops renewing, so its lease is gone at most `duration` seconds after
its last renewal: that is the bound within which another replica takes over.

Redis errors surface as `LeasesUnavailable`; the caller then fills on its own (losing
Redis loses the single flight across replicas, not correctness). A lease lost while
filling (Redis restarted empty, or a pause longer than the lease) is logged and the fill
goes on: the content is verified either way, at worst a second replica fetches it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import RedisError

from proxy.storage.redis_mutex import renewed

log = logging.getLogger(__name__)

# Redis answers in microseconds; a Redis that takes seconds is as good as down here.
REDIS_TIMEOUT = 2.0


class LeasesUnavailable(Exception):
    """Redis could not be asked (down, timing out, refusing): no lease either way."""


@dataclass(frozen=True, slots=True)
class LeaseOwner:
    """Who holds a fill lease, as its token says."""

    replica: str
    url: str
    nonce: str

    def token(self) -> str:
        return json.dumps({"replica": self.replica, "url": self.url, "nonce": self.nonce})

    @classmethod
    def parse(cls, token: bytes | str) -> LeaseOwner | None:
        """The owner a token names, or None for a token this code did not write."""
        try:
            data = json.loads(token)
            owner = cls(str(data["replica"]), str(data["url"]), str(data["nonce"]))
        except (ValueError, TypeError, KeyError):
            return None
        parts = urlsplit(owner.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        return owner


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of claiming a digest: held by us (`held`), or by `owner`."""

    held: bool
    owner: LeaseOwner | None = None
    """The holder's token parsed, when another replica holds it (None: unreadable)."""
    token: bytes | None = None
    """The holder's raw token (to tell when it changes)."""


class FillLeases:
    """Claims, renews and releases the fill lease of a digest for this replica."""

    def __init__(
        self,
        redis: Redis,
        replica: str,
        url: str,
        duration: float,
        key_prefix: str = "registry-gate:",
    ) -> None:
        self._key_prefix = key_prefix + "fill:"
        self._redis = redis
        self.me = LeaseOwner(replica, url, secrets.token_hex(8))
        self.duration = duration

    def _key(self, digest: str) -> str:
        return self._key_prefix + digest

    @contextlib.asynccontextmanager
    async def claim(self, digest: str) -> AsyncIterator[Claim]:
        """Claim the fill of `digest`. When held, the lease is renewed while the block
        runs and released when it ends; otherwise the block learns who holds it.

        Raises LeasesUnavailable when Redis cannot be asked (on entry only: a failure
        to renew or release is logged, the lease then expires on its own)."""
        lock = Lock(
            self._redis,
            self._key(digest),
            timeout=self.duration,
            blocking=False,
            thread_local=False,
        )
        try:
            held = await lock.acquire(token=self.me.token())
        except (RedisError, OSError) as exc:
            raise LeasesUnavailable(str(exc)) from exc
        if not held:
            holder = await self.holder(digest)
            if holder is None:
                # Released between the SET and the GET: the fill just ended elsewhere.
                yield Claim(held=False)
            else:
                yield Claim(held=False, owner=LeaseOwner.parse(holder), token=holder)
            return
        # A lost lease is logged and the fill goes on: the content is verified either
        # way, at worst another replica fetches the blob too.
        async with renewed(lock, self.duration, f"the fill lease of {digest}"):
            yield Claim(held=True, owner=self.me)

    async def holder(self, digest: str) -> bytes | None:
        """The raw token holding `digest`'s lease now (None: free). LeasesUnavailable."""
        try:
            value = await self._redis.get(self._key(digest))
        except (RedisError, OSError) as exc:
            raise LeasesUnavailable(str(exc)) from exc
        return value if isinstance(value, bytes) else None

    async def wait_changed(self, digest: str, token: bytes | None) -> bool:
        """Wait until `digest`'s lease is no longer held by `token` (released, expired or
        taken by another), for at most the lease duration and a little more: longer, and
        the holder is alive, renewing. True if it changed. LeasesUnavailable."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.duration * 1.5
        interval = min(0.2, self.duration / 10)
        while True:
            if await self.holder(digest) != token:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(interval)
