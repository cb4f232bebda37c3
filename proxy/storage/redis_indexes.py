"""The tag and repository indexes in Redis, shared by every replica of a gate.

Implements `TagIndex` and `RepositoryIndex` (`proxy.storage.manifest_cache`) with the same
semantics as the embedded SQLite ones, so a tag one replica revalidated is fresh on all,
and a digest one replica confirmed for a repository is held for all. Keys (under
`redis.key_prefix`):

- `tags:<registry>/<repository>`: hash, tag -> `{"d": digest, "m": media type,
  "t": fetched_at}` (one hash per repository, so a tag list is one HKEYS), expiring
  `tag_ttl + stale_limit` after its last write;
- `held:<digest>`: set of `<registry>/<repository>` known to hold the digest;
- `digests:<registry>/<repository>`: set of the digests a repository holds (the reverse
  of `held:`, for protecting a pinned repository's blobs).

A replica answers warm tag lookups from its own memory while it receives the
invalidation notices every tag write publishes (`proxy.storage.redis_near_cache`: the
coherence rule and its bound are there); `start` and `close` run that subscription.

`forget(digest)` reads `held:<digest>` and removes the digest from each of those
repositories' sets in one optimistic transaction (WATCH), so it costs one round trip per
repository that held it, not a scan.

Both indexes are accelerators: what they say can always be asked of the upstream again.
So when Redis cannot answer (`SharedStateUnavailable`, counted by `RedisState`) they
degrade instead of failing the request: a tag lookup is a miss (the upstream is asked), a
repository check is "not known" (the upstream is asked with a HEAD), and writes are
dropped. Nothing they hold is trusted beyond that: a digest read back is re-validated, and
an entry that does not parse is a miss.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from cachetools import TTLCache
from redis.asyncio.client import Pipeline

from proxy.names.references import Repository, validate_digest
from proxy.storage.manifest_cache import TagEntry
from proxy.storage.redis_client import RedisState, SharedStateUnavailable
from proxy.storage.redis_near_cache import TagNearCache, notice

log = logging.getLogger(__name__)

HELD_MEMORY_ENTRIES = 65536
HELD_MEMORY_SECONDS = 30.0


def _repository_key(repository: Repository) -> str:
    return f"{repository.registry}/{repository.path}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _encode_tag(entry: TagEntry) -> bytes:
    return json.dumps({"d": entry.digest, "m": entry.media_type, "t": entry.fetched_at}).encode()


def _decode_tag(raw: bytes | str | None) -> TagEntry | None:
    if raw is None:
        return None
    try:
        document = json.loads(raw)
        entry = TagEntry(
            validate_digest(str(document["d"])), str(document["m"]), float(document["t"])
        )
    except Exception as exc:  # whatever is in Redis: not an entry is a miss
        log.warning("ignoring an unreadable tag entry in redis: %s", exc)
        return None
    return entry


class RedisTagIndex:
    """`TagIndex` in Redis: one hash per repository, recent entries in this replica's
    memory while the invalidation subscription is live (`start`)."""

    STORE = "tags"

    def __init__(
        self,
        state: RedisState,
        *,
        expire_after: float | None = None,
        near: TagNearCache | None = None,
    ) -> None:
        self._state = state
        # Entries older than tag_ttl + stale_limit are never served: a repository whose
        # tags nobody asked for that long leaves Redis (every put renews its hash).
        self._expire_after = None if expire_after is None else max(1, math.ceil(expire_after))
        self.near = near or TagNearCache(state)

    def start(self) -> None:
        """Subscribe to the invalidations (until then, and without it, every lookup asks
        Redis)."""
        self.near.start()

    async def close(self) -> None:
        """End the subscription (the Redis client is its owner's to close)."""
        await self.near.close()

    def _key(self, repository: Repository) -> str:
        return self._state.key("tags", _repository_key(repository))

    async def get(self, repository: Repository, tag: str) -> TagEntry | None:
        key = self._key(repository)
        entry = self.near.get(key, tag)
        if entry is not None:
            return entry
        ticket = self.near.ticket()
        client = self._state.client
        try:
            raw = await self._state.call(self.STORE, lambda: client.hget(key, tag))
        except SharedStateUnavailable:
            return None  # a miss: the upstream is asked
        entry = _decode_tag(raw)
        if entry is not None:
            self.near.remember(key, tag, entry, ticket)
        return entry

    async def put(self, repository: Repository, tag: str, entry: TagEntry) -> TagEntry | None:
        validate_digest(entry.digest)
        key = self._key(repository)

        async def swap() -> list[Any]:
            # MULTI/EXEC: the previous entry, the new one and the notice to every replica,
            # atomically, in one round trip.
            async with self._state.client.pipeline(transaction=True) as pipe:
                pipe.hget(key, tag)
                pipe.hset(key, tag, _encode_tag(entry))
                if self._expire_after is not None:
                    pipe.expire(key, self._expire_after)
                pipe.publish(self.near.channel, notice(key, tag))
                return await pipe.execute()

        try:
            previous = (await self._write(key, tag, swap))[0]
        except SharedStateUnavailable:
            return None  # not shared this time: the next request asks the upstream again
        return _decode_tag(previous)

    async def delete(self, repository: Repository, tag: str) -> bool:
        key = self._key(repository)

        async def remove() -> list[Any]:
            async with self._state.client.pipeline(transaction=True) as pipe:
                pipe.hdel(key, tag)
                pipe.publish(self.near.channel, notice(key, tag))
                return await pipe.execute()

        try:
            removed = (await self._write(key, tag, remove))[0]
        except SharedStateUnavailable:
            return False
        return bool(removed)

    async def _write(
        self, key: str, tag: str, operation: Callable[[], Awaitable[list[Any]]]
    ) -> list[Any]:
        # Dropped once the write is done (or failed, perhaps after EXEC), which also bumps
        # the generation: a lookup that read the old entry meanwhile is not kept, so the
        # replica reads its own write without waiting for its own notice.
        try:
            return await self._state.call(self.STORE, operation)
        finally:
            self.near.drop(key, tag)

    async def tags(self, repository: Repository) -> list[str]:
        client = self._state.client
        try:
            names = await self._state.call(self.STORE, lambda: client.hkeys(self._key(repository)))
        except SharedStateUnavailable:
            return []
        return sorted(_text(name) for name in names)


class RedisRepositoryIndex:
    """`RepositoryIndex` in Redis: a set of holders per digest, a set of digests per
    repository."""

    STORE = "repositories"

    def __init__(
        self,
        state: RedisState,
        *,
        memory_entries: int = HELD_MEMORY_ENTRIES,
        memory_seconds: float = HELD_MEMORY_SECONDS,
    ) -> None:
        self._state = state
        # Recent "yes" answers, so a layer pulled again costs no round trip. Only briefly:
        # another replica's forget (its eviction) is seen here once they expire.
        self._memory: TTLCache[str, frozenset[Repository]] = TTLCache(
            memory_entries, memory_seconds
        )

    def _held(self, digest: str) -> str:
        return self._state.key("held", digest)

    def _digests(self, repository: Repository | str) -> str:
        name = repository if isinstance(repository, str) else _repository_key(repository)
        return self._state.key("digests", name)

    async def record(self, repository: Repository, digests: Iterable[str]) -> None:
        wanted = sorted({validate_digest(digest) for digest in digests})
        if not wanted:
            return
        member = _repository_key(repository)

        async def add() -> list[Any]:
            async with self._state.client.pipeline(transaction=True) as pipe:
                for digest in wanted:
                    pipe.sadd(self._held(digest), member)
                pipe.sadd(self._digests(repository), *wanted)
                return await pipe.execute()

        # Not remembered when Redis is down: the next request confirms with the upstream.
        with contextlib.suppress(SharedStateUnavailable):
            await self._state.call(self.STORE, add)

    async def holds(self, repository: Repository, digest: str) -> bool:
        if repository in self._memory.get(digest, frozenset()):
            return True
        client = self._state.client
        member = _repository_key(repository)
        try:
            found = await self._state.call(
                self.STORE, lambda: client.sismember(self._held(digest), member)
            )
        except SharedStateUnavailable:
            return False  # not known: the upstream is asked (a HEAD), as on a cold cache
        if found:
            self._memory[digest] = self._memory.get(digest, frozenset()) | {repository}
        return bool(found)

    async def digests(self, repository: Repository) -> list[str]:
        client = self._state.client
        try:
            members = await self._state.call(
                self.STORE, lambda: client.smembers(self._digests(repository))
            )
        except SharedStateUnavailable:
            return []
        return sorted(_text(member) for member in members)

    async def forget(self, digest: str) -> None:
        self._memory.pop(digest, None)
        held = self._held(digest)

        async def remove(pipe: Pipeline) -> None:
            # WATCHed: a repository recorded between the read and EXEC retries the whole.
            holders = await pipe.smembers(held)
            pipe.multi()  # type: ignore[no-untyped-call]
            for holder in holders:
                pipe.srem(self._digests(_text(holder)), digest)
            pipe.delete(held)

        try:
            await self._state.call(self.STORE, lambda: self._state.client.transaction(remove, held))
        except SharedStateUnavailable:
            # Still "held": only a fact about the upstream that may have gone stale, and a
            # blob no longer cached is fetched from that repository's upstream anyway.
            log.warning("could not forget %s in redis", digest)
