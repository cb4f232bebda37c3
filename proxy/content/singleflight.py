"""Single-flight fills: one upstream transfer per digest, however many clients miss at once.

Owns `FillCoordinator`. The first miss for a digest starts a fill task that copies the
upstream body into a `BlobWriter`; that task belongs to the coordinator, not to any
request, so a client that disconnects does not stop it. Every reader, the first included,
streams from what the fill has written so far, from any offset, so a `Range` on a miss is
answered as soon as its bytes have arrived. While a fill runs, readers take whole
`READ_CHUNK`s (or the rest of their range): one thread hop per 256 KiB rather than per
upstream packet, which is most of the cost of a cold fill with many readers.

Until the digest is verified, readers are held back `tail_hold` bytes (32 KiB, Harbor's
figure) from the end of what was written: a corrupted or truncated transfer fails every
reader before it has the whole length, so each client's response ends short of its
`Content-Length` and the client rejects it instead of storing bad bytes. A failed fill
fails every reader waiting on it (security.md 14) and publishes nothing.

A fill reserves the blob's announced length under the cache cap before writing. When the
cache has no room for it (everything else is leased, pinned or being filled, or the blob
is larger than the cap), nothing is cached: each reader relays the blob from its own
upstream request (`RelayedBlob`), hashed as it streams, with the same withheld tail, so a
client still gets verified bytes or a body that ends short.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from cachetools import LRUCache

from proxy.errors import DigestInvalid, RegistryError, ServiceUnavailable, UpstreamUnavailable
from proxy.http.ranges import unsatisfiable
from proxy.storage.blobstore import BlobReader, BlobStore, BlobWriter, CacheFull, SharedBlobs

log = logging.getLogger(__name__)

TAIL_HOLD = 32 * 1024
READ_CHUNK = 1024 * 1024
# How long a reader waits for a whole chunk when only part of one has arrived.
PARTIAL_WAIT = 0.05


@dataclass(frozen=True, slots=True)
class UpstreamBlob:
    """An upstream blob response that answered: its length (if sent) and its body."""

    size: int | None
    chunks: AsyncIterator[bytes]
    from_peer: bool = False
    """The bytes are another replica's fill (`replica_fills`), which publishes the blob
    itself: a store all replicas share (`SharedBlobs`) then need not store it again."""


# Opens the upstream transfer. Entered by the fill task, so the upstream response is
# released in the task that read it; raise a RegistryError (BlobUnknown, Denied,
# UpstreamUnavailable...) for an upstream that did not answer with the blob.
OpenUpstream = Callable[[], contextlib.AbstractAsyncContextManager[UpstreamBlob]]

# (digest, upstream, outcome, bytes received); `upstream` is the label the fill was
# started with; outcome is "ok", "digest_mismatch", "failed", "no_room" (not cached: the
# cache had no room, readers relay) or "cancelled".
FillObserver = Callable[[str, str, str, int], None]


class _Fill:
    """The shared state of one fill, read by its streams."""

    def __init__(self, digest: str, tail_hold: int, upstream: str) -> None:
        self.digest = digest
        self.tail_hold = tail_hold
        self.upstream = upstream
        # The cache had no room: readers relay from their own upstream request instead.
        self.no_room = False
        self.writer: BlobWriter | None = None
        self.size: int | None = None
        self.written = 0
        self.opened = False
        self.committed = False
        # Set once the content hashed right: readers may have the tail while the fill
        # still flushes to disk (durability matters to the cache, not to them).
        self.verified = False
        self.error: RegistryError | None = None
        self._changed = asyncio.Event()

    @property
    def readable(self) -> int:
        """How many bytes readers may have: all once verified, else all but the tail."""
        if self.committed or self.verified:
            return self.written
        return max(0, self.written - self.tail_hold)

    def notify(self) -> None:
        # A fresh event per change: every waiter wakes once and re-checks the state.
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def changed(self) -> None:
        await self._changed.wait()

    def failure(self) -> RegistryError:
        """A copy of the fill's error for one reader (each raise gets its own traceback)."""
        error = self.error
        assert error is not None
        copy = type(error)(error.message, detail=error.detail, headers=error.headers)
        copy.__cause__ = error.__cause__
        return copy


class StreamedBlob:
    """The bytes of one blob from `offset`, from the cache or from a fill in progress.

    Iterate it for chunks. It raises a RegistryError if the fill fails: the response
    already sent must then be aborted, not completed.
    """

    def __init__(
        self,
        reader: BlobReader,
        *,
        size: int | None,
        offset: int,
        length: int | None,
        fill: _Fill | None,
        chunk_size: int,
    ) -> None:
        self.size = size
        """The whole blob's size (None: the upstream did not say; known at the end)."""
        self.cached = fill is None
        """Whether this is a cache hit (no fill involved)."""
        self._reader = reader
        self._fill = fill
        self._chunk = chunk_size
        self._started = False
        self._partial_since: float | None = None
        self.offset = self._pos = offset
        self._end: int | None = None
        self.narrow(offset, length)

    def narrow(self, offset: int, length: int | None = None) -> None:
        """Yield only `length` bytes from `offset` (a `Range` parsed once `size` is
        known); before iterating. RangeInvalid if it starts beyond the end."""
        if self._started:
            raise RuntimeError("narrow() after iteration began")
        self._end = _selection_end(offset, length, self.size)
        self.offset = self._pos = offset

    @property
    def length(self) -> int | None:
        """How many bytes this stream yields in all, when known."""
        return None if self._end is None else self._end - self.offset

    def __aiter__(self) -> StreamedBlob:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        while True:
            if self._end is not None and self._pos >= self._end:
                raise StopAsyncIteration
            fill = self._fill
            if fill is None:
                assert self._end is not None  # a cached blob's size is known
                available = self._end
            else:
                if fill.error is not None:
                    raise fill.failure()
                available = fill.readable
                if self._pos >= available and fill.committed:
                    # The size was unknown until now; nothing more will come.
                    raise StopAsyncIteration
                wanted = self._chunk
                if self._end is not None:
                    wanted = min(wanted, self._end - self._pos)
                if available - self._pos < wanted and not fill.committed:
                    if available <= self._pos:
                        self._partial_since = None
                        await fill.changed()
                        continue
                    # Some bytes are there: wait a moment for a whole chunk (fewer, larger
                    # reads), but never hold back what a slow upstream already sent.
                    now = asyncio.get_running_loop().time()
                    if self._partial_since is None:
                        self._partial_since = now
                    remaining = self._partial_since + PARTIAL_WAIT - now
                    if remaining > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(fill.changed(), remaining)
                        continue
                self._partial_since = None
            wanted = available - self._pos
            if self._end is not None:
                wanted = min(wanted, self._end - self._pos)
            data = await self._reader.read_at(self._pos, min(wanted, self._chunk))
            if not data:
                raise RegistryError(
                    "cached blob is shorter than recorded", detail={"offset": self._pos}
                )
            self._pos += len(data)
            return data

    async def aclose(self) -> None:
        await self._reader.aclose()


class RelayedBlob:
    """A blob the cache had no room for, relayed from one upstream response to one client.

    Same interface as `StreamedBlob`. Every byte of the blob is hashed (also those before
    `offset`, which are read and dropped); until the digest verified, the last `tail_hold`
    bytes received are withheld, so bad content ends short as it does for a fill.
    """

    cached = False

    def __init__(
        self,
        digest: str,
        upstream: UpstreamBlob,
        release: contextlib.AsyncExitStack,
        *,
        offset: int,
        length: int | None,
        tail_hold: int,
    ) -> None:
        self.size = upstream.size
        self._digest = digest
        self._chunks = upstream.chunks
        self._release = release
        self._tail_hold = tail_hold
        algorithm = digest.split(":", 1)[0]
        self._hash = hashlib.new(algorithm)
        self._received = 0  # upstream bytes read so far
        self._pending = bytearray()  # selected bytes received but not yet handed out
        self._pending_at = 0  # blob offset of _pending[0]
        self._verified = False
        self._started = False
        self.offset = offset
        self._end: int | None = None
        self.narrow(offset, length)

    def narrow(self, offset: int, length: int | None = None) -> None:
        """As `StreamedBlob.narrow`."""
        if self._started:
            raise RuntimeError("narrow() after iteration began")
        self._end = _selection_end(offset, length, self.size)
        self.offset = self._pending_at = offset

    @property
    def length(self) -> int | None:
        """How many bytes this stream yields in all, when known."""
        return None if self._end is None else self._end - self.offset

    def __aiter__(self) -> RelayedBlob:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        while True:
            releasable = self._received if self._verified else self._received - self._tail_hold
            if self._end is not None:
                releasable = min(releasable, self._end)
            count = releasable - self._pending_at
            # Hand out sizeable pieces, except the last ones of the range or the blob.
            whole = count >= READ_CHUNK // 4 or releasable == self._end
            if count > 0 and (whole or self._verified):
                data = bytes(self._pending[:count])
                del self._pending[:count]
                self._pending_at += count
                return data
            if self._verified or (self._end is not None and self._pending_at >= self._end):
                raise StopAsyncIteration
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self._finish()
                continue
            self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        start = self._received
        self._received += len(chunk)
        if self.size is not None and self._received > self.size:
            raise _mismatch(self._digest, "upstream sent more than its Content-Length")
        self._hash.update(chunk)
        # Keep only the part inside the selected range.
        low = max(start, self._pending_at + len(self._pending))
        high = self._received if self._end is None else min(self._received, self._end)
        if high > low:
            self._pending += chunk[low - start : high - start]

    def _finish(self) -> None:
        actual = f"{self._hash.name}:{self._hash.hexdigest()}"
        if actual != self._digest or (self.size is not None and self._received != self.size):
            raise _mismatch(self._digest, "upstream sent content that does not match its digest")
        self._verified = True

    async def aclose(self) -> None:
        await self._release.aclose()


def _mismatch(digest: str, message: str) -> RegistryError:
    log.warning("relayed upstream content for %s does not match its digest", digest)
    return UpstreamUnavailable(message, detail={"digest": digest})


class FillCoordinator:
    """Coalesces concurrent misses of one digest into one upstream fill."""

    def __init__(
        self,
        store: BlobStore,
        *,
        tail_hold: int = TAIL_HOLD,
        chunk_size: int = READ_CHUNK,
        max_blob_size: int | None = None,
        on_fill_finished: FillObserver | None = None,
    ) -> None:
        self._store = store
        self._tail_hold = tail_hold
        self._chunk = chunk_size
        self._max_blob_size = max_blob_size
        self._observer = on_fill_finished
        self._fills: dict[str, _Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Digests larger than the whole cap: relayed at once, without a fill that would
        # open the upstream only to find no room.
        self._never_fit: LRUCache[str, bool] = LRUCache(maxsize=1024)

    @property
    def in_flight(self) -> int:
        """Fills running now."""
        return len(self._fills)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        digest: str,
        open_upstream: OpenUpstream,
        *,
        offset: int = 0,
        length: int | None = None,
        upstream: str = "unknown",
        fill_source: OpenUpstream | None = None,
    ) -> AsyncIterator[StreamedBlob | RelayedBlob]:
        """The blob from `offset` (at most `length` bytes): cached, or joining or starting
        the fill of `digest` with `fill_source` (default: `open_upstream`, which relays
        use: a fill's source may be another replica's fill, see `replica_fills`).

        Entering waits until the source is known (the upstream answered, with its
        length); errors before that (BlobUnknown, Denied, UpstreamUnavailable...) are
        raised here, before any response is started. The caller must already know that
        the requesting repository holds `digest` (RepositoryIndex or upstream): a fill
        started for another repository is shared. `upstream` labels the fill for the
        observer (the registry the request addressed).
        """
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        async with self._store.lease(digest):
            blob = await self._attach(
                digest, open_upstream, fill_source or open_upstream, offset, length, upstream
            )
            try:
                yield blob
            finally:
                await blob.aclose()

    async def _attach(
        self,
        digest: str,
        open_upstream: OpenUpstream,
        fill_source: OpenUpstream,
        offset: int,
        length: int | None,
        upstream: str,
    ) -> StreamedBlob | RelayedBlob:
        fill = self._fills.get(digest)
        if fill is None or fill.committed:
            size = await self._store.stat(digest)
            if size is not None:
                _check_offset(offset, size)
                reader = await self._store.open_reader(digest)
                if reader is not None:
                    return self._streamed(reader, size, offset, length, None)
            if digest in self._never_fit:
                return await self._relay(digest, open_upstream, offset, length)
            # The awaits above let another request start a fill meanwhile.
            fill = self._fills.get(digest)
            if fill is None or fill.committed:
                fill = self._start(digest, fill_source, upstream)
        while not fill.opened and fill.error is None:
            await fill.changed()
        if fill.no_room:
            return await self._relay(digest, open_upstream, offset, length)
        if fill.error is not None:
            raise fill.failure()
        assert fill.writer is not None
        if fill.size is not None:
            _check_offset(offset, fill.size)
        try:
            # No await since the state check: if the writer has just committed, this
            # reads the published blob.
            reader = fill.writer.open_reader()
        except ValueError:
            # Aborted: the fill task is recording why.
            while fill.error is None:
                await fill.changed()
            raise fill.failure() from None
        return self._streamed(reader, fill.size, offset, length, fill)

    @contextlib.asynccontextmanager
    async def follow(self, digest: str) -> AsyncIterator[StreamedBlob | None]:
        """The whole blob from the fill of `digest` running here, or from the cache; None
        when neither (no fill, or it failed or found no room). Never starts a fill, never
        reaches an upstream: this is what another replica streams from (`replica_fills`),
        with the same withheld tail as a local reader."""
        async with self._store.lease(digest):
            blob = await self._follow(digest)
            try:
                yield blob
            finally:
                if blob is not None:
                    await blob.aclose()

    async def _follow(self, digest: str) -> StreamedBlob | None:
        fill = self._fills.get(digest)
        if fill is None or fill.committed:
            size = await self._store.stat(digest)
            if size is not None:
                reader = await self._store.open_reader(digest)
                if reader is not None:
                    return self._streamed(reader, size, 0, None, None)
            fill = self._fills.get(digest)
            if fill is None or fill.committed:
                return None
        while not fill.opened and fill.error is None:
            await fill.changed()
        if fill.no_room or fill.error is not None:
            return None
        assert fill.writer is not None
        try:
            reader = fill.writer.open_reader()
        except ValueError:
            return None  # aborted: the fill failed
        return self._streamed(reader, fill.size, 0, None, fill)

    def _streamed(
        self,
        reader: BlobReader,
        size: int | None,
        offset: int,
        length: int | None,
        fill: _Fill | None,
    ) -> StreamedBlob:
        return StreamedBlob(
            reader, size=size, offset=offset, length=length, fill=fill, chunk_size=self._chunk
        )

    async def _relay(
        self, digest: str, open_upstream: OpenUpstream, offset: int, length: int | None
    ) -> RelayedBlob:
        """This reader's own upstream transfer of a blob the cache has no room for."""
        async with contextlib.AsyncExitStack() as stack:
            upstream = await stack.enter_async_context(open_upstream())
            limit = self._max_blob_size
            if upstream.size is not None and limit is not None and upstream.size > limit:
                raise UpstreamUnavailable(
                    "blob is larger than the gate may relay", detail={"size": upstream.size}
                )
            if upstream.size is not None:
                _check_offset(offset, upstream.size)
            release = stack.pop_all()
        return RelayedBlob(
            digest, upstream, release, offset=offset, length=length, tail_hold=self._tail_hold
        )

    def _start(self, digest: str, open_upstream: OpenUpstream, upstream: str) -> _Fill:
        fill = _Fill(digest, self._tail_hold, upstream)
        self._fills[digest] = fill
        task = asyncio.create_task(self._run(fill, open_upstream), name=f"fill {digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill

    async def _run(self, fill: _Fill, open_upstream: OpenUpstream) -> None:
        outcome = "ok"
        try:
            async with self._store.lease(fill.digest):
                await self._copy(fill, open_upstream)
        except asyncio.CancelledError:
            if not fill.committed:
                outcome = "cancelled"
                fill.error = ServiceUnavailable("the gate is shutting down")
            raise
        except CacheFull as exc:
            # Readers that have not started relay on their own; one already reading a
            # fill that outgrew its room (no announced length) ends short.
            log.warning("not caching %s: %s", fill.digest, exc)
            if exc.never:
                self._never_fit[fill.digest] = True
            fill.error = ServiceUnavailable("the cache has no room for this blob; retry")
            fill.error.__cause__ = exc
            outcome = "no_room"
        except Exception as exc:
            if fill.committed:
                # Only releasing the upstream response failed; the blob is published.
                log.warning("closing the upstream after filling %s failed: %r", fill.digest, exc)
            else:
                fill.error, outcome = _failure(fill.digest, exc)
        finally:
            if self._fills.get(fill.digest) is fill:
                del self._fills[fill.digest]
            fill.notify()
            if self._observer is not None:
                self._observer(fill.digest, fill.upstream, outcome, fill.written)

    async def _copy(self, fill: _Fill, open_upstream: OpenUpstream) -> None:
        async with open_upstream() as upstream:
            size = upstream.size
            limit = self._max_blob_size
            if size is not None and limit is not None and size > limit:
                raise UpstreamUnavailable(
                    "blob is larger than the cache may hold", detail={"size": size}
                )
            try:
                with _storing():
                    if upstream.from_peer and isinstance(self._store, SharedBlobs):
                        # The peer publishes it to the store we share: relay and verify
                        # its stream for our readers, but do not upload it again.
                        writer = await self._store.begin_relay(fill.digest, size)
                    else:
                        # Reserves the announced length under the cap before any byte
                        # lands.
                        writer = await self._store.begin_fill(fill.digest, size)
            except CacheFull:
                fill.no_room = True
                raise
            # One chunk is written (and hashed, in the writer's thread) while the next one
            # is received: awaiting each write before reading on would stop the upstream
            # transfer for every write (aiohttp pauses the socket once its small buffer
            # is full). Writes stay in order, one at a time, and readers are told of
            # bytes only once they are written.
            pending: asyncio.Task[None] | None = None
            try:
                fill.writer, fill.size, fill.opened = writer, size, True
                fill.notify()
                received = 0
                async for chunk in upstream.chunks:
                    received += len(chunk)
                    # Stop at once on excess: readers must never get past the announced
                    # length, and an endless body must not fill the disk.
                    if size is not None and received > size:
                        raise DigestInvalid("upstream sent more than its Content-Length")
                    if limit is not None and received > limit:
                        raise UpstreamUnavailable("blob is larger than the cache may hold")
                    if pending is not None:
                        await pending
                    pending = asyncio.create_task(_write(fill, writer, chunk, received))
                if pending is not None:
                    await pending
                    pending = None

                def verified() -> None:
                    fill.verified = True
                    fill.notify()

                with _storing():
                    await writer.commit(size, on_verified=verified)
                fill.committed = True
            except BaseException:
                if pending is not None:
                    # The writer's thread must be done with the file before it goes.
                    await asyncio.wait([pending])
                await writer.abort()
                raise

    async def drain(self) -> None:
        """Wait until no fill is running (graceful shutdown, tests, `cache` commands)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop every fill (shutdown); their readers get ServiceUnavailable."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _failure(digest: str, exc: Exception) -> tuple[RegistryError, str]:
    """What readers of a failed fill are told, and the outcome for metrics."""
    error: RegistryError
    if isinstance(exc, DigestInvalid):
        log.warning("upstream content for %s does not match its digest", digest)
        error = UpstreamUnavailable(
            "upstream sent content that does not match its digest", detail={"digest": digest}
        )
        outcome = "digest_mismatch"
    elif isinstance(exc, RegistryError):
        return exc, "failed"
    elif isinstance(exc, _StorageFailed):
        log.error("cache fill of %s failed: %s", digest, exc.__cause__)
        error = RegistryError("the cache could not store the blob")
        outcome = "failed"
    else:
        # Anything else came from the upstream (aiohttp payload errors, resets).
        error = UpstreamUnavailable("upstream transfer failed", detail={"digest": digest})
        outcome = "failed"
    error.__cause__ = exc
    return error, outcome


class _StorageFailed(Exception):
    """The cache could not write the fill (disk full, permissions): not the upstream's
    fault, so not reported as such."""


async def _write(fill: _Fill, writer: BlobWriter, chunk: bytes, end: int) -> None:
    """Write a chunk of the fill; then readers may have the bytes up to `end` (at once,
    not when the next chunk arrives: a slow upstream must not hold back what is here)."""
    with _storing():
        await writer.write(chunk)
    fill.written = end
    fill.notify()


@contextlib.contextmanager
def _storing() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _StorageFailed from exc


def _selection_end(offset: int, length: int | None, size: int | None) -> int | None:
    """Where a stream narrowed to (`offset`, `length`) ends, clipped to the blob's `size`
    when known (None: at the end of a blob of unknown size). ValueError for negative
    values, RangeInvalid for an offset beyond the end."""
    if offset < 0 or (length is not None and length < 0):
        raise ValueError("offset and length must not be negative")
    if size is not None:
        _check_offset(offset, size)
    end = None if length is None else offset + length
    if size is not None:
        end = size if end is None else min(end, size)
    return end


def _check_offset(offset: int, size: int) -> None:
    if offset > 0 and offset >= size:
        raise unsatisfiable(size)
