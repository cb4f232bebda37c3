"""The blob cache's accounting: what it holds, in which LRU order, and what to evict.

Owns the `BlobLedger` protocol and its one-process implementation `MemoryLedger` (the
shared one, `RedisLedger`, is in `redis_ledger.py`). A ledger knows sizes and order, never
bytes: a store (filesystem, S3) asks it for room before a fill writes, tells it what it
published, and deletes the bytes of the victims the ledger chose and already forgot.

What counts against the cap (`LedgerUsage.used`):

- published blobs (`bytes`);
- reservations of fills in progress (`filling`): taken before the first byte is written,
  grown as a fill of unknown size goes, turned into the published blob by `published`;
- evicted or deleted blobs whose bytes the store has not removed yet (`draining`): the
  ledger forgets a victim at once (no reader finds it again) but keeps counting its bytes
  in a draining reservation until the store `release`s it, so no fill takes the space
  before it is really free. Victims evicted by a `reserve` drain only beyond the bytes
  that reserve took: the store deletes them (and releases the draining reservation)
  before the fill writes, so a victim and the fill replacing it are never on the storage
  together, and counting both would evict twice.

A store's fill, in order:

    reservation, eviction = await ledger.reserve(expected, max_size=cap, skip=leased|pinned)
    ...delete the bytes of eviction.victims...; await ledger.release(eviction.draining)
    ...write (growing: reserve(more, ..., reservation=reservation), same steps)...
    await ledger.published(digest, size, reservation)   # or release(reservation) on abort

and a hit is `size_of(digest)` then `touched(digest)`.

A shared ledger raises `LedgerUnavailable` when it cannot be asked; the store degrades
(see that exception), it never turns it into a failed request.

The reserve decision (fits? which least-recently-used blobs not in `skip` go?) is atomic
in each implementation: all or nothing, `CacheFull` evicting nothing when the room cannot
be made. `skip` is the caller's (leased and pinned digests): the ledger does not know
leases, so a lease protects only against the evictions its own process asks for.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Protocol


class LedgerUnavailable(Exception):
    """The ledger could not be asked (a shared ledger's Redis is down or timing out).

    A store degrades rather than fails: a hit is looked up in the storage itself, a fill
    that cannot reserve is not cached (the blob is relayed), and what could not be
    recorded heals when the ledger answers again (reservations expire, unknown blobs are
    adopted when met, an emptied ledger is seeded again)."""


class CacheFull(Exception):
    """A fill cannot fit under the cap: what could be evicted is not enough (the rest is
    leased, pinned or being filled), or (`never`) the blob is larger than the cap itself."""

    def __init__(self, message: str, *, never: bool = False) -> None:
        super().__init__(message)
        self.never = never


@dataclass(eq=False, slots=True)
class Reservation:
    """Bytes counted against the cap that are not a published blob: a fill in progress
    (grown by `reserve(..., reservation=r)`), or evicted blobs still being deleted
    (`draining`). Ended by `release`, or for a fill by `published`."""

    id: str
    size: int = 0
    draining: bool = False


@dataclass(frozen=True, slots=True)
class Eviction:
    """Blobs the ledger forgot; the caller deletes their bytes, then releases `draining`
    (it holds their bytes against the cap until then)."""

    victims: list[tuple[str, int]]
    """(digest, size), least recently used first."""
    draining: Reservation
    """Their bytes still counted (for a `reserve`: beyond what it reserved)."""
    over: int = 0
    """Bytes still over the cap after `victims_for_gc` (the rest is skipped or reserved)."""


@dataclass(frozen=True, slots=True)
class LedgerUsage:
    """What the ledger counts now."""

    blobs: int
    bytes: int
    """Published blobs."""
    filling: int
    """Reserved by fills in progress."""
    draining: int
    """Forgotten blobs whose bytes are still being deleted."""

    @property
    def reserved(self) -> int:
        return self.filling + self.draining

    @property
    def used(self) -> int:
        """What the cap bounds."""
        return self.bytes + self.filling + self.draining


class BlobLedger(Protocol):
    """Sizes, LRU order and reservations of one blob cache (one process or shared)."""

    async def seed(self, entries: Iterable[tuple[str, int, float]]) -> None:
        """Add (digest, size, last use as epoch seconds) found in a listing of the store,
        at start. Digests the ledger already knows keep their size and order, so every
        replica may seed a shared ledger."""
        ...

    async def seeded(self) -> bool:
        """Whether the ledger has been seeded from a listing of the store. False for a new
        ledger, and for a shared one whose state was lost (Redis restarted empty): the
        store then lists and seeds it again."""
        ...

    async def size_of(self, digest: str) -> int | None:
        """The size of a published blob, or None when the cache does not hold it."""
        ...

    def touched(self, digest: str) -> None:
        """`digest` was just used (a hit): it becomes the most recently used. Cheap and
        synchronous; a shared ledger may apply it a moment later."""
        ...

    async def entries(self) -> list[tuple[str, int]]:
        """Every published (digest, size), least recently used first."""
        ...

    async def reserve(
        self,
        size: int,
        *,
        max_size: int,
        skip: Collection[str] = (),
        reservation: Reservation | None = None,
    ) -> tuple[Reservation, Eviction]:
        """Count `size` more bytes of a fill (a new reservation, or grow `reservation`),
        evicting least-recently-used blobs not in `skip` to make room, atomically.
        CacheFull, with nothing evicted or reserved, when it cannot fit; `never=True` when
        `size` alone exceeds `max_size`. The caller deletes the victims and releases the
        eviction's `draining` before writing the reserved bytes."""
        ...

    async def release(self, reservation: Reservation) -> None:
        """Stop counting a reservation (fill aborted, or the victims' bytes are gone)."""
        ...

    async def published(
        self, digest: str, size: int, reservation: Reservation | None = None
    ) -> None:
        """`digest` is now a published blob of `size` bytes (replacing any entry for it)
        and the most recently used; its fill's `reservation` ends."""
        ...

    async def forget(self, digest: str, *, gone: bool = False) -> Eviction | None:
        """Forget a published blob (deleted, or found missing); None when unknown. Its
        bytes drain until released, unless `gone` (already off the storage)."""
        ...

    async def victims_for_gc(self, *, max_size: int, skip: Collection[str] = ()) -> Eviction:
        """Forget least-recently-used blobs not in `skip` until usage is under
        `max_size` (as far as it can)."""
        ...

    async def usage(self) -> LedgerUsage:
        """Counts for stats, metrics and tests."""
        ...

    async def close(self) -> None:
        """Stop background work (reservations of this process are left to expire or to
        their owners)."""
        ...


def no_eviction() -> Eviction:
    """An eviction of nothing (its draining reservation is empty; releasing it is free)."""
    return Eviction([], Reservation("", 0, draining=True))


class MemoryLedger:
    """`BlobLedger` of one process. No method suspends: each is atomic in its event loop."""

    def __init__(self) -> None:
        # Least recently used first.
        self._index: OrderedDict[str, int] = OrderedDict()
        self._total = 0
        self._reservations: dict[str, Reservation] = {}
        self._ids = itertools.count(1)
        self._seeded = False

    def _new(self, size: int, *, draining: bool = False) -> Reservation:
        reservation = Reservation(f"{'d' if draining else 'f'}{next(self._ids)}", size, draining)
        if size:
            self._reservations[reservation.id] = reservation
        return reservation

    def _usage(self) -> LedgerUsage:
        filling = draining = 0
        for reservation in self._reservations.values():
            if reservation.draining:
                draining += reservation.size
            else:
                filling += reservation.size
        return LedgerUsage(len(self._index), self._total, filling, draining)

    def _drop(self, victims: list[tuple[str, int]], credit: int = 0) -> Eviction:
        for digest, size in victims:
            del self._index[digest]
            self._total -= size
        drained = max(sum(s for _, s in victims) - credit, 0)
        return Eviction(victims, self._new(drained, draining=True))

    def _choose(self, excess: int, skip: Collection[str]) -> tuple[list[tuple[str, int]], int]:
        victims: list[tuple[str, int]] = []
        for digest, size in self._index.items():
            if excess <= 0:
                break
            if digest in skip:
                continue
            victims.append((digest, size))
            excess -= size
        return victims, excess

    async def seed(self, entries: Iterable[tuple[str, int, float]]) -> None:
        fresh = sorted(
            (used, digest, size) for digest, size, used in entries if digest not in self._index
        )
        # Unknown blobs are older than anything this process has used.
        known = list(self._index.items())
        self._index = OrderedDict((digest, size) for _, digest, size in fresh)
        self._index.update(known)
        self._total += sum(size for _, _, size in fresh)
        self._seeded = True

    async def seeded(self) -> bool:
        return self._seeded

    async def size_of(self, digest: str) -> int | None:
        return self._index.get(digest)

    def touched(self, digest: str) -> None:
        if digest in self._index:
            self._index.move_to_end(digest)

    async def entries(self) -> list[tuple[str, int]]:
        return list(self._index.items())

    async def reserve(
        self,
        size: int,
        *,
        max_size: int,
        skip: Collection[str] = (),
        reservation: Reservation | None = None,
    ) -> tuple[Reservation, Eviction]:
        if reservation is None:
            reservation = self._new(0)
        if size <= 0:
            return reservation, no_eviction()
        if size > max_size:
            raise CacheFull(f"{size} bytes exceed the cache cap of {max_size}", never=True)
        excess = self._usage().used + size - max_size
        victims: list[tuple[str, int]] = []
        if excess > 0:
            skipped = skip if isinstance(skip, (set, frozenset, dict)) else frozenset(skip)
            victims, excess = self._choose(excess, skipped)
            if excess > 0:
                raise CacheFull(f"no room for {size} bytes: the rest of the cache is in use")
        reservation.size += size
        self._reservations[reservation.id] = reservation
        return reservation, self._drop(victims, credit=size)

    async def release(self, reservation: Reservation) -> None:
        self._reservations.pop(reservation.id, None)

    async def published(
        self, digest: str, size: int, reservation: Reservation | None = None
    ) -> None:
        old = self._index.pop(digest, None)
        if old is not None:
            self._total -= old
        self._index[digest] = size
        self._total += size
        if reservation is not None:
            self._reservations.pop(reservation.id, None)

    async def forget(self, digest: str, *, gone: bool = False) -> Eviction | None:
        size = self._index.get(digest)
        if size is None:
            return None
        eviction = self._drop([(digest, size)])
        if gone:
            await self.release(eviction.draining)
        return eviction

    async def victims_for_gc(self, *, max_size: int, skip: Collection[str] = ()) -> Eviction:
        excess = self._usage().used - max_size
        if excess <= 0:
            return no_eviction()
        skipped = skip if isinstance(skip, (set, frozenset, dict)) else frozenset(skip)
        victims, excess = self._choose(excess, skipped)
        eviction = self._drop(victims)
        return Eviction(eviction.victims, eviction.draining, max(excess, 0))

    async def usage(self) -> LedgerUsage:
        return self._usage()

    async def close(self) -> None:
        return None
