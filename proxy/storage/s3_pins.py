"""The pins archive in the object store: the durable copy of pins replicas on several
machines share (`storage.backend: s3` with `redis:`).

Redis decides which resolution of a short name wins (`proxy.storage.redis_pins`); this
archive is what survives Redis losing it. One object per pin,
`<prefix>pins/<percent-encoded name>.json`, holding the pin's stored form
(`pins.pin_entry`) and its name. A first pin is written with `If-None-Match: *`, so where
the store honours conditional writes an archived pin is never replaced by a racing one
(Redis already serialises them; this is the second fence). Operator changes overwrite.
The client is opened on first use and closed with `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from urllib.parse import quote, unquote

from botocore.exceptions import BotoCoreError, ClientError

from proxy.errors import RegistryError
from proxy.names.references import Repository
from proxy.settings import S3Settings
from proxy.storage.pins import (
    Creator,
    Pin,
    PinStoreError,
    new_pin,
    pin_entry,
    pin_from_entry,
)
from proxy.storage.s3_client import S3Bucket, error_code, is_missing, open_bucket

_PRECONDITION_FAILED = ("412", "PreconditionFailed", "ConditionalRequestConflict")


class S3PinStore:
    """`PinStore` on the object store (the archive behind the Redis pins)."""

    def __init__(self, settings: S3Settings) -> None:
        self._settings = settings
        self._resources = contextlib.AsyncExitStack()
        self._bucket: S3Bucket | None = None
        self._opening = asyncio.Lock()

    async def _open(self) -> S3Bucket:
        async with self._opening:
            if self._bucket is None:
                self._bucket = await self._resources.enter_async_context(
                    open_bucket(self._settings, check=False)
                )
            return self._bucket

    async def close(self) -> None:
        self._bucket = None
        await self._resources.aclose()

    def _key(self, bucket: S3Bucket, name: str) -> str:
        return f"{bucket.prefix}pins/{quote(name, safe='')}.json"

    async def get(self, name: str) -> Pin | None:
        bucket = await self._open()
        try:
            answer = await bucket.client.get_object(
                Bucket=bucket.bucket, Key=self._key(bucket, name)
            )
            async with answer["Body"] as body:
                data = await body.read()
        except (ClientError, BotoCoreError) as exc:
            if is_missing(exc):
                return None
            raise PinStoreError(f"the pins archive (object store) failed: {exc}") from exc
        return _decode(name, data)

    async def _put(self, pin: Pin, *, only_new: bool) -> bool:
        """Write `pin`; False when `only_new` and a pin is already archived."""
        bucket = await self._open()
        data = json.dumps({"name": pin.name, **pin_entry(pin)}).encode()
        extra = {"IfNoneMatch": "*"} if only_new else {}
        try:
            await bucket.client.put_object(
                Bucket=bucket.bucket,
                Key=self._key(bucket, pin.name),
                Body=data,
                ContentType="application/json",
                **extra,  # type: ignore[arg-type]
            )
        except (ClientError, BotoCoreError) as exc:
            if only_new and error_code(exc) in _PRECONDITION_FAILED:
                return False
            raise PinStoreError(f"the pins archive (object store) failed: {exc}") from exc
        return True

    async def set(self, name: str, repository: Repository, creator: Creator | None = None) -> Pin:
        pin = new_pin(name, repository, creator)
        await self._put(pin, only_new=False)
        return pin

    async def setdefault(
        self, name: str, repository: Repository, creator: Creator | None = None
    ) -> tuple[Pin, bool]:
        existing = await self.get(name)
        if existing is not None:
            return existing, False
        pin = new_pin(name, repository, creator)
        if await self._put(pin, only_new=True):
            return pin, True
        archived = await self.get(name)
        if archived is None:  # removed within the moment: try once more
            return await self.setdefault(name, repository, creator)
        return archived, False

    async def remove(self, name: str) -> bool:
        if await self.get(name) is None:
            return False
        bucket = await self._open()
        try:
            await bucket.client.delete_object(Bucket=bucket.bucket, Key=self._key(bucket, name))
        except (ClientError, BotoCoreError) as exc:
            raise PinStoreError(f"the pins archive (object store) failed: {exc}") from exc
        return True

    async def list(self) -> Sequence[Pin]:
        bucket = await self._open()
        head = f"{bucket.prefix}pins/"
        names: list[str] = []
        try:
            paginator = bucket.client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=bucket.bucket, Prefix=head):
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if key.endswith(".json"):
                        names.append(unquote(key[len(head) : -len(".json")]))
        except (ClientError, BotoCoreError) as exc:
            raise PinStoreError(f"the pins archive (object store) failed: {exc}") from exc
        pins = [pin for pin in [await self.get(name) for name in sorted(names)] if pin]
        return pins


def _decode(name: str, data: bytes) -> Pin:
    try:
        entry = json.loads(data)
        if not isinstance(entry, dict) or entry.get("name") != name:
            raise ValueError("the object does not hold this pin")
        return pin_from_entry(name, entry)
    except (ValueError, KeyError, RegistryError) as exc:
        # An unreadable pin must not silently become no pin (it would re-resolve).
        raise PinStoreError(f"pin {name!r} in the pins archive is corrupt: {exc}") from exc
