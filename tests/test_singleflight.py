"""FillCoordinator: one upstream fetch per digest; readers stream the fill; bad bytes never
complete a response and are never published."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from proxy.content.singleflight import (
    READ_CHUNK,
    TAIL_HOLD,
    FillCoordinator,
    StreamedBlob,
    UpstreamBlob,
)
from proxy.errors import (
    BlobUnknown,
    RangeInvalid,
    RegistryError,
    ServiceUnavailable,
    UpstreamUnavailable,
)
from proxy.storage.blobstore import BlobWriter, FilesystemBlobStore

SIZE = 300 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeUpstream:
    """An upstream blob endpoint that counts how often it is opened.

    `body` is what it sends, `size` the length it announces (None: no Content-Length).
    With `pause_at`, it stops after that many bytes until `release` is set.
    """

    def __init__(
        self,
        body: bytes,
        *,
        size: int | str | None = "auto",
        chunk: int = 16 * 1024,
        pause_at: int | None = None,
        error: BaseException | None = None,
        fail_after: int | None = None,
    ) -> None:
        self.body = body
        self.size = len(body) if size == "auto" else size
        self.chunk = chunk
        self.pause_at = pause_at
        self.error = error
        self.fail_after = fail_after
        self.opens = 0
        self.closed = 0
        self.sent = 0
        self.release = asyncio.Event()
        self.paused = asyncio.Event()

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[UpstreamBlob]:
        self.opens += 1
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        try:
            yield UpstreamBlob(self.size if isinstance(self.size, int) else None, self._chunks())
        finally:
            self.closed += 1

    async def _chunks(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.body), self.chunk):
            if self.pause_at is not None and start >= self.pause_at:
                self.paused.set()
                await self.release.wait()
            if self.fail_after is not None and start >= self.fail_after:
                raise ConnectionResetError("connection reset by peer")
            piece = self.body[start : start + self.chunk]
            self.sent += len(piece)
            yield piece
            await asyncio.sleep(0)
        if self.pause_at is not None and self.pause_at >= len(self.body):
            self.paused.set()
            await self.release.wait()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[FilesystemBlobStore]:
    store = FilesystemBlobStore(tmp_path, max_size=100 * 1024 * 1024)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def coordinator(store: FilesystemBlobStore) -> AsyncIterator[FillCoordinator]:
    coordinator = FillCoordinator(store)
    yield coordinator
    await coordinator.close()


async def read_all(
    coordinator: FillCoordinator,
    digest: str,
    upstream: FakeUpstream,
    *,
    offset: int = 0,
    length: int | None = None,
    entered: Callable[[StreamedBlob], None] | None = None,
) -> bytes:
    async with coordinator.stream(digest, upstream.open, offset=offset, length=length) as blob:
        if entered is not None:
            entered(blob)
        return b"".join([chunk async for chunk in blob])


async def read_until_error(
    coordinator: FillCoordinator, digest: str, upstream: FakeUpstream, received: list[int]
) -> BaseException:
    """Read like an HTTP handler would, counting the bytes it would have sent."""
    try:
        async with coordinator.stream(digest, upstream.open) as blob:
            async for chunk in blob:
                received.append(len(chunk))
    except Exception as exc:
        return exc
    raise AssertionError("the reader completed")


async def settle(coordinator: FillCoordinator) -> None:
    async with asyncio.timeout(10):
        await coordinator.drain()
    assert coordinator.in_flight == 0


async def test_twenty_concurrent_misses_make_one_upstream_fetch(
    coordinator: FillCoordinator, store: FilesystemBlobStore
) -> None:
    data = os.urandom(SIZE)
    digest = sha(data)
    upstream = FakeUpstream(data, pause_at=64 * 1024)
    attached: list[StreamedBlob] = []

    def entered(blob: StreamedBlob) -> None:
        attached.append(blob)
        if len(attached) == 20:
            upstream.release.set()

    results = await asyncio.gather(
        *(read_all(coordinator, digest, upstream, entered=entered) for _ in range(20))
    )

    assert upstream.opens == 1
    assert upstream.sent == len(data)
    assert all(result == data for result in results)
    assert all(not blob.cached and blob.size == len(data) for blob in attached)
    await settle(coordinator)
    assert await store.stat(digest) == len(data)

    # Now a cache hit: no upstream, whole or from an offset.
    later: list[StreamedBlob] = []
    assert await read_all(coordinator, digest, upstream, entered=later.append) == data
    assert later[0].cached
    assert await read_all(coordinator, digest, upstream, offset=1000, length=10) == data[1000:1010]
    assert upstream.opens == 1


async def test_cancelled_reader_does_not_abort_the_fill(
    coordinator: FillCoordinator, store: FilesystemBlobStore
) -> None:
    data = os.urandom(4 * READ_CHUNK)
    digest = sha(data)
    # Past a whole read chunk plus the withheld tail, so the client gets bytes first.
    upstream = FakeUpstream(data, pause_at=2 * READ_CHUNK)
    got_bytes = asyncio.Event()

    async def client() -> None:
        async with coordinator.stream(digest, upstream.open) as blob:
            async for _ in blob:
                got_bytes.set()

    task = asyncio.create_task(client())
    await asyncio.wait_for(got_bytes.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert coordinator.in_flight == 1

    upstream.release.set()
    await settle(coordinator)
    assert upstream.opens == 1
    assert await store.stat(digest) == len(data)
    path = await store.local_path(digest)
    assert path is not None and path.read_bytes() == data
    assert list((store.root / "tmp").iterdir()) == []


async def test_range_on_a_miss_is_answered_before_the_fill_completes(
    coordinator: FillCoordinator,
) -> None:
    data = os.urandom(SIZE)
    digest = sha(data)
    upstream = FakeUpstream(data, pause_at=128 * 1024)
    part = await asyncio.wait_for(
        read_all(coordinator, digest, upstream, offset=70_000, length=20_000), 5
    )
    assert part == data[70_000:90_000]
    assert coordinator.in_flight == 1  # still waiting on the upstream
    upstream.release.set()
    # An open-ended range from deep inside, joining the same fill.
    assert await read_all(coordinator, digest, upstream, offset=SIZE - 10) == data[-10:]
    assert upstream.opens == 1


async def test_range_chosen_once_the_size_is_known(coordinator: FillCoordinator) -> None:
    """A handler learns the size on entering, parses `Range` against it, then narrows."""
    data = os.urandom(SIZE)
    upstream = FakeUpstream(data, pause_at=128 * 1024)
    async with coordinator.stream(sha(data), upstream.open) as blob:
        assert blob.size == SIZE
        with pytest.raises(RangeInvalid):
            blob.narrow(SIZE)
        blob.narrow(1000, 500)
        assert blob.length == 500
        assert await asyncio.wait_for(anext(blob), 5) == data[1000:1500]
        with pytest.raises(RuntimeError):
            blob.narrow(0)
    upstream.release.set()


async def test_range_beyond_the_end_is_refused(coordinator: FillCoordinator) -> None:
    data = os.urandom(1000)
    upstream = FakeUpstream(data)
    with pytest.raises(RangeInvalid):
        await read_all(coordinator, sha(data), upstream, offset=1000)
    await settle(coordinator)
    with pytest.raises(RangeInvalid):
        await read_all(coordinator, sha(data), upstream, offset=5000)


async def test_the_unverified_tail_is_withheld(coordinator: FillCoordinator) -> None:
    data = os.urandom(SIZE)
    upstream = FakeUpstream(data, pause_at=SIZE)  # sends everything, then does not end
    received: list[int] = []
    reached = asyncio.Event()

    async def client() -> bytes:
        async with coordinator.stream(sha(data), upstream.open) as blob:
            chunks = []
            async for chunk in blob:
                received.append(len(chunk))
                chunks.append(chunk)
                reached.set()
            return b"".join(chunks)

    task = asyncio.create_task(client())
    async with asyncio.timeout(5):
        await upstream.paused.wait()
        await reached.wait()
    await asyncio.sleep(0.05)  # time enough to read on, if it could
    # It streamed before the digest was known, but not the tail.
    assert 0 < sum(received) <= SIZE - TAIL_HOLD
    upstream.release.set()
    assert await task == data


async def test_the_tail_is_released_once_verified_before_the_flush_to_disk(
    coordinator: FillCoordinator, store: FilesystemBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The readers' wait ends when the content hashes right, not when the (slow) fsync and
    rename are done: the client has the whole verified blob while the cache publishes."""
    import proxy.storage.blobstore

    data = os.urandom(SIZE)
    flushing, flush_may_end = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    real_make_durable = proxy.storage.blobstore.make_durable

    def slow_make_durable(fd: int, temp: Path, final: Path) -> None:
        loop.call_soon_threadsafe(flushing.set)
        asyncio.run_coroutine_threadsafe(flush_may_end.wait(), loop).result(timeout=10)
        real_make_durable(fd, temp, final)

    monkeypatch.setattr(proxy.storage.blobstore, "make_durable", slow_make_durable)
    upstream = FakeUpstream(data)
    async with asyncio.timeout(10):
        got = await read_all(coordinator, sha(data), upstream)
        assert got == data
        assert flushing.is_set()
        # Not published yet: the flush is still held.
        assert await store.stat(sha(data)) is None
        flush_may_end.set()
        await coordinator.drain()
    assert await store.stat(sha(data)) == SIZE


def corrupted(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    return bytes(flipped)


BAD_UPSTREAMS: dict[str, Callable[[bytes], FakeUpstream]] = {
    "corrupted byte": lambda data: FakeUpstream(corrupted(data)),
    "corrupted last byte": lambda data: FakeUpstream(data[:-1] + bytes([data[-1] ^ 1])),
    "truncated": lambda data: FakeUpstream(data[: SIZE * 2 // 3], size=SIZE),
    "truncated without length": lambda data: FakeUpstream(data[: SIZE * 2 // 3], size=None),
    "longer than announced": lambda data: FakeUpstream(data + os.urandom(100_000), size=SIZE),
    "html error page": lambda data: FakeUpstream(b"<html>oops</html>" * 20_000, size=None),
    "connection reset": lambda data: FakeUpstream(data, fail_after=SIZE // 2),
}


@pytest.mark.parametrize("case", sorted(BAD_UPSTREAMS))
async def test_bad_upstream_fails_every_reader_short_and_publishes_nothing(
    coordinator: FillCoordinator, store: FilesystemBlobStore, case: str
) -> None:
    data = os.urandom(SIZE)
    digest = sha(data)
    upstream = BAD_UPSTREAMS[case](data)
    outcomes: list[tuple[str, str, int]] = []
    coordinator = FillCoordinator(
        store, on_fill_finished=lambda *args: outcomes.append((args[0], args[2], args[3]))
    )
    counts: list[list[int]] = [[] for _ in range(20)]
    errors = await asyncio.gather(
        *(read_until_error(coordinator, digest, upstream, received) for received in counts)
    )

    assert upstream.opens == 1
    assert upstream.closed == 1
    assert all(isinstance(error, UpstreamUnavailable) for error in errors)
    assert len({id(error) for error in errors}) == 20  # each reader raises its own
    # Every response ends at least the withheld tail short of what the client was told
    # (the announced length) or, without one, of what the upstream sent.
    told = upstream.sent if upstream.size is None else min(SIZE, upstream.sent)
    for received in counts:
        assert sum(received) <= told - TAIL_HOLD
    assert await store.stat(digest) is None
    assert not store.blob_path(digest).exists()
    assert list((store.root / "tmp").iterdir()) == []
    assert coordinator.in_flight == 0
    expected = "failed" if case == "connection reset" else "digest_mismatch"
    assert [(d, outcome) for d, outcome, _ in outcomes] == [(digest, expected)]

    # Nothing is remembered about the failure: a good upstream fills it next time.
    good = FakeUpstream(data)
    assert await read_all(coordinator, digest, good) == data
    assert good.opens == 1
    await coordinator.close()


async def test_upstream_refusal_reaches_every_waiter(coordinator: FillCoordinator) -> None:
    upstream = FakeUpstream(b"", error=BlobUnknown("blob unknown to upstream"))
    results = await asyncio.gather(
        *(read_all(coordinator, sha(b"nope"), upstream) for _ in range(10)),
        return_exceptions=True,
    )
    assert upstream.opens == 1
    assert all(isinstance(result, BlobUnknown) for result in results)
    assert coordinator.in_flight == 0


async def test_unknown_length_upstream_is_streamed_and_published(
    coordinator: FillCoordinator, store: FilesystemBlobStore
) -> None:
    data = os.urandom(SIZE)
    upstream = FakeUpstream(data, size=None)
    sizes: list[int | None] = []
    assert await read_all(coordinator, sha(data), upstream, entered=lambda b: sizes.append(b.size))
    assert sizes == [None]
    assert await store.stat(sha(data)) == SIZE


async def test_small_and_empty_blobs(coordinator: FillCoordinator) -> None:
    for data in (b"", b"{}", os.urandom(TAIL_HOLD - 1), os.urandom(TAIL_HOLD + 1)):
        upstream = FakeUpstream(data)
        assert await read_all(coordinator, sha(data), upstream) == data
        assert await read_all(coordinator, sha(data), upstream) == data
        assert upstream.opens == 1


async def test_oversized_blob_is_refused(store: FilesystemBlobStore) -> None:
    coordinator = FillCoordinator(store, max_blob_size=1000)
    for size in (2000, None):
        upstream = FakeUpstream(os.urandom(2000), size=size)
        with pytest.raises(UpstreamUnavailable):
            await read_all(coordinator, sha(upstream.body), upstream)
    await coordinator.close()


async def test_close_fails_waiting_readers(
    coordinator: FillCoordinator, store: FilesystemBlobStore
) -> None:
    data = os.urandom(SIZE)
    upstream = FakeUpstream(data, pause_at=64 * 1024)
    received: list[int] = []
    reader = asyncio.create_task(read_until_error(coordinator, sha(data), upstream, received))
    async with asyncio.timeout(5):
        await upstream.paused.wait()
    await coordinator.close()
    assert isinstance(await reader, ServiceUnavailable)
    assert coordinator.in_flight == 0
    assert list((store.root / "tmp").iterdir()) == []


class FullDiskStore(FilesystemBlobStore):
    async def begin_fill(self, digest: str, size: int | None = None) -> BlobWriter:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_storage_failure_is_not_blamed_on_the_upstream(tmp_path: Path) -> None:
    store = FullDiskStore(tmp_path, max_size=1)
    await store.open()
    coordinator = FillCoordinator(store)
    upstream = FakeUpstream(b"data")
    with pytest.raises(RegistryError) as raised:
        await read_all(coordinator, sha(b"data"), upstream)
    assert type(raised.value) is RegistryError
    assert raised.value.status == 500
    await coordinator.close()
    await store.close()


async def test_a_blob_the_cache_has_no_room_for_is_relayed_verified_and_not_cached(
    tmp_path: Path,
) -> None:
    store = FilesystemBlobStore(tmp_path, max_size=SIZE // 2)
    await store.open()
    outcomes: list[tuple[str, str, str]] = []
    coordinator = FillCoordinator(
        store, on_fill_finished=lambda d, up, outcome, _n: outcomes.append((d, up, outcome))
    )
    data = os.urandom(SIZE)
    digest = sha(data)
    upstream = FakeUpstream(data)
    results = await asyncio.gather(*(read_all(coordinator, digest, upstream) for _ in range(3)))
    assert results == [data] * 3
    ranged = await read_all(coordinator, digest, upstream, offset=1000, length=5000)
    assert ranged == data[1000:6000]
    assert await store.stat(digest) is None
    assert list((tmp_path / "tmp").iterdir()) == []
    assert (await store.stats()).used == 0
    assert {outcome for _, _, outcome in outcomes} == {"no_room"}
    assert upstream.opens == upstream.closed  # every relay released its upstream response
    # One fill that found no room, three relays; then, the blob being larger than the
    # whole cap, the ranged read relays at once.
    assert upstream.opens == 5
    await coordinator.close()
    await store.close()


async def test_a_relayed_blob_with_bad_content_ends_short(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path, max_size=1024)
    await store.open()
    coordinator = FillCoordinator(store)
    data = os.urandom(SIZE)
    upstream = FakeUpstream(data[:-1] + bytes([data[-1] ^ 1]))
    received: list[int] = []
    error = await read_until_error(coordinator, sha(data), upstream, received)
    assert isinstance(error, UpstreamUnavailable)
    assert sum(received) <= SIZE - TAIL_HOLD
    assert upstream.opens == upstream.closed
    await coordinator.close()
    await store.close()


# --- what another replica streams (follow) and where a fill gets its bytes (fill_source) --


async def test_follow_never_starts_a_fill(coordinator: FillCoordinator) -> None:
    async with coordinator.follow(sha(b"nobody fills this")) as blob:
        assert blob is None
    assert coordinator.in_flight == 0


async def test_follow_reads_a_running_fill_tail_withheld_then_whole(
    coordinator: FillCoordinator,
) -> None:
    body = os.urandom(SIZE)
    digest = sha(body)
    upstream = FakeUpstream(body, pause_at=len(body))  # everything sent, not yet ended
    local = asyncio.create_task(read_all(coordinator, digest, upstream))
    await upstream.paused.wait()
    async with coordinator.follow(digest) as blob:
        assert blob is not None and blob.size == len(body) and not blob.cached
        received = b""
        # Until the fill verifies, the follower gets all but the withheld tail.
        while len(received) < len(body) - TAIL_HOLD:
            received += await anext(blob)
        assert received == body[: len(body) - TAIL_HOLD]
        upstream.release.set()
        async for chunk in blob:
            received += chunk
    assert received == body
    assert await local == body
    assert upstream.opens == 1
    # Once cached, a follower reads the cache.
    await coordinator.drain()
    async with coordinator.follow(digest) as cached:
        assert cached is not None and cached.cached
        assert b"".join([chunk async for chunk in cached]) == body


async def test_a_failed_fill_fails_its_follower(coordinator: FillCoordinator) -> None:
    body = os.urandom(SIZE)
    digest = sha(body)
    upstream = FakeUpstream(body, fail_after=128 * 1024, pause_at=64 * 1024)
    local = asyncio.create_task(read_all(coordinator, digest, upstream))
    await upstream.paused.wait()
    async with coordinator.follow(digest) as blob:
        assert blob is not None
        upstream.release.set()
        with pytest.raises(RegistryError):
            async for _ in blob:
                pass
    with pytest.raises(RegistryError):
        await local
    async with coordinator.follow(digest) as after:
        assert after is None


async def test_a_fill_source_feeds_the_fill_instead_of_the_upstream(
    coordinator: FillCoordinator,
) -> None:
    body = os.urandom(SIZE)
    digest = sha(body)
    upstream, peer = FakeUpstream(body), FakeUpstream(body)
    async with coordinator.stream(digest, upstream.open, fill_source=peer.open) as blob:
        assert b"".join([chunk async for chunk in blob]) == body
    assert (peer.opens, upstream.opens) == (1, 0)


async def test_the_next_chunk_is_received_while_a_write_is_in_flight(
    store: FilesystemBlobStore, coordinator: FillCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fill does not stop the upstream transfer for each write: the first write is
    held until the fill has asked the upstream for the second chunk, which happens only
    if the fill reads on while the write is in flight (else the hold times out and the
    fill fails)."""
    data = os.urandom(4 * 16 * 1024)
    upstream = FakeUpstream(data, pause_at=16 * 1024)  # pauses when asked for chunk two
    held: list[bool] = []
    begin_fill = store.begin_fill

    async def begin_held_fill(digest: str, size: int | None = None) -> BlobWriter:
        writer = await begin_fill(digest, size)
        write = writer.write

        async def held_write(chunk: bytes) -> None:
            if not held:
                held.append(True)
                await asyncio.wait_for(upstream.paused.wait(), 5)
                upstream.release.set()
            await write(chunk)

        monkeypatch.setattr(writer, "write", held_write)
        return writer

    monkeypatch.setattr(store, "begin_fill", begin_held_fill)
    assert await read_all(coordinator, sha(data), upstream) == data
    assert held and upstream.release.is_set()
