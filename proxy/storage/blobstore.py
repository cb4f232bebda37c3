"""The content-addressed blob cache: where verified blobs live, and how space is reclaimed.

Owns the `BlobStore` protocol (what any backend, filesystem or object store, must offer:
no local paths), the optional capabilities a store may add (`LocalBlobFiles`: a local
file to send with sendfile; `BlobRedirects`: a URL the client may fetch the blob from;
`SharedBlobs`: every replica sees the same published blobs, so a fill streamed from
another replica's fill need not be stored again),
and the embedded filesystem implementation:

    <root>/blobs/<algorithm>/<hex>   published blobs, only ever created by an atomic rename
                                     of a complete file whose bytes hashed to its name
    <root>/tmp/                      fills in progress; wiped at start (a crash mid-fill
                                     leaves nothing that could be served)
    <root>/.lock                     one gate process per cache directory

Eviction is least-recently-used under a byte cap. The accounting (sizes, LRU order,
reservations, which blobs to evict) is a `BlobLedger` (proxy/storage/ledger.py): by default
an in-memory one rebuilt from the directory at start (order from file mtimes, which reads
refresh now and then). Leases, reserving with eviction and `gc` are the `CapKeeper`'s
(proxy/storage/capped.py), shared with the S3 store. This store does the file work: it
deletes the victims the ledger chose before the fill that evicted them writes. A blob with
a lease (being filled or read) or in the `protected` set (pinned images) is never evicted
by this process.

The cap bounds the blob bytes on disk, not only the published ones: a fill reserves its
expected size before its first byte is written (more as it goes when the size is not
known), eviction makes room for the reservation, and a fill that cannot fit (everything
else leased or pinned) is refused with `CacheFull` before it writes anything. Blobs being
unlinked, and blobs deleted while a lease still holds them open, count until they are
gone from the disk. Manifests, the sqlite index and leftovers of a crashed process (until
the start-up sweep) are outside the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from proxy.errors import DigestInvalid
from proxy.names.references import validate_digest
from proxy.storage.capped import CapKeeper
from proxy.storage.capped import EvictHook as EvictHook  # noqa: PLC0414 (re-exported)
from proxy.storage.durable_files import make_durable
from proxy.storage.ledger import BlobLedger, Eviction, MemoryLedger, Reservation
from proxy.storage.ledger import CacheFull as CacheFull  # noqa: PLC0414 (re-exported)

log = logging.getLogger(__name__)

T = TypeVar("T")

HASH_CHUNK = 1024 * 1024
# Refreshing a blob's mtime on every hit would be a metadata write per request; the LRU
# order only needs to survive a restart roughly, so the disk copy is refreshed at most
# this often (seconds) per blob while the in-memory order is exact.
ACCESS_PERSIST_INTERVAL = 300.0
_ALGORITHMS = ("sha256", "sha512")
_HEX_LENGTH = {"sha256": 64, "sha512": 128}


class StorageLocked(RuntimeError):
    """Another process holds the cache directory (two gates must not share one)."""


@dataclass(frozen=True, slots=True)
class BlobStats:
    """What the blob cache holds now."""

    count: int
    bytes: int
    """Published blobs."""
    max_size: int
    leased: int
    filling: int = 0
    """Reserved by fills in progress (or, seen from another process, written so far)."""
    removed_open: int = 0
    """Removed from the index but still on disk: being unlinked, or held open by a lease."""

    @property
    def used(self) -> int:
        """Blob bytes on disk, what `max_size` bounds."""
        return self.bytes + self.filling + self.removed_open


class BlobReader(Protocol):
    """Random access to a blob's bytes (published, or written so far by a fill)."""

    async def read_at(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes from `offset` (fewer only at the end of what exists)."""
        ...

    async def aclose(self) -> None:
        """Release the reader."""
        ...


def content_mismatch(
    digest: str, hasher: Any, written: int, expected_size: int | None
) -> DigestInvalid | None:
    """What a fill must not publish: bytes that did not hash to `digest`, or not
    `expected_size` of them (when known); None when the content is the blob."""
    actual = f"{hasher.name}:{hasher.hexdigest()}"
    if actual == digest and (expected_size is None or expected_size == written):
        return None
    return DigestInvalid(
        "content does not match its digest",
        detail={
            "digest": digest,
            "received": actual,
            "size": written,
            "expected_size": expected_size,
        },
    )


class BlobWriter(Protocol):
    """One fill: bytes go to a private place while they are hashed; nothing is visible
    to `stat`/`open_reader` (or a capability) of the store until `commit` verified them."""

    @property
    def digest(self) -> str:
        """The digest the content must hash to."""
        ...

    @property
    def written(self) -> int:
        """Bytes written so far."""
        ...

    async def write(self, chunk: bytes) -> None:
        """Append and hash a chunk."""
        ...

    async def commit(
        self, expected_size: int | None = None, on_verified: Callable[[], None] | None = None
    ) -> None:
        """Verify digest (and size), make durable, publish; DigestInvalid on mismatch,
        in which case the data is discarded. `on_verified` is called once the content is
        known good, before the (slow) flush to disk."""
        ...

    async def abort(self) -> None:
        """Discard the fill; safe to call more than once and after a failed commit."""
        ...

    def open_reader(self) -> BlobReader:
        """A reader of what has been written so far (it sees later writes too).

        Synchronous, so a caller can check the fill's state and open a reader with no
        suspension point between. Once `commit` has published, it reads the published
        blob; once the fill is discarded it raises ValueError. A reader outlives both.
        """
        ...


class BlobStore(Protocol):
    """A content-addressed blob cache shared by all upstreams and repositories."""

    async def close(self) -> None:
        """Release the store (files, locks, connections)."""

    async def stat(self, digest: str) -> int | None:
        """The size of the published blob, or None when not cached."""
        ...

    async def open_reader(self, digest: str) -> BlobReader | None:
        """A reader of the published blob (counting as an access), or None."""
        ...

    async def begin_fill(self, digest: str, size: int | None = None) -> BlobWriter:
        """Start writing content that must hash to `digest`, reserving `size` bytes (the
        expected length, when known) under the cap first; CacheFull when it cannot fit.
        Writes past the reservation reserve more, and may raise CacheFull too."""
        ...

    async def delete(self, digest: str) -> bool:
        """Remove a published blob whatever its leases; whether it existed."""
        ...

    def lease(self, digest: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Keep `digest` from eviction while the context is open (reads and fills)."""
        ...

    async def gc(self) -> list[tuple[str, int]]:
        """Evict least-recently-used blobs until under the size cap; (digest, size) each."""
        ...

    async def verify(self, *, remove: bool = False) -> list[str]:
        """Re-hash every published blob; the digests whose content is wrong (removed
        when `remove`)."""
        ...

    async def stats(self) -> BlobStats:
        """Counts for `cache stats` and metrics."""
        ...


@runtime_checkable
class LocalBlobFiles(Protocol):
    """Optional capability: published blobs are local files (a filesystem store), so the
    pull path may send them with sendfile instead of reading them through the loop."""

    async def local_path(self, digest: str) -> Path | None:
        """The local file of the published blob, counting as an access; None when not
        cached."""
        ...


@runtime_checkable
class BlobRedirects(Protocol):
    """Optional capability: a published blob can be fetched by the client itself from a
    URL (an object store's presigned GET), so the gate answers 307 instead of the bytes."""

    async def redirect_url(self, digest: str) -> str | None:
        """A URL serving the published blob (counting as an access), or None to serve it
        through the gate (not cached, or redirects off)."""
        ...


@runtime_checkable
class SharedBlobs(Protocol):
    """Optional capability: the replicas share the published blobs (an object store). A
    fill whose bytes come from another replica's fill, which publishes them itself, is a
    relay: hashed and readable while it runs like any fill, verified, never published."""

    async def begin_relay(self, digest: str, size: int | None = None) -> BlobWriter:
        """A `BlobWriter` whose `commit` verifies and discards (nothing reserved under
        the cap, nothing published; once committed, `open_reader` reads the blob the
        other replica published)."""
        ...


class _ThreadedFd:
    """A file descriptor whose blocking calls run in a worker thread.

    A cancelled caller does not stop the thread; `close` waits for the call in flight so
    the descriptor number cannot be reused (by another open) while a thread still writes
    or reads through it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending: asyncio.Future[Any] | None = None

    @property
    def closed(self) -> bool:
        return self.fd < 0

    async def call(self, fn: Callable[[int], T]) -> T:
        if self.fd < 0:
            raise ValueError("file descriptor is closed")
        future = asyncio.get_running_loop().run_in_executor(None, fn, self.fd)
        self._pending = future
        return await asyncio.shield(future)

    async def close(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            if not pending.done():
                await asyncio.wait([pending])
            if not pending.cancelled():
                # Retrieved so a failure nobody awaited (the caller was cancelled) is not
                # reported as "never retrieved".
                pending.exception()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class _FdReader:
    """`BlobReader` over an open descriptor (its own, so others may close theirs)."""

    def __init__(self, fd: int) -> None:
        self._fd = _ThreadedFd(fd)

    async def read_at(self, offset: int, size: int) -> bytes:
        return await self._fd.call(lambda fd: os.pread(fd, size, offset))

    async def aclose(self) -> None:
        await self._fd.close()


class FilesystemBlobStore:
    """`BlobStore` on a local directory (the embedded default), with `LocalBlobFiles`."""

    def __init__(
        self,
        root: Path,
        max_size: int,
        *,
        protected: Callable[[], Collection[str]] | None = None,
        on_evict: EvictHook | None = None,
        ledger: BlobLedger | None = None,
    ) -> None:
        self.root = root
        self.max_size = max_size
        self._blobs = root / "blobs"
        self._tmp = root / "tmp"
        self._ledger: BlobLedger = ledger if ledger is not None else MemoryLedger()
        # Monotonic time each blob's mtime was last refreshed (absent: when opened).
        self._persisted: dict[str, float] = {}
        self._opened_at = time.monotonic()
        # Draining reservations of blobs deleted while leased: the lease holders may have
        # them open, so their bytes count until the last lease ends.
        self._open_drains: dict[str, list[Reservation]] = {}
        self._removing: dict[str, asyncio.Event] = {}
        self._cap = CapKeeper(
            self._ledger,
            max_size,
            remove=self._remove,
            protected=protected,
            on_evict=on_evict,
            unleased=self._unleased,
        )
        self._lock_fd = -1

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, *, exclusive: bool = True) -> None:
        """Create the layout and load the index.

        `exclusive` (the gate) locks the directory and removes fills a dead process left
        behind; without it (read-only tools such as `cache verify` beside a running
        gate) nothing is locked or removed.
        """
        found, filling = await asyncio.to_thread(self._open_sync, exclusive)
        self._opened_at = time.monotonic()
        await self._ledger.seed(found)
        if filling:
            # Counted, never evicted for: the running gate owns those fills.
            await self._ledger.reserve(filling, max_size=sys.maxsize)

    def _open_sync(self, exclusive: bool) -> tuple[list[tuple[str, int, float]], int]:
        filling = 0
        self._tmp.mkdir(parents=True, exist_ok=True)
        for algorithm in _ALGORITHMS:
            (self._blobs / algorithm).mkdir(parents=True, exist_ok=True)
        if exclusive:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StorageLocked(f"another registry-gate process uses {self.root}") from None
            self._lock_fd = fd
            for leftover in self._tmp.iterdir():
                log.info("removing unfinished fill %s", leftover.name)
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        else:
            # Beside a running gate: its fills in progress, as far as written.
            filling = _tree_bytes(self._tmp)
        found: list[tuple[str, int, float]] = []
        for algorithm in _ALGORITHMS:
            with os.scandir(self._blobs / algorithm) as entries:
                for entry in entries:
                    name = entry.name
                    if len(name) != _HEX_LENGTH[algorithm] or not _is_hex(name):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    found.append((f"{algorithm}:{name}", st.st_size, st.st_mtime))
        return found, filling

    async def close(self) -> None:
        """Release the directory lock (fills in progress are their owners' to abort)."""
        if self._lock_fd >= 0:
            fd, self._lock_fd = self._lock_fd, -1
            os.close(fd)

    # -- reads ---------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where a published blob lives (whether or not it exists)."""
        algorithm, _, hexpart = validate_digest(digest).partition(":")
        return self._blobs / algorithm / hexpart

    async def local_path(self, digest: str) -> Path | None:
        if await self._ledger.size_of(digest) is None:
            return None
        self._ledger.touched(digest)
        path = self.blob_path(digest)
        now = time.monotonic()
        if now - self._persisted.get(digest, self._opened_at) >= ACCESS_PERSIST_INTERVAL:
            self._persisted[digest] = now
            try:
                await asyncio.to_thread(os.utime, path)
            except FileNotFoundError:
                # Removed behind the gate's back: forget it rather than serve a 404 later.
                await self._forget_gone(digest)
                return None
        return path

    async def stat(self, digest: str) -> int | None:
        return await self._ledger.size_of(digest)

    async def open_reader(self, digest: str) -> BlobReader | None:
        path = await self.local_path(digest)
        if path is None:
            return None
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        except FileNotFoundError:
            await self._forget_gone(digest)
            return None
        return _FdReader(fd)

    def lease(self, digest: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._cap.lease(digest)

    async def _unleased(self, digest: str) -> None:
        if digest not in self._removing:
            # The last holder is gone: a blob deleted under it has left the disk.
            await self._release_open_drains(digest)

    async def stats(self) -> BlobStats:
        usage = await self._ledger.usage()
        return BlobStats(
            usage.blobs,
            usage.bytes,
            self.max_size,
            self._cap.lease_count,
            usage.filling,
            usage.draining,
        )

    # -- writes --------------------------------------------------------------------------

    async def begin_fill(self, digest: str, size: int | None = None) -> BlobWriter:
        algorithm, _, hexpart = validate_digest(digest).partition(":")
        reservation = await self._cap.reserve(size or 0)
        try:
            fd, name = await asyncio.to_thread(
                tempfile.mkstemp, prefix=f"{hexpart[:16]}.", suffix=".part", dir=self._tmp
            )
        except BaseException:
            await self._ledger.release(reservation)
            raise
        return _FilesystemBlobWriter(self, digest, algorithm, hexpart, fd, Path(name), reservation)

    async def _publish(self, digest: str, size: int, reservation: Reservation) -> None:
        # Called at once after the rename: the blob is now visible, its reservation
        # becomes it (the rename replaced any old file of the digest: the ledger replaces
        # its entry too).
        self._persisted[digest] = time.monotonic()
        await self._ledger.published(digest, size, reservation)

    async def _wait_removal(self, digest: str) -> None:
        # An eviction of this digest may still be unlinking its old file; a rename before
        # that unlink would have the new blob deleted.
        while (event := self._removing.get(digest)) is not None:
            await event.wait()

    async def _forget_gone(self, digest: str) -> None:
        self._persisted.pop(digest, None)
        await self._ledger.forget(digest, gone=True)

    async def _remove(self, eviction: Eviction) -> None:
        """Unlink what the ledger forgot, then stop counting its bytes (unless a lease
        holder may still have it open: then when the last lease ends)."""
        victims = eviction.victims
        events = {digest: asyncio.Event() for digest, _ in victims}
        self._removing.update(events)
        try:
            for digest, _ in victims:
                self._persisted.pop(digest, None)
            paths = [self.blob_path(digest) for digest, _ in victims]
            if paths:
                await asyncio.to_thread(_unlink_all, paths)
        finally:
            for digest, event in events.items():
                del self._removing[digest]
                event.set()
            open_now = [digest for digest, _ in victims if self._cap.leased(digest)]
            if open_now:
                self._open_drains.setdefault(open_now[0], []).append(eviction.draining)
            else:
                for digest, _ in victims:
                    await self._release_open_drains(digest)
                await self._ledger.release(eviction.draining)

    async def _release_open_drains(self, digest: str) -> None:
        for draining in self._open_drains.pop(digest, ()):
            await self._ledger.release(draining)

    async def delete(self, digest: str) -> bool:
        eviction = await self._ledger.forget(digest)
        if eviction is None:
            return False
        await self._remove(eviction)
        return True

    async def gc(self) -> list[tuple[str, int]]:
        """Evict least-recently-used blobs until under the cap, as far as what is not
        leased or pinned allows."""
        return await self._cap.gc()

    async def verify(self, *, remove: bool = False) -> list[str]:
        bad: list[str] = []
        for digest, _ in await self._ledger.entries():
            if await self._ledger.size_of(digest) is None:
                continue  # evicted meanwhile
            async with self.lease(digest):
                ok = await asyncio.to_thread(_file_matches, self.blob_path(digest), digest)
            if ok is None:
                await self._forget_gone(digest)
            elif not ok:
                bad.append(digest)
                if remove:
                    await self.delete(digest)
        return bad


class _FilesystemBlobWriter:
    """A fill into `<root>/tmp/`, published by rename into `<root>/blobs/`."""

    def __init__(
        self,
        store: FilesystemBlobStore,
        digest: str,
        algorithm: str,
        hexpart: str,
        fd: int,
        path: Path,
        reservation: Reservation,
    ) -> None:
        self._store = store
        self._reservation = reservation
        self._digest = digest
        self._hexpart = hexpart
        self._hash = hashlib.new(algorithm)
        self._fd = _ThreadedFd(fd)
        self._path = path
        self._written = 0
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
        if beyond > 0:
            # Size unknown (or exceeded): reserve as the bytes come, before writing them.
            await self._store._cap.reserve(beyond, self._reservation)

        def write(fd: int) -> None:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            # After the write: hashlib releases the GIL for large buffers, so this runs
            # in the worker thread too.
            self._hash.update(chunk)

        await self._fd.call(write)
        self._written += len(chunk)

    def open_reader(self) -> BlobReader:
        if not self._fd.closed:
            return _FdReader(os.dup(self._fd.fd))
        if not self._committed:
            raise ValueError("the fill was aborted")
        # Only in the moment between publishing and the coordinator noticing it: one
        # open of a local file, not worth a thread hop.
        return _FdReader(os.open(self._store.blob_path(self._digest), os.O_RDONLY))

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
        # The room was reserved before the bytes were written: publishing only moves the
        # reservation into the index.
        await self._store._wait_removal(self._digest)
        final = self._store.blob_path(self._digest)
        try:
            await self._fd.call(lambda fd: make_durable(fd, self._path, final))
        except BaseException:
            await self.abort()
            raise
        self._finished = self._committed = True
        await self._store._publish(self._digest, self._written, self._reservation)
        await self._fd.close()

    async def abort(self) -> None:
        if self._finished:
            return
        self._finished = True
        await self._fd.close()
        try:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(self._path.unlink)
        finally:
            # After the unlink: until then the bytes are on disk.
            await self._store._ledger.release(self._reservation)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            # The index already forgot it; a file that cannot be removed is only wasted
            # space until the next start rescans (it was verified when published).
            log.error("cannot remove %s: %s", path, os.strerror(exc.errno or errno.EIO))


def _tree_bytes(folder: Path) -> int:
    """Bytes of the files directly in `folder` (ones vanishing meanwhile are skipped)."""
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def _file_matches(path: Path, digest: str) -> bool | None:
    """Whether the file hashes to `digest`; None when it is gone."""
    algorithm, _, hexpart = digest.partition(":")
    hasher = hashlib.new(algorithm)
    try:
        with path.open("rb") as file:
            while chunk := file.read(HASH_CHUNK):
                hasher.update(chunk)
    except FileNotFoundError:
        return None
    return hasher.hexdigest() == hexpart


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
