"""`BlobLedger` shared by several replicas through Redis (see `ledger.py` for the model).

Keys, all under one hash tag so a script may touch them together:

    <p>{blob-ledger}:sizes   hash  digest -> size of each published blob
    <p>{blob-ledger}:lru     zset  digest -> last use (server time, microseconds)
    <p>{blob-ledger}:total   int   sum of sizes (kept by the same scripts)
    <p>{blob-ledger}:res     hash  reservation id -> bytes (f:... fills, d:... draining)
    <p>{blob-ledger}:exp     zset  reservation id -> expiry (server time, milliseconds)
    <p>{blob-ledger}:seeded  "1"   set by `seed`: absent means the ledger was never seeded
                                   or Redis lost it (restarted empty, flushed), and the
                                   store lists itself and seeds it again

Every decision that reads and changes the accounting is one Lua script, so Redis runs it
alone: two replicas cannot both take the last free bytes, and only one evictor chooses at
a time. Times come from the Redis server's clock, so replicas' clocks need not agree.

A reservation lives while its owner refreshes it (every third of `reservation_ttl`, for all
of this object's reservations in one call); a replica that dies stops refreshing, and its
fills' reservations, and the bytes of victims it was deleting, stop counting at expiry.

Hits are not a round trip each: `touched` records the digest in memory and a background
task applies the batch every `touch_interval` seconds (and before any eviction decision
of this replica), in one script call. The LRU order across replicas is therefore exact
to within that interval; a blob used only on another replica within the last interval
may look a little older than it is.

Every Redis failure (down, timing out, refusing) raises `LedgerUnavailable`, which the
stores turn into a degraded answer, never a failed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.storage.ledger import (
    CacheFull,
    Eviction,
    LedgerUnavailable,
    LedgerUsage,
    Reservation,
    no_eviction,
)

log = logging.getLogger(__name__)

# One call of the touch or seed script carries at most this many digests.
_BATCH = 1000
# Pending touches beyond this wake the flusher early.
_TOUCH_BACKLOG = 5000

_PRELUDE = """
local sizes, lru, total, res, exp = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

-- Reservations whose owner stopped refreshing them no longer count.
local function purge()
  local dead = redis.call('ZRANGEBYSCORE', exp, '-inf', now_ms)
  for _, id in ipairs(dead) do
    redis.call('HDEL', res, id)
    redis.call('ZREM', exp, id)
  end
end

local function reserved()
  local filling, draining = 0, 0
  local all = redis.call('HGETALL', res)
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 'd:' then
      draining = draining + tonumber(all[i + 1])
    else
      filling = filling + tonumber(all[i + 1])
    end
  end
  return filling, draining
end

local function used()
  purge()
  local filling, draining = reserved()
  return tonumber(redis.call('GET', total) or '0') + filling + draining
end

-- Least recently used first, skipping `skip`, until `excess` bytes are covered.
local function choose(excess, skip)
  local victims = {}
  local start = 0
  while excess > 0 do
    local page = redis.call('ZRANGE', lru, start, start + 255)
    if #page == 0 then break end
    for _, digest in ipairs(page) do
      if excess <= 0 then break end
      if not skip[digest] then
        local size = tonumber(redis.call('HGET', sizes, digest) or '0')
        victims[#victims + 1] = digest
        victims[#victims + 1] = size
        excess = excess - size
      end
    end
    start = start + 256
  end
  return victims, excess
end

-- Forget the victims; their bytes beyond `credit` (what the evicting fill reserved: it
-- writes only once they are deleted) drain under `drain_id` until the owner releases it.
local function drop(victims, drain_id, ttl, credit)
  local sum = 0
  for i = 1, #victims, 2 do
    redis.call('ZREM', lru, victims[i])
    redis.call('HDEL', sizes, victims[i])
    sum = sum + victims[i + 1]
  end
  if sum > 0 then
    redis.call('DECRBY', total, sum)
  end
  local drained = sum - credit
  if drained > 0 then
    redis.call('HSET', res, drain_id, drained)
    redis.call('ZADD', exp, now_ms + ttl, drain_id)
  end
  return math.max(drained, 0)
end

local function skipset(first)
  local skip = {}
  for i = first, #ARGV do skip[ARGV[i]] = true end
  return skip
end
"""

# ARGV: size, max_size, fill id, drain id, ttl ms, skip...
# -> {1, drained, digest, size, ...} reserved; {0, excess} CacheFull (nothing changed)
_RESERVE = (
    _PRELUDE
    + """
local size, max = tonumber(ARGV[1]), tonumber(ARGV[2])
local ttl = tonumber(ARGV[5])
local excess = used() + size - max
local victims = {}
if excess > 0 then
  victims, excess = choose(excess, skipset(6))
  if excess > 0 then return {0, excess} end
end
local drained = drop(victims, ARGV[4], ttl, size)
redis.call('HINCRBY', res, ARGV[3], size)
redis.call('ZADD', exp, now_ms + ttl, ARGV[3])
local out = {1, drained}
for i = 1, #victims do out[#out + 1] = victims[i] end
return out
"""
)

# ARGV: max_size, drain id, ttl ms, skip...  -> {over, drained, digest, size, ...}
_GC = (
    _PRELUDE
    + """
local excess = used() - tonumber(ARGV[1])
if excess <= 0 then return {0, 0} end
local victims
victims, excess = choose(excess, skipset(4))
local drained = drop(victims, ARGV[2], tonumber(ARGV[3]), 0)
local out = {math.max(excess, 0), drained}
for i = 1, #victims do out[#out + 1] = victims[i] end
return out
"""
)

# ARGV: digest, size, fill id ('' for none)
_PUBLISHED = (
    _PRELUDE
    + """
local old = redis.call('HGET', sizes, ARGV[1])
if old then redis.call('DECRBY', total, old) end
redis.call('HSET', sizes, ARGV[1], ARGV[2])
redis.call('INCRBY', total, ARGV[2])
redis.call('ZADD', lru, now_us, ARGV[1])
if ARGV[3] ~= '' then
  redis.call('HDEL', res, ARGV[3])
  redis.call('ZREM', exp, ARGV[3])
end
return 1
"""
)

# ARGV: digest, drain id ('' when the bytes are already gone), ttl ms -> size or nil
_FORGET = (
    _PRELUDE
    + """
local size = redis.call('HGET', sizes, ARGV[1])
if not size then return false end
redis.call('HDEL', sizes, ARGV[1])
redis.call('ZREM', lru, ARGV[1])
redis.call('DECRBY', total, size)
if ARGV[2] ~= '' and tonumber(size) > 0 then
  redis.call('HSET', res, ARGV[2], size)
  redis.call('ZADD', exp, now_ms + tonumber(ARGV[3]), ARGV[2])
end
return tonumber(size)
"""
)

# ARGV: digest... (in the order they were used; only digests still held move)
_TOUCH = (
    _PRELUDE
    + """
for i, digest in ipairs(ARGV) do
  redis.call('ZADD', lru, 'XX', now_us + i, digest)
end
return #ARGV
"""
)

# ARGV: ttl ms, id...: push back the expiry of reservations that still exist
_REFRESH = (
    _PRELUDE
    + """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  if redis.call('HEXISTS', res, ARGV[i]) == 1 then
    redis.call('ZADD', exp, now_ms + ttl, ARGV[i])
  end
end
return 1
"""
)

# KEYS[6]: the seeded marker; ARGV: digest, size, last use (microseconds), ...: add the
# unknown ones
_SEED = (
    _PRELUDE
    + """
for i = 1, #ARGV, 3 do
  if redis.call('HSETNX', sizes, ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('INCRBY', total, ARGV[i + 1])
    redis.call('ZADD', lru, ARGV[i + 2], ARGV[i])
  end
end
redis.call('SET', KEYS[6], '1')
return 1
"""
)

# -> {blobs, bytes, filling, draining}
_USAGE = (
    _PRELUDE
    + """
purge()
local filling, draining = reserved()
return {redis.call('HLEN', sizes), tonumber(redis.call('GET', total) or '0'), filling, draining}
"""
)

# -> {digest, size, ...} least recently used first
_ENTRIES = (
    _PRELUDE
    + """
local out = {}
for _, digest in ipairs(redis.call('ZRANGE', lru, 0, -1)) do
  out[#out + 1] = digest
  out[#out + 1] = tonumber(redis.call('HGET', sizes, digest) or '0')
end
return out
"""
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> list[tuple[str, int]]:
    return [(_text(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


@contextlib.contextmanager
def _asking() -> Iterator[None]:
    """Redis failures as the protocol's `LedgerUnavailable`."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise LedgerUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc


class RedisLedger:
    """`BlobLedger` in Redis, shared by every replica that uses the same `key_prefix`.

    The client is the caller's (opened and closed by it); `close` stops this object's
    background task only.
    """

    def __init__(
        self,
        client: Redis,
        *,
        key_prefix: str = "registry-gate:",
        reservation_ttl: float = 30.0,
        touch_interval: float = 1.0,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain braces (the ledger adds a hash tag)")
        if reservation_ttl <= 0 or touch_interval <= 0:
            raise ValueError("reservation_ttl and touch_interval must be positive")
        self._client = client
        base = f"{key_prefix}{{blob-ledger}}:"
        self._keys = [base + name for name in ("sizes", "lru", "total", "res", "exp")]
        self._marker = base + "seeded"
        self._ttl_ms = int(reservation_ttl * 1000)
        self._refresh_every = reservation_ttl / 3
        self._touch_interval = touch_interval
        self._scripts = {
            name: client.register_script(text)
            for name, text in (
                ("reserve", _RESERVE),
                ("gc", _GC),
                ("published", _PUBLISHED),
                ("forget", _FORGET),
                ("touch", _TOUCH),
                ("refresh", _REFRESH),
                ("seed", _SEED),
                ("usage", _USAGE),
                ("entries", _ENTRIES),
            )
        }
        self._owner = uuid.uuid4().hex[:16]
        self._ids = itertools.count(1)
        # Reservations of this object, refreshed while they live.
        self._owned: dict[str, Reservation] = {}
        self._touches: OrderedDict[str, None] = OrderedDict()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    # -- background: touches and reservation refresh ---------------------------------------

    def _ensure_worker(self) -> None:
        if self._worker is None and not self._closed:
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        interval = min(self._touch_interval, self._refresh_every)
        next_refresh = time.monotonic() + self._refresh_every
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self._flush()
                if time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + self._refresh_every
                    await self._refresh()
            except (RedisError, OSError) as exc:
                # Redis away: touches are lost (order only), reservations may expire
                # (the cap counts less for a while). Both heal when Redis is back.
                log.warning("blob ledger: redis unavailable: %s", exc)

    async def _flush(self) -> None:
        while self._touches:
            batch = list(itertools.islice(self._touches, _BATCH))
            for digest in batch:
                del self._touches[digest]
            await self._scripts["touch"](keys=self._keys, args=batch)

    async def _refresh(self) -> None:
        ids = [r.id for r in self._owned.values()]
        for start in range(0, len(ids), _BATCH):
            await self._scripts["refresh"](
                keys=self._keys, args=[self._ttl_ms, *ids[start : start + _BATCH]]
            )

    def _new(self, *, draining: bool) -> Reservation:
        kind = "d" if draining else "f"
        return Reservation(f"{kind}:{self._owner}:{next(self._ids)}", 0, draining)

    def _eviction(self, reply: Sequence[Any], draining: Reservation, over: int = 0) -> Eviction:
        """From a script's {status, drained, digest, size, ...}."""
        draining.size = int(reply[1])
        if draining.size:
            self._owned[draining.id] = draining
        return Eviction(_pairs(reply[2:]), draining, over)

    # -- BlobLedger ------------------------------------------------------------------------

    async def seed(self, entries: Iterable[tuple[str, int, float]]) -> None:
        keys = [*self._keys, self._marker]
        args: list[str | int] = []
        with _asking():
            for digest, size, used in entries:
                args += [digest, size, int(used * 1_000_000)]
                if len(args) >= 3 * _BATCH:
                    await self._scripts["seed"](keys=keys, args=args)
                    args = []
            # Also with nothing left: the last call sets the marker.
            await self._scripts["seed"](keys=keys, args=args)

    async def seeded(self) -> bool:
        with _asking():
            return bool(await self._client.exists(self._marker))

    async def size_of(self, digest: str) -> int | None:
        with _asking():
            value = await self._client.hget(self._keys[0], digest)
        return None if value is None else int(value)

    def touched(self, digest: str) -> None:
        self._touches[digest] = None
        self._touches.move_to_end(digest)
        if len(self._touches) >= _TOUCH_BACKLOG:
            self._wake.set()
        with contextlib.suppress(RuntimeError):  # no running loop: applied on next call
            self._ensure_worker()

    async def entries(self) -> list[tuple[str, int]]:
        with _asking():
            await self._flush()
            return _pairs(await self._scripts["entries"](keys=self._keys))

    async def reserve(
        self,
        size: int,
        *,
        max_size: int,
        skip: Collection[str] = (),
        reservation: Reservation | None = None,
    ) -> tuple[Reservation, Eviction]:
        if reservation is None:
            reservation = self._new(draining=False)
        if size <= 0:
            return reservation, no_eviction()
        if size > max_size:
            raise CacheFull(f"{size} bytes exceed the cache cap of {max_size}", never=True)
        self._ensure_worker()
        draining = self._new(draining=True)
        with _asking():
            # This replica's recent hits count before anything is chosen.
            await self._flush()
            reply = await self._scripts["reserve"](
                keys=self._keys,
                args=[size, max_size, reservation.id, draining.id, self._ttl_ms, *skip],
            )
        if int(reply[0]) == 0:
            raise CacheFull(f"no room for {size} bytes: the rest of the cache is in use")
        reservation.size += size
        self._owned[reservation.id] = reservation
        return reservation, self._eviction(reply, draining)

    async def release(self, reservation: Reservation) -> None:
        self._owned.pop(reservation.id, None)
        if not reservation.size:
            return
        with _asking():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hdel(self._keys[3], reservation.id)
                pipe.zrem(self._keys[4], reservation.id)
                await pipe.execute()

    async def published(
        self, digest: str, size: int, reservation: Reservation | None = None
    ) -> None:
        fill_id = ""
        if reservation is not None:
            self._owned.pop(reservation.id, None)
            fill_id = reservation.id
        self._touches.pop(digest, None)
        with _asking():
            await self._scripts["published"](keys=self._keys, args=[digest, size, fill_id])

    async def forget(self, digest: str, *, gone: bool = False) -> Eviction | None:
        draining = self._new(draining=True)
        with _asking():
            size = await self._scripts["forget"](
                keys=self._keys, args=[digest, "" if gone else draining.id, self._ttl_ms]
            )
        if size is None:
            return None
        self._touches.pop(digest, None)
        if gone:
            return Eviction([(digest, int(size))], Reservation("", 0, draining=True))
        self._ensure_worker()
        return self._eviction([1, size, digest, size], draining)

    async def victims_for_gc(self, *, max_size: int, skip: Collection[str] = ()) -> Eviction:
        self._ensure_worker()
        draining = self._new(draining=True)
        with _asking():
            await self._flush()
            reply = await self._scripts["gc"](
                keys=self._keys, args=[max_size, draining.id, self._ttl_ms, *skip]
            )
        return self._eviction(reply, draining, int(reply[0]))

    async def usage(self) -> LedgerUsage:
        with _asking():
            blobs, total, filling, draining = await self._scripts["usage"](keys=self._keys)
        return LedgerUsage(int(blobs), int(total), int(filling), int(draining))

    async def close(self) -> None:
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        with contextlib.suppress(RedisError, OSError):
            await self._flush()
