"""A replica's memory of the tag entries it read from Redis, kept coherent by invalidation.

Owns the near-cache in front of `RedisTagIndex` (`proxy.storage.redis_indexes`): a
bounded LRU of entries per (tag hash key, tag), the invalidation channel
(`<redis.key_prefix>tag-invalidations`) and the one subscriber task per replica that
listens on it. A warm tag lookup is then answered from this process's memory instead of
one Redis round trip (an HGET), while the replicas still behave as one gate:

- Every write of an entry (`put`, `delete`) publishes a notice naming the hash key and the
  tag, inside the MULTI/EXEC of the write, so no write reaches Redis without its notice.
  Every replica (itself included) drops that entry when the notice arrives, and the
  writing replica drops it as soon as its write returns.
- Memory is used only while the subscription is known to be live: from its SUBSCRIBE
  confirmation until the connection fails, stops answering pings (`HEARTBEAT_INTERVAL`,
  then `PONG_TIMEOUT`) or is closed. Before that, and from a loss until the next
  confirmation, every lookup asks Redis, and the memory is cleared on the loss and again
  on the confirmation (notices may have been missed in between).
- A generation counter, bumped by every drop, loss and confirmation, keeps a lookup that
  started before a write from storing its older answer after that write's notice.

What the notices cannot tell: changes made without a notice. Redis restarted empty,
`FLUSHDB`, a tag hash expiring or evicted, a key edited by hand, and writes by a gate
version that does not publish (a rolling upgrade). A restart breaks the connection and
so clears the memory; for the others, an entry is kept at most `MAX_AGE` seconds after
it was read from Redis and is then read again, so such a change is seen within that
bound. Meanwhile the entry is what an upstream said at its `fetched_at`, as Redis said a
moment before, and its freshness (`tag_ttl`, `stale_limit`) is still decided from
`fetched_at` by the callers: an entry that expired in Redis is past `tag_ttl +
stale_limit` here too, and is revalidated, not served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from cachetools import TTLCache
from redis.asyncio.client import PubSub

from proxy.storage.manifest_cache import TagEntry
from proxy.storage.redis_client import SOCKET_TIMEOUT, RedisState

log = logging.getLogger(__name__)

# Entries a replica keeps (the same bound as the embedded index's memory).
ENTRIES = 65536
# Seconds an entry read from Redis may be answered from memory before it is read again:
# the bound on seeing what no notice announces (FLUSHDB, expiry, eviction, hand edits).
MAX_AGE = 10.0
# A subscription silent this long is pinged; one that does not answer within
# PONG_TIMEOUT is lost (a dead host or a dropped flow sends no end of stream).
HEARTBEAT_INTERVAL = 5.0
PONG_TIMEOUT = SOCKET_TIMEOUT
# The wait before subscribing again after a loss, doubling up to the second.
RESUBSCRIBE_FIRST = 0.1
RESUBSCRIBE_MAX = 5.0

CHANNEL = "tag-invalidations"

MemoryKey = tuple[str, str]


class SubscriptionLost(Exception):
    """The invalidation subscription stopped answering or was ended by Redis."""


def notice(key: str, tag: str) -> bytes:
    """The invalidation notice for `tag` in the tag hash `key`."""
    return json.dumps([key, tag]).encode()


def _read_notice(data: Any) -> MemoryKey | None:
    try:
        key, tag = json.loads(data)
    except (TypeError, ValueError):
        return None
    if not isinstance(key, str) or not isinstance(tag, str):
        return None
    return key, tag


class TagNearCache:
    """The replica-local memory of tag entries, used only while invalidations arrive."""

    def __init__(
        self,
        state: RedisState,
        *,
        entries: int = ENTRIES,
        max_age: float = MAX_AGE,
        heartbeat: float = HEARTBEAT_INTERVAL,
        pong_timeout: float = PONG_TIMEOUT,
    ) -> None:
        self._state = state
        self.channel = state.key(CHANNEL)
        self._memory: TTLCache[MemoryKey, TagEntry] = TTLCache(entries, max_age)
        self._heartbeat = heartbeat
        self._pong_timeout = pong_timeout
        self._generation = 0
        self._live = False
        self._task: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        """Whether the subscription is confirmed and unbroken (memory is in use)."""
        return self._live

    # -- the memory ---------------------------------------------------------------------

    def get(self, key: str, tag: str) -> TagEntry | None:
        """The entry kept for `tag` of the hash `key`, while the subscription is live."""
        if not self._live:
            return None
        return self._memory.get((key, tag))

    def ticket(self) -> int | None:
        """Taken before reading Redis, given back to `remember` with the answer; None
        while not live (the answer is then not kept)."""
        return self._generation if self._live else None

    def remember(self, key: str, tag: str, entry: TagEntry, ticket: int | None) -> None:
        """Keep `entry`, read from Redis since `ticket`, unless a notice, a local write or
        a loss came in between (it may then be older than what Redis holds)."""
        if ticket is not None and ticket == self._generation and self._live:
            self._memory[(key, tag)] = entry

    def drop(self, key: str, tag: str) -> None:
        """Forget `tag` of `key` (a notice, or this replica's own write)."""
        self._generation += 1
        self._memory.pop((key, tag), None)

    def _forget_all(self) -> None:
        self._generation += 1
        self._memory.clear()

    # -- the subscriber -----------------------------------------------------------------

    def start(self) -> None:
        """Start the subscriber task (memory is used once Redis confirms it)."""
        if self._task is None:
            self._task = asyncio.create_task(self._subscribe(), name="tag-invalidations")

    async def close(self) -> None:
        """Stop the subscriber and forget everything (idempotent)."""
        task, self._task = self._task, None
        self._lost()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _lost(self) -> None:
        self._live = False
        self._forget_all()

    async def _subscribe(self) -> None:
        delay = RESUBSCRIBE_FIRST
        while True:
            try:
                async with self._state.subscription() as pubsub:
                    await pubsub.subscribe(self.channel)
                    await self._listen(pubsub)
            except Exception as exc:  # any end of the subscription: memory off until back
                was_live = self._live
                self._lost()
                if was_live:
                    delay = RESUBSCRIBE_FIRST
                    log.warning(
                        "tag invalidations lost (%s: %s): tags are read from redis until "
                        "subscribed again",
                        type(exc).__name__,
                        exc,
                    )
                else:
                    log.debug("tag invalidations: cannot subscribe: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESUBSCRIBE_MAX)

    async def _listen(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged: float | None = None
        while True:
            deadline = heard + self._heartbeat if pinged is None else pinged + self._pong_timeout
            message = await pubsub.get_message(timeout=max(0.0, deadline - loop.time()))
            now = loop.time()
            if message is None:
                if now < deadline:
                    continue
                if pinged is not None:
                    raise SubscriptionLost(f"no answer to a ping within {self._pong_timeout} s")
                await pubsub.ping()
                pinged = now
                continue
            heard, pinged = now, None
            kind = message["type"]
            if kind == "message":
                self._notice(message["data"])
            elif kind == "subscribe":
                # From here on every write's notice reaches us; anything written before
                # is in Redis to be read. (A second confirmation would mean a reconnect
                # behind our back, with notices missed: forgotten all the same.)
                self._forget_all()
                if not self._live:
                    log.info("tag invalidations subscribed: warm tags are served from memory")
                self._live = True
            elif kind == "unsubscribe":
                raise SubscriptionLost("unsubscribed")

    def _notice(self, data: Any) -> None:
        named = _read_notice(data)
        if named is None:
            # Not ours to understand: whatever it meant to invalidate, nothing is kept.
            log.warning("ignoring an unreadable tag invalidation; forgetting every tag")
            self._forget_all()
            return
        self.drop(*named)
