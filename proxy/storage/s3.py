"""Content on an S3-compatible object store: the `s3` storage backend's blob and manifest
stores.

Keys, under `storage.s3.prefix`:

    <prefix>blobs/<algorithm>/<hex>      a blob, only ever the verified content
    <prefix>manifests/<algorithm>/<hex>  a manifest body; its media type in the object's
                                         metadata (`x-amz-meta-media-type`)

**Verified before visible.** A blob fill hashes its bytes as they come and streams them
into a multipart upload under the final key, one part (>= `PART_SIZE`) at a time: at most
the part being gathered and the part being sent are in memory. CompleteMultipartUpload,
the only call that makes an object appear, is sent after the digest and size verified;
a failure aborts the upload. A blob smaller than one part is one PutObject after it
verified. A process killed mid-fill leaves an incomplete multipart upload, never an
object: `open` sweeps uploads under the prefix older than `sweep_age`, and the bucket's
AbortIncompleteMultipartUpload lifecycle rule (README) catches the rest.

While a fill runs, its readers (the clients waiting on it) read what has arrived from a
local spool file under `<storage.path>/s3-spool/` (parts sent to S3 cannot be read until
the upload completes); once published, a blob is read with ranged GETs that stream one
response from the current offset, reopened only when a reader jumps.

Cap and LRU accounting is a `BlobLedger` (proxy/storage/ledger.py): a `MemoryLedger` (this
process's view) for one replica, a `RedisLedger` shared by the replicas on one bucket, so
their cap is one. A ledger that was never seeded, or lost its state (Redis restarted
empty), is seeded from a listing of the bucket: at `open`, and when a fill finds it so
(checked at most every `SEED_CHECK_INTERVAL`); an object met that the ledger does not know
(`stat`) is adopted. Leases, reserving with eviction and `gc` are the `CapKeeper`'s
(proxy/storage/capped.py), shared with the filesystem store; eviction here deletes objects.
A shared ledger that cannot be asked costs efficiency, not requests: hits are found with a
HEAD, fills are relayed uncached.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from botocore.exceptions import BotoCoreError, ClientError
from cachetools import LRUCache

from proxy.errors import DigestInvalid, ManifestInvalid
from proxy.names.references import validate_digest
from proxy.storage.blobstore import (
    HASH_CHUNK,
    BlobReader,
    BlobStats,
    BlobWriter,
    CacheFull,
    StorageLocked,
    _FdReader,
    _ThreadedFd,
    content_mismatch,
)
from proxy.storage.capped import CapKeeper, EvictHook
from proxy.storage.ledger import (
    BlobLedger,
    Eviction,
    LedgerUnavailable,
    MemoryLedger,
    Reservation,
    no_eviction,
)
from proxy.storage.manifest_cache import (
    MANIFEST_MEMORY,
    CachedManifest,
    ManifestStats,
    _checked,
)
from proxy.storage.s3_client import ObjectStoreError, S3Bucket, error_code, is_missing

if TYPE_CHECKING:
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

BLOBS = "blobs"
MANIFESTS = "manifests"
# S3's minimum part is 5 MiB; 8 MiB parts keep a fill's memory at ~16 MiB (one part
# gathering, one sending) and stay under S3's 10,000-part limit up to ~80 GiB.
PART_SIZE = 8 * 1024 * 1024
# Small blobs (image configs, small layers) read once from the bucket stay in memory,
# verified, up to SMALL_BLOB_MEMORY bytes in all: a warm hit on one then costs the held
# check but no object-store GET (one GET costs ~1 ms of CPU in the S3 client). A blob is
# immutable by digest, so a copy never goes stale; each hit still asks the ledger first,
# so a blob evicted by any replica is not served from a memory copy.
SMALL_BLOB = 256 * 1024
SMALL_BLOB_MEMORY = 64 * 1024 * 1024
# Incomplete uploads older than this are a dead process's (no live fill runs this long).
SWEEP_AGE = 24 * 3600.0
# How long a presigned blob URL (storage.s3.redirect) stays valid: checked when the
# client's GET starts, so it only needs to cover the redirect round trip and retries.
REDIRECT_TTL = 600
MEDIA_TYPE_KEY = "media-type"
# How often (seconds, at most) the fill path checks that the ledger still holds the
# bucket's listing (a shared one is emptied when Redis restarts empty).
SEED_CHECK_INTERVAL = 10.0
_DELETE_BATCH = 1000


def _storage_error(action: str, exc: Exception) -> ObjectStoreError:
    error = ObjectStoreError(f"object store: {action} failed: {exc}")
    error.__cause__ = exc
    return error


# -- blobs -------------------------------------------------------------------------------


class S3BlobStore:
    """`BlobStore` on an S3 bucket (several replicas may share it), with `BlobRedirects`
    and `SharedBlobs`.

    The accounting is a `BlobLedger`: in memory for one replica, a `RedisLedger` for the
    replicas sharing the bucket (then the cap is theirs together). The store does the
    object work: it deletes the victims the ledger chose before the fill that evicted
    them writes, and keeps the ledger truthful about what the bucket holds.
    """

    def __init__(
        self,
        bucket: S3Bucket,
        spool: Path,
        max_size: int,
        *,
        protected: Callable[[], Collection[str]] | None = None,
        on_evict: EvictHook | None = None,
        ledger: BlobLedger | None = None,
        part_size: int = PART_SIZE,
        sweep_age: float = SWEEP_AGE,
        seed_check_interval: float = SEED_CHECK_INTERVAL,
    ) -> None:
        self.bucket = bucket
        self.max_size = max_size
        self._spool = spool
        self._ledger: BlobLedger = ledger if ledger is not None else MemoryLedger()
        self._cap = CapKeeper(
            self._ledger, max_size, remove=self._remove, protected=protected, on_evict=on_evict
        )
        self.part_size = part_size
        self.sweep_age = sweep_age
        self._lock_fd = -1
        self._seed_check_interval = seed_check_interval
        self._seed_checked = 0.0
        self._seeding: asyncio.Task[None] | None = None
        self._last_stats = BlobStats(0, 0, max_size, 0)
        self._small: LRUCache[str, bytes] = LRUCache(maxsize=SMALL_BLOB_MEMORY, getsizeof=len)

    @property
    def _client(self) -> Any:
        return self.bucket.client

    @property
    def ledger(self) -> BlobLedger:
        return self._ledger

    def key(self, digest: str) -> str:
        return self.bucket.key(BLOBS, digest)

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self, *, exclusive: bool = True) -> None:
        """Seed the ledger from a listing of the bucket, unless a shared ledger already
        holds one (another replica seeded it).

        `exclusive` (the gate) locks the local spool folder, empties it, and aborts the
        multipart uploads a dead process left (older than `sweep_age`); without it (the
        read-only `cache` commands) nothing is locked or removed. A shared ledger that
        cannot be asked (Redis down) does not stop the start: it is seeded when it answers.
        """
        if exclusive:
            await asyncio.to_thread(self._lock_spool)
            await self.sweep()
        try:
            seeded = await self._ledger.seeded()
        except LedgerUnavailable as exc:
            log.warning("blob ledger unavailable at start (%s): seeding it later", exc)
            return
        if not seeded:
            await self._seed()
        self._seed_checked = time.monotonic()

    async def _listing(self) -> list[tuple[str, int, float]]:
        """(digest, size, upload time) of every blob object under the prefix."""
        found: list[tuple[str, int, float]] = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(
                Bucket=self.bucket.bucket, Prefix=f"{self.bucket.prefix}{BLOBS}/"
            ):
                for item in page.get("Contents", []):
                    digest = self.bucket.digest_of_key(BLOBS, item["Key"])
                    if digest is not None:
                        modified = item["LastModified"].timestamp()
                        found.append((digest, int(item["Size"]), modified))
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error("listing the bucket", exc) from exc
        return found

    async def _seed(self) -> None:
        # The LRU order of blobs the ledger does not know is their upload time (reads do
        # not refresh it in the bucket).
        found = await self._listing()
        try:
            await self._ledger.seed(found)
        except LedgerUnavailable as exc:
            log.warning("blob ledger unavailable (%s): seeding it later", exc)
            return
        log.info("blob ledger seeded from the bucket: %d blobs", len(found))

    def _check_seeded(self) -> None:
        """Now and then (from the fill path), whether a shared ledger lost its state
        (Redis restarted empty): then list the bucket and seed it again, in the
        background (fills go on meanwhile, counting only what the ledger knows)."""
        now = time.monotonic()
        if now - self._seed_checked < self._seed_check_interval:
            return
        if self._seeding is not None and not self._seeding.done():
            return
        self._seed_checked = now
        self._seeding = asyncio.get_running_loop().create_task(
            self._reseed(), name="blob ledger seed check"
        )

    async def _reseed(self) -> None:
        try:
            if not await self._ledger.seeded():
                log.warning("the blob ledger lost its state: seeding it from the bucket")
                await self._seed()
        except (LedgerUnavailable, ObjectStoreError) as exc:
            log.warning("could not check or seed the blob ledger: %s", exc)

    def _lock_spool(self) -> None:
        self._spool.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._spool / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageLocked(f"another registry-gate process uses {self._spool}") from None
        self._lock_fd = fd
        for leftover in self._spool.iterdir():
            if leftover.name != ".lock":
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    async def sweep(self) -> list[str]:
        """Abort the incomplete multipart uploads under the prefix older than `sweep_age`
        (what a killed fill left); the keys whose uploads were aborted."""
        cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=self.sweep_age)
        aborted: list[str] = []
        paginator = self._client.get_paginator("list_multipart_uploads")
        try:
            async for page in paginator.paginate(
                Bucket=self.bucket.bucket, Prefix=f"{self.bucket.prefix}{BLOBS}/"
            ):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] > cutoff:
                        continue  # maybe a live fill of another replica
                    with contextlib.suppress(ClientError):
                        await self._client.abort_multipart_upload(
                            Bucket=self.bucket.bucket,
                            Key=upload["Key"],
                            UploadId=upload["UploadId"],
                        )
                        aborted.append(upload["Key"])
        except (ClientError, BotoCoreError) as exc:
            # Not fatal: the lifecycle rule is the backstop for what the sweep misses.
            log.warning("could not sweep incomplete uploads: %s", exc)
        for key in aborted:
            log.info("aborted the incomplete upload of %s (a fill that never finished)", key)
        return aborted

    async def close(self) -> None:
        """Release the spool lock (the client and the ledger belong to whoever opened
        them)."""
        seeding, self._seeding = self._seeding, None
        if seeding is not None:
            seeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await seeding
        if self._lock_fd >= 0:
            fd, self._lock_fd = self._lock_fd, -1
            os.close(fd)

    # -- reads ---------------------------------------------------------------------------

    async def stat(self, digest: str) -> int | None:
        validate_digest(digest)
        try:
            size = await self._ledger.size_of(digest)
        except LedgerUnavailable:
            size = None  # ask the bucket itself: a hit is still served
        if size is not None:
            return size
        # Unknown to the ledger: published by a replica on another ledger (a `cache`
        # command, a Redis that was down or emptied), or not cached at all.
        size = await self._head(digest)
        if size is not None:
            with contextlib.suppress(LedgerUnavailable):
                await self._ledger.published(digest, size)
        return size

    async def _head(self, digest: str) -> int | None:
        try:
            head = await self._client.head_object(Bucket=self.bucket.bucket, Key=self.key(digest))
        except (ClientError, BotoCoreError) as exc:
            if not is_missing(exc):
                log.warning("object store HEAD of %s failed: %s", digest, exc)
            return None
        return int(head["ContentLength"])

    async def open_reader(self, digest: str) -> BlobReader | None:
        size = await self.stat(digest)
        if size is None:
            return None
        self._ledger.touched(digest)
        if size <= SMALL_BLOB:
            data = self._small.get(digest)
            if data is None:
                data = await self._read_small(digest, size)
            if data is not None:
                return BytesReader(data)
        return _ObjectReader(self, digest)

    async def _read_small(self, digest: str, size: int) -> bytes | None:
        """The whole small blob, verified, kept in memory; None (stream it instead) when
        the bucket cannot give it now or it does not match its digest."""
        try:
            response = await self._client.get_object(
                Bucket=self.bucket.bucket, Key=self.key(digest)
            )
            async with response["Body"] as body:
                data: bytes = await body.read()
        except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
            log.debug("object store GET of %s for memory failed: %s", digest, exc)
            return None
        if content_mismatch(digest, hashlib.new(digest.partition(":")[0], data), len(data), size):
            log.warning("object %s does not match its digest; not kept in memory", digest)
            return None
        self._small[digest] = data
        return data

    async def redirect_url(self, digest: str) -> str | None:
        """A presigned GET URL of the published blob when `storage.s3.redirect` is on
        (the client fetches the bytes from the object store itself); else None."""
        if not self.bucket.redirect or await self.stat(digest) is None:
            return None
        self._ledger.touched(digest)
        url: str = await self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket.bucket, "Key": self.key(digest)},
            ExpiresIn=REDIRECT_TTL,
        )
        return url

    def lease(self, digest: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._cap.lease(digest)

    async def stats(self) -> BlobStats:
        try:
            usage = await self._ledger.usage()
        except LedgerUnavailable:
            return self._last_stats  # the last known figures, rather than none
        self._last_stats = BlobStats(
            usage.blobs,
            usage.bytes,
            self.max_size,
            self._cap.lease_count,
            usage.filling,
            usage.draining,
        )
        return self._last_stats

    async def _forget_gone(self, digest: str) -> None:
        """The object is missing (another replica evicted it): the ledger forgets it."""
        with contextlib.suppress(LedgerUnavailable):
            await self._ledger.forget(digest, gone=True)

    # -- writes --------------------------------------------------------------------------

    async def begin_fill(self, digest: str, size: int | None = None) -> BlobWriter:
        algorithm = validate_digest(digest).partition(":")[0]
        reservation = await self._reserve(size or 0)
        try:
            fd, name = await asyncio.to_thread(self._spool_file, digest)
        except BaseException:
            await self._release(reservation)
            raise
        return _S3BlobWriter(self, digest, algorithm, fd, Path(name), reservation)

    async def begin_relay(self, digest: str, size: int | None = None) -> BlobWriter:
        """A fill spooled and verified for this replica's readers, never uploaded: the
        replica whose fill it streams publishes the object (`SharedBlobs`)."""
        algorithm = validate_digest(digest).partition(":")[0]
        fd, name = await asyncio.to_thread(self._spool_file, digest)
        # Nothing reserved: like every fill's spool, outside the cap.
        return _S3BlobWriter(
            self, digest, algorithm, fd, Path(name), Reservation("", 0), publish=False
        )

    def _spool_file(self, digest: str) -> tuple[int, str]:
        self._spool.mkdir(parents=True, exist_ok=True)
        hexpart = digest.partition(":")[2]
        return tempfile.mkstemp(prefix=f"{hexpart[:16]}.", suffix=".part", dir=self._spool)

    async def _reserve(self, size: int, reservation: Reservation | None = None) -> Reservation:
        """`CapKeeper.reserve` (the victims' objects deleted before this returns), with
        the shared ledger's two cases: the check that it still holds the bucket's
        listing, and CacheFull when it cannot be asked (Redis down): an uncounted fill
        could pass a cap the replicas share, so the blob is relayed instead of cached."""
        self._check_seeded()
        try:
            return await self._cap.reserve(size, reservation)
        except LedgerUnavailable as exc:
            raise CacheFull(f"the cache accounting is unavailable ({exc}): not caching") from exc

    async def _release(self, reservation: Reservation) -> None:
        try:
            await self._ledger.release(reservation)
        except LedgerUnavailable as exc:
            # Not refreshed any more: it stops counting when its TTL runs out.
            log.warning("blob ledger: cannot release a reservation now (%s)", exc)

    async def _published(self, digest: str, size: int, reservation: Reservation) -> None:
        try:
            await self._ledger.published(digest, size, reservation)
        except LedgerUnavailable as exc:
            # The object is there; the ledger adopts it when it is next met (stat), and
            # the reservation expires.
            log.warning("blob ledger: %s published but not recorded (%s)", digest, exc)

    async def delete(self, digest: str) -> bool:
        try:
            eviction = await self._ledger.forget(digest)
        except LedgerUnavailable as exc:
            log.warning("blob ledger: cannot forget %s now (%s)", digest, exc)
            eviction = None
        if eviction is None:
            size = await self._head(digest)
            if size is None:
                return False
            eviction = Eviction([(digest, size)], no_eviction().draining)
        await self._remove(eviction)
        return True

    async def _remove(self, eviction: Eviction) -> None:
        """Delete the objects the ledger forgot, then stop counting their bytes."""
        victims = eviction.victims
        for digest, _ in victims:
            self._small.pop(digest, None)
        try:
            for start in range(0, len(victims), _DELETE_BATCH):
                batch = victims[start : start + _DELETE_BATCH]
                objects: Any = [{"Key": self.key(digest)} for digest, _ in batch]
                try:
                    answer = await self._client.delete_objects(
                        Bucket=self.bucket.bucket, Delete={"Objects": objects, "Quiet": True}
                    )
                except (ClientError, BotoCoreError) as exc:
                    # Forgotten already; a later seed (or stat) finds it again.
                    log.error("cannot delete %d blobs from the object store: %s", len(batch), exc)
                    continue
                for error in answer.get("Errors", []):
                    log.error("cannot delete %s: %s", error.get("Key"), error.get("Message"))
        finally:
            await self._release(eviction.draining)

    async def gc(self) -> list[tuple[str, int]]:
        """Evict least-recently-used blobs until under the cap, as far as what is not
        leased or pinned allows; nothing while a shared ledger cannot be asked."""
        try:
            return await self._cap.gc()
        except LedgerUnavailable as exc:
            log.warning("blob ledger unavailable: no eviction now (%s)", exc)
            return []

    async def verify(self, *, remove: bool = False) -> list[str]:
        bad: list[str] = []
        for digest, _ in await self._ledger.entries():
            size = await self._ledger.size_of(digest)
            if size is None:
                continue  # evicted meanwhile
            async with self.lease(digest):
                ok = await self._object_matches(digest, size)
            if ok is None:
                await self._forget_gone(digest)
            elif not ok:
                bad.append(digest)
                if remove:
                    await self.delete(digest)
        return bad

    async def _object_matches(self, digest: str, size: int) -> bool | None:
        """Whether the object hashes to `digest` with `size` bytes; None when gone."""
        algorithm, _, hexpart = digest.partition(":")
        hasher = hashlib.new(algorithm)
        count = 0
        try:
            response = await self._client.get_object(
                Bucket=self.bucket.bucket, Key=self.key(digest)
            )
            async with response["Body"] as body:
                while chunk := await body.read(HASH_CHUNK):
                    hasher.update(chunk)
                    count += len(chunk)
        except (ClientError, BotoCoreError) as exc:
            if is_missing(exc):
                return None
            raise _storage_error(f"reading {digest}", exc) from exc
        return count == size and hasher.hexdigest() == hexpart


class BytesReader:
    """`BlobReader` of a blob held in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    async def read_at(self, offset: int, size: int) -> bytes:
        return bytes(self._data[offset : offset + max(size, 0)])

    async def aclose(self) -> None:
        """Nothing to release."""


class _ObjectReader:
    """`BlobReader` of a published object: one streaming GET from the current offset,
    reopened (with a ranged GET) when a read does not continue where the last ended or
    when the connection broke."""

    def __init__(self, store: S3BlobStore, digest: str) -> None:
        self._store = store
        self._digest = digest
        self._body: Any = None
        self._pos = -1

    async def read_at(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        for attempt in (1, 2):
            if self._body is None or self._pos != offset:
                await self._drop()
                if not await self._open(offset):
                    return b""
            try:
                data = await self._read(size)
            except (TimeoutError, BotoCoreError, OSError) as exc:
                # An idle stream (a slow client) may have been closed by the store.
                await self._drop()
                if attempt == 2:
                    raise _storage_error(f"reading {self._digest}", exc) from exc
                continue
            self._pos = offset + len(data)
            return data
        raise AssertionError("unreachable")

    async def _open(self, offset: int) -> bool:
        store = self._store
        try:
            response = await store._client.get_object(
                Bucket=store.bucket.bucket, Key=store.key(self._digest), Range=f"bytes={offset}-"
            )
        except (ClientError, BotoCoreError) as exc:
            if error_code(exc) == "InvalidRange":
                return False  # at or past the end
            if is_missing(exc):
                # Removed behind this process (another replica evicted it): forget it.
                await store._forget_gone(self._digest)
            raise _storage_error(f"reading {self._digest}", exc) from exc
        self._body = response["Body"]
        self._pos = offset
        return True

    async def _read(self, size: int) -> bytes:
        first: bytes = await self._body.read(size)
        if len(first) == size or not first:
            return first
        data = bytearray(first)
        while len(data) < size:
            chunk = await self._body.read(size - len(data))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    async def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            body.close()

    async def aclose(self) -> None:
        await self._drop()


class _S3BlobWriter:
    """One fill: hashed, spooled locally for its readers, and sent to the final key as a
    multipart upload that is completed only once verified."""

    def __init__(
        self,
        store: S3BlobStore,
        digest: str,
        algorithm: str,
        fd: int,
        spool: Path,
        reservation: Reservation,
        *,
        publish: bool = True,
    ) -> None:
        self._store = store
        # False for a relay (`begin_relay`): spooled and verified, never uploaded.
        self._publish_it = publish
        self._digest = digest
        self._key = store.key(digest)
        self._reservation = reservation
        self._hash = hashlib.new(algorithm)
        self._fd = _ThreadedFd(fd)
        self._spool = spool
        self._written = 0
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._sending: asyncio.Task[None] | None = None
        self._finished = False
        self._committed = False

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def written(self) -> int:
        return self._written

    async def write(self, chunk: bytes) -> None:
        if self._finished:
            raise ValueError("write after commit or abort")
        beyond = self._written + len(chunk) - self._reservation.size
        if beyond > 0 and self._publish_it:
            # Size unknown (or exceeded): reserve as the bytes come, before writing them.
            await self._store._reserve(beyond, self._reservation)

        def spool(fd: int) -> None:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            self._hash.update(chunk)

        await self._fd.call(spool)
        self._written += len(chunk)
        if not self._publish_it:
            return
        self._buffer += chunk
        if len(self._buffer) >= self._store.part_size:
            part, self._buffer = bytes(self._buffer), bytearray()
            await self._send(part)

    async def _send(self, part: bytes) -> None:
        """Start sending `part` once the previous one is sent (at most one in flight)."""
        client = self._store._client
        if self._upload_id is None:
            try:
                created = await client.create_multipart_upload(
                    Bucket=self._store.bucket.bucket, Key=self._key
                )
            except (ClientError, BotoCoreError) as exc:
                raise _storage_error("starting an upload", exc) from exc
            self._upload_id = created["UploadId"]
        await self._sent()
        number = len(self._parts) + 1
        self._sending = asyncio.create_task(
            self._upload_part(number, part), name=f"upload part {number} of {self._digest}"
        )

    async def _upload_part(self, number: int, part: bytes) -> None:
        try:
            answer = await self._store._client.upload_part(
                Bucket=self._store.bucket.bucket,
                Key=self._key,
                UploadId=self._upload_id or "",
                PartNumber=number,
                Body=part,
            )
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(f"sending part {number}", exc) from exc
        self._parts.append({"ETag": answer["ETag"], "PartNumber": number})

    async def _sent(self) -> None:
        sending, self._sending = self._sending, None
        if sending is not None:
            await sending

    def open_reader(self) -> BlobReader:
        if not self._fd.closed:
            return _FdReader(os.dup(self._fd.fd))
        if not self._committed:
            raise ValueError("the fill was aborted")
        return _ObjectReader(self._store, self._digest)

    async def commit(
        self, expected_size: int | None = None, on_verified: Callable[[], None] | None = None
    ) -> None:
        if self._finished:
            raise ValueError("commit after commit or abort")
        mismatch = content_mismatch(self._digest, self._hash, self._written, expected_size)
        if mismatch is not None:
            await self.abort()
            raise mismatch
        if on_verified is not None:
            on_verified()
        if not self._publish_it:
            self._finished = self._committed = True
            await self._drop_spool()
            return
        try:
            await self._publish()
        except BaseException:
            await self.abort()
            raise
        self._finished = self._committed = True
        # The object is visible: its reservation becomes it.
        await self._store._published(self._digest, self._written, self._reservation)
        await self._drop_spool()

    async def _publish(self) -> None:
        """Make the (verified) object appear under its key."""
        client = self._store._client
        bucket = self._store.bucket.bucket
        if self._upload_id is None:
            part, self._buffer = bytes(self._buffer), bytearray()
            try:
                await client.put_object(Bucket=bucket, Key=self._key, Body=part)
            except (ClientError, BotoCoreError) as exc:
                raise _storage_error("storing the blob", exc) from exc
            return
        if self._buffer:
            last, self._buffer = bytes(self._buffer), bytearray()
            await self._send(last)
        await self._sent()
        try:
            await client.complete_multipart_upload(
                Bucket=bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error("completing the upload", exc) from exc
        self._upload_id = None  # completed: nothing left to abort

    async def abort(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._buffer = bytearray()
        try:
            sending, self._sending = self._sending, None
            if sending is not None:
                sending.cancel()
                with contextlib.suppress(BaseException):
                    await sending
            upload_id, self._upload_id = self._upload_id, None
            if upload_id is not None:
                try:
                    await self._store._client.abort_multipart_upload(
                        Bucket=self._store.bucket.bucket, Key=self._key, UploadId=upload_id
                    )
                except (ClientError, BotoCoreError) as exc:
                    # The sweep at the next start (or the lifecycle rule) removes it.
                    log.warning("cannot abort the upload of %s: %s", self._digest, exc)
            await self._drop_spool()
        finally:
            await self._store._release(self._reservation)

    async def _drop_spool(self) -> None:
        await self._fd.close()
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self._spool.unlink)


# -- manifests ---------------------------------------------------------------------------


class S3ManifestStore:
    """`ManifestStore` on an S3 bucket, recently used manifests in memory (a manifest is
    immutable by digest, so a copy in memory never goes stale)."""

    def __init__(self, bucket: S3Bucket, *, memory_bytes: int = MANIFEST_MEMORY) -> None:
        self.bucket = bucket
        self._memory: LRUCache[str, CachedManifest] = LRUCache(
            maxsize=memory_bytes, getsizeof=lambda m: len(m.body) + len(m.media_type)
        )

    @property
    def _client(self) -> Any:
        return self.bucket.client

    async def open(self) -> None:
        """Nothing to prepare (the bucket was checked when the client opened)."""

    async def get(self, digest: str) -> CachedManifest | None:
        manifest = self._memory.get(digest)
        if manifest is not None:
            return manifest
        try:
            stored = await self._fetch(digest)
        except ObjectStoreError as exc:
            # A miss: the manifest is fetched upstream again (and stored once more).
            log.warning("%s", exc)
            return None
        if stored is None:
            return None
        manifest = await self._intact(digest, *stored, remove=True)
        if manifest is not None:
            self._memory[digest] = manifest
        return manifest

    async def _fetch(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, body) as stored, or None when there is no such object."""
        key = self.bucket.key(MANIFESTS, digest)
        try:
            response = await self._client.get_object(Bucket=self.bucket.bucket, Key=key)
            async with response["Body"] as body:
                data: bytes = await body.read()
        except (ClientError, BotoCoreError) as exc:
            if is_missing(exc):
                return None
            raise _storage_error(f"reading manifest {digest}", exc) from exc
        return unquote(response.get("Metadata", {}).get(MEDIA_TYPE_KEY, "")), data

    async def _intact(
        self, digest: str, media_type: str, data: bytes, *, remove: bool
    ) -> CachedManifest | None:
        """The manifest if the stored object is intact; a damaged one is logged (and
        removed when `remove`)."""
        try:
            if not media_type:
                raise ManifestInvalid("no media type metadata")
            return _checked(digest, media_type, data)
        except (ManifestInvalid, DigestInvalid) as exc:
            log.error("cached manifest %s is damaged (%s)", digest, exc)
            if remove:
                await self.delete(digest)
            return None

    async def put(self, digest: str, media_type: str, body: bytes) -> CachedManifest:
        manifest = _checked(digest, media_type, body)
        try:
            await self._client.put_object(
                Bucket=self.bucket.bucket,
                Key=self.bucket.key(MANIFESTS, digest),
                Body=body,
                # Metadata travels as HTTP headers: quoted, so any printable type fits.
                Metadata={MEDIA_TYPE_KEY: quote(media_type, safe="/+.;= -")},
            )
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(f"storing manifest {digest}", exc) from exc
        self._memory[digest] = manifest
        return manifest

    async def delete(self, digest: str) -> bool:
        self._memory.pop(digest, None)
        key = self.bucket.key(MANIFESTS, digest)
        try:
            await self._client.head_object(Bucket=self.bucket.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            if is_missing(exc):
                return False
            raise _storage_error(f"deleting manifest {digest}", exc) from exc
        try:
            await self._client.delete_object(Bucket=self.bucket.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(f"deleting manifest {digest}", exc) from exc
        return True

    async def _scan(self) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(
                Bucket=self.bucket.bucket, Prefix=f"{self.bucket.prefix}{MANIFESTS}/"
            ):
                for item in page.get("Contents", []):
                    digest = self.bucket.digest_of_key(MANIFESTS, item["Key"])
                    if digest is not None:
                        found.append((digest, int(item["Size"])))
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error("listing manifests", exc) from exc
        return found

    async def verify(self, *, remove: bool = False) -> list[str]:
        bad: list[str] = []
        for digest, _ in await self._scan():
            stored = await self._fetch(digest)
            if stored is None:
                continue  # deleted meanwhile
            if await self._intact(digest, *stored, remove=False) is None:
                bad.append(digest)
                if remove:
                    await self.delete(digest)
        return bad

    async def stats(self) -> ManifestStats:
        found = await self._scan()
        return ManifestStats(len(found), sum(size for _, size in found))
