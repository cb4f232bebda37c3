"""Keeping a blob store under its byte cap: the store-side half of the accounting, the
same for every backend (filesystem, S3).

Owns `CapKeeper`: this process's leases (blobs being filled or read, which it never
evicts), the set a reservation or a `gc` pass skips (leased and `protected`, i.e.
pinned), a fill's reserve-with-eviction and the `gc` pass, each under one eviction lock,
and telling the `EvictHook` what went. The `BlobLedger` (proxy/storage/ledger.py) decides
sizes and victims; the store, through its `remove` callback, deletes the victims' bytes
(files, objects) and releases their draining reservation. What differs per store (its
bytes, and how it degrades when a shared ledger cannot be asked) stays in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection

from proxy.storage.ledger import BlobLedger, Eviction, Reservation

log = logging.getLogger(__name__)

# Told about each evicted blob (digest, size): metrics, and forgetting which repositories
# held it. May be a coroutine function.
EvictHook = Callable[[str, int], Awaitable[None] | None]


class CapKeeper:
    """Leases, reservations with eviction, and `gc` for one blob store over its ledger."""

    def __init__(
        self,
        ledger: BlobLedger,
        max_size: int,
        *,
        remove: Callable[[Eviction], Awaitable[None]],
        protected: Callable[[], Collection[str]] | None = None,
        on_evict: EvictHook | None = None,
        unleased: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """`remove` deletes an eviction's bytes and releases its draining reservation;
        `unleased` is told when the last lease of a digest ends."""
        self.ledger = ledger
        self.max_size = max_size
        self._remove = remove
        self._protected = protected
        self._on_evict = on_evict
        self._unleased = unleased
        self._leases: dict[str, int] = {}
        self._evicting = asyncio.Lock()

    def leased(self, digest: str) -> bool:
        return digest in self._leases

    @property
    def lease_count(self) -> int:
        """How many digests are leased now."""
        return len(self._leases)

    @contextlib.asynccontextmanager
    async def lease(self, digest: str) -> AsyncIterator[None]:
        """While held, this process never evicts `digest` (the ledger does not know
        leases: another replica's evictions are not stopped by it)."""
        self._leases[digest] = self._leases.get(digest, 0) + 1
        try:
            yield
        finally:
            count = self._leases[digest] - 1
            if count:
                self._leases[digest] = count
            else:
                del self._leases[digest]
                if self._unleased is not None:
                    await self._unleased(digest)

    def skip(self) -> Collection[str]:
        """What an eviction of this process must not choose: leased or pinned."""
        protected = self._protected() if self._protected else ()
        return frozenset(self._leases).union(protected)

    async def reserve(self, size: int, reservation: Reservation | None = None) -> Reservation:
        """Count `size` more bytes of a fill against the cap (a new reservation, or more
        of `reservation`), evicting to make room; CacheFull (and nothing evicted) when it
        cannot fit. The victims' bytes are gone before this returns, so the fill's writes
        never take the storage past the cap."""
        if size <= 0:
            return (await self.ledger.reserve(0, max_size=self.max_size))[0]
        # One evictor at a time in this process: a reservation waits for the deletion of
        # the one before, rather than evicting more for bytes that are about to go.
        async with self._evicting:
            reservation, eviction = await self.ledger.reserve(
                size, max_size=self.max_size, skip=self.skip(), reservation=reservation
            )
            await self._remove(eviction)
        await self._evicted(eviction.victims)
        return reservation

    async def gc(self) -> list[tuple[str, int]]:
        """Evict least-recently-used blobs until under the cap, as far as what is not
        leased or pinned allows; the victims."""
        async with self._evicting:
            eviction = await self.ledger.victims_for_gc(max_size=self.max_size, skip=self.skip())
            await self._remove(eviction)
            if eviction.over > 0:
                log.warning(
                    "blob cache over its cap by %d bytes: the rest is leased or pinned",
                    eviction.over,
                )
        await self._evicted(eviction.victims)
        return eviction.victims

    async def _evicted(self, victims: list[tuple[str, int]]) -> None:
        if self._on_evict is not None:
            for digest, size in victims:
                result = self._on_evict(digest, size)
                if inspect.isawaitable(result):
                    await result
