"""Short-name pins in Redis, shared by every replica, written through to a durable archive.

Implements `PinStore` (`proxy.storage.pins`) for several replicas. Redis decides: the pins
live in one hash (`<redis.key_prefix>pins`, name -> the same JSON entry as the file store:
repository, created, created_by), and the first resolution of a name wins across
replicas because it is an HSETNX. Every pin is also written to an archive (`PinStore`: the
file store, which several replicas on one machine share through `policy.pins_path`, or
an object-store one), because Redis may lose what it holds (restarted without
persistence, flushed, keys evicted) and a pin must never silently come back as a
different registry.

So the hash carries a marker field (`\\0seeded`, never a short name) written after the
archive's pins were copied in (HSETNX, so a pin made meanwhile is kept). A miss in a
hash that has the marker is a real miss; a hash without it (Redis came back empty, or
the hash was evicted with its marker) is seeded from the archive first, by whichever
replica notices. Redis unreachable: a name in the archive resolves to its pin; a name
not in it is refused with a 503 (`PinStoreError`), since resolving it now could pin it
differently from a replica that does reach Redis. Operator changes (`set`, `remove`) go
to the archive first, then to Redis, and fail loudly when Redis cannot be written.

The archive must be the same for every replica: replicas with archives of their own
could each miss a pin only another one archived, and resolve it anew.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

from redis.asyncio.client import Pipeline

from proxy.errors import RegistryError
from proxy.names.references import Repository
from proxy.storage.pins import (
    Creator,
    Pin,
    PinStore,
    PinStoreError,
    new_pin,
    pin_entry,
    pin_from_entry,
)
from proxy.storage.redis_client import RedisState, SharedStateUnavailable

log = logging.getLogger(__name__)

STORE = "pins"
# In the pins hash itself, so whatever drops the hash drops the marker with it.
SEEDED = b"\x00seeded"


def _encode(pin: Pin) -> bytes:
    return json.dumps(pin_entry(pin), sort_keys=True).encode()


def _decode(name: str, raw: bytes | None) -> Pin | None:
    if raw is None:
        return None
    try:
        return pin_from_entry(name, json.loads(raw))
    except (ValueError, KeyError, RegistryError) as exc:
        reason = exc.message if isinstance(exc, RegistryError) else str(exc)
        # Pins decide where short names resolve: an unreadable one is not "no pin".
        raise PinStoreError(f"the pin of {name!r} in redis is corrupt: {reason}") from exc


class RedisPinStore:
    """`PinStore` in a Redis hash, written through to `archive`."""

    def __init__(self, state: RedisState, archive: PinStore) -> None:
        self._state = state
        self.archive = archive
        self._key = state.key("pins")
        self._seeding = asyncio.Lock()

    async def _call(self, operation: Any) -> Any:
        return await self._state.call(STORE, operation)

    async def _read(self, name: str) -> tuple[Pin | None, bool]:
        """(the pin in Redis, whether the hash is seeded); SharedStateUnavailable."""
        client = self._state.client
        raw, seeded = await self._call(lambda: client.hmget(self._key, [name, SEEDED]))
        return _decode(name, raw), seeded is not None

    async def _seed(self) -> None:
        """Copy the archive's pins into Redis (kept where Redis has one), then mark it."""
        async with self._seeding:
            client = self._state.client
            if await self._call(lambda: client.hexists(self._key, SEEDED)):
                return  # another request (or replica) seeded it meanwhile
            pins = await self.archive.list()

            async def seed() -> list[Any]:
                async with client.pipeline(transaction=True) as pipe:
                    for pin in pins:
                        pipe.hsetnx(self._key, pin.name, _encode(pin))
                    pipe.hset(self._key, SEEDED, b"1")
                    return await pipe.execute()

            await self._call(seed)
            log.warning("pins seeded into redis from the archive (%d pins)", len(pins))

    async def _get_shared(self, name: str) -> Pin | None:
        pin, seeded = await self._read(name)
        if pin is not None or seeded:
            return pin
        await self._seed()
        return (await self._read(name))[0]

    async def get(self, name: str) -> Pin | None:
        """The pin of a short name; Redis unreachable: the archive's pin, or PinStoreError
        (503) when the archive has none (see the module's docstring)."""
        try:
            return await self._get_shared(name)
        except SharedStateUnavailable as exc:
            pin = await self.archive.get(name)
            if pin is not None:
                return pin
            raise PinStoreError(
                f"short name {name!r} is not pinned, and the shared state (redis) that "
                "decides new pins across replicas is unreachable: resolving it now could "
                "pin it differently elsewhere; pull a fully-qualified name, or retry when "
                "redis is back"
            ) from exc

    async def set(self, name: str, repository: Repository, creator: Creator | None = None) -> Pin:
        """Pin (or re-pin) a short name: the archive, then Redis."""
        pin = await self.archive.set(name, repository, creator)
        try:
            client = self._state.client
            await self._call(lambda: client.hset(self._key, name, _encode(pin)))
        except SharedStateUnavailable as exc:
            raise PinStoreError(
                f"pin {name!r} -> {repository} is in the archive, but redis is unreachable: "
                "replicas keep the pin they know until it is written there; run it again "
                "when redis is back"
            ) from exc
        return pin

    async def setdefault(
        self, name: str, repository: Repository, creator: Creator | None = None
    ) -> tuple[Pin, bool]:
        """Pin a short name unless it is pinned already (the first of all replicas wins);
        the pin in force, and whether this call created it."""
        existing = await self.get(name)
        if existing is not None:
            return existing, False
        pin = new_pin(name, repository, creator)
        client = self._state.client
        try:
            won = await self._call(lambda: client.hsetnx(self._key, name, _encode(pin)))
            if not won:
                current = (await self._read(name))[0]
                if current is not None:
                    return current, False
                # Removed by an operator within the moment: try once more from the start.
                return await self.setdefault(name, repository, creator)
        except SharedStateUnavailable as exc:
            raise PinStoreError(
                f"short name {name!r} could not be pinned: the shared state (redis) is "
                "unreachable; retry when redis is back"
            ) from exc
        try:
            archived, created = await self.archive.setdefault(name, repository, creator)
        except PinStoreError:
            # Not durable: withdraw it, or a Redis restart would let it re-resolve.
            await self._withdraw(name, pin)
            raise
        if not created:
            # The archive had a pin Redis had lost: the archive's pin is the pin.
            await self._call(lambda: client.hset(self._key, name, _encode(archived)))
            return archived, False
        return pin, True

    async def _withdraw(self, name: str, pin: Pin) -> None:
        """Remove `pin` from Redis if it is still the one there (compare and delete)."""
        expected = _encode(pin)

        async def remove(pipe: Pipeline) -> None:
            current = await pipe.hget(self._key, name)
            pipe.multi()  # type: ignore[no-untyped-call]
            if current == expected:
                pipe.hdel(self._key, name)

        try:
            await self._call(lambda: self._state.client.transaction(remove, self._key))
        except SharedStateUnavailable:
            log.error("pin %s is in redis but not archived, and redis is unreachable", name)

    async def remove(self, name: str) -> bool:
        """Remove a pin: from the archive, then from Redis."""
        archived = await self.archive.remove(name)
        try:
            client = self._state.client
            shared = await self._call(lambda: client.hdel(self._key, name))
        except SharedStateUnavailable as exc:
            raise PinStoreError(
                f"pin {name!r} is removed from the archive, but redis is unreachable: "
                "replicas keep it until it is removed there; run it again when redis is back"
            ) from exc
        return archived or bool(shared)

    async def list(self) -> Sequence[Pin]:
        """Every pin, sorted by name (the archive's, while Redis is unreachable)."""
        client = self._state.client
        try:
            if not await self._call(lambda: client.hexists(self._key, SEEDED)):
                await self._seed()
            entries = await self._call(lambda: client.hgetall(self._key))
        except SharedStateUnavailable:
            log.warning("redis is unreachable: listing the pins of the archive")
            return await self.archive.list()
        pins = [
            _decode(field.decode(errors="replace"), raw)
            for field, raw in entries.items()
            if field != SEEDED
        ]
        return sorted((pin for pin in pins if pin is not None), key=lambda pin: pin.name)
