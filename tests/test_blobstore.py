"""FilesystemBlobStore: only verified, complete blobs are published; LRU under a byte cap."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from proxy.errors import DigestInvalid
from proxy.storage.blobstore import (
    BlobRedirects,
    CacheFull,
    FilesystemBlobStore,
    LocalBlobFiles,
    StorageLocked,
)
from proxy.storage.redis_ledger import RedisLedger
from tests.support.engines import RedisServer

REPO_ROOT = Path(__file__).resolve().parent.parent


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def put(store: FilesystemBlobStore, data: bytes) -> str:
    digest = sha(data)
    writer = await store.begin_fill(digest, len(data))
    await writer.write(data)
    await writer.commit(len(data))
    return digest


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[FilesystemBlobStore]:
    store = FilesystemBlobStore(tmp_path, max_size=10_000_000)
    await store.open()
    yield store
    await store.close()


def test_the_filesystem_store_offers_local_files_and_no_redirects(
    store: FilesystemBlobStore,
) -> None:
    # The pull path chooses how to send a hit by these capabilities (sendfile here).
    assert isinstance(store, LocalBlobFiles)
    assert not isinstance(store, BlobRedirects)


async def test_publishes_only_after_verified_commit(store: FilesystemBlobStore) -> None:
    data = os.urandom(300_000)
    digest = sha(data)
    writer = await store.begin_fill(digest)
    for start in range(0, len(data), 65536):
        await writer.write(data[start : start + 65536])
        assert await store.stat(digest) is None
        assert await store.local_path(digest) is None
        assert await store.open_reader(digest) is None
    await writer.commit(len(data))

    assert await store.stat(digest) == len(data)
    path = await store.local_path(digest)
    assert path is not None
    assert path.read_bytes() == data
    assert path == store.root / "blobs" / "sha256" / digest.removeprefix("sha256:")
    assert list((store.root / "tmp").iterdir()) == []
    stats = await store.stats()
    assert (stats.count, stats.bytes) == (1, len(data))


async def test_digest_mismatch_discards_and_raises(store: FilesystemBlobStore) -> None:
    digest = sha(b"the real content")
    writer = await store.begin_fill(digest)
    await writer.write(b"<html>not the blob</html>")
    with pytest.raises(DigestInvalid):
        await writer.commit()
    assert await store.stat(digest) is None
    assert not store.blob_path(digest).exists()
    assert list((store.root / "tmp").iterdir()) == []
    await writer.abort()  # harmless after a failed commit


async def test_size_mismatch_raises(store: FilesystemBlobStore) -> None:
    data = b"abc" * 1000
    writer = await store.begin_fill(sha(data))
    await writer.write(data)
    with pytest.raises(DigestInvalid):
        await writer.commit(len(data) + 1)
    assert await store.stat(sha(data)) is None


async def test_abort_removes_the_temp_file(store: FilesystemBlobStore) -> None:
    writer = await store.begin_fill(sha(b"x"))
    await writer.write(b"partial")
    assert len(list((store.root / "tmp").iterdir())) == 1
    await writer.abort()
    assert list((store.root / "tmp").iterdir()) == []
    with pytest.raises(ValueError):
        writer.open_reader()


@pytest.mark.parametrize("digest", ["sha256:../../etc/passwd", "sha256:ABC", "md5:abcd"])
async def test_malformed_digest_never_becomes_a_path(
    store: FilesystemBlobStore, digest: str
) -> None:
    with pytest.raises(DigestInvalid):
        await store.begin_fill(digest)
    with pytest.raises(DigestInvalid):
        store.blob_path(digest)


async def test_writer_reader_sees_growing_fill_and_survives_commit(
    store: FilesystemBlobStore,
) -> None:
    data = os.urandom(100_000)
    writer = await store.begin_fill(sha(data))
    await writer.write(data[:40_000])
    reader = writer.open_reader()
    assert await reader.read_at(0, 100_000) == data[:40_000]
    await writer.write(data[40_000:])
    await writer.commit(len(data))
    assert await reader.read_at(90_000, 20_000) == data[90_000:]
    await reader.aclose()
    late = writer.open_reader()  # after commit: reads the published blob
    assert await late.read_at(0, 10) == data[:10]
    await late.aclose()


async def test_crash_mid_fill_leaves_nothing_served(tmp_path: Path) -> None:
    """A gate killed with SIGKILL mid-fill: after restart the temp file is gone and the
    digest is a miss (the lock died with the process)."""
    data = os.urandom(200_000)
    digest = sha(data)
    child = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from proxy.storage.blobstore import FilesystemBlobStore\n"
        "async def main():\n"
        "    store = FilesystemBlobStore(Path(sys.argv[1]), 10**9)\n"
        "    await store.open()\n"
        "    writer = await store.begin_fill(sys.argv[2])\n"
        "    await writer.write(b'x' * int(sys.argv[3]))\n"
        "    print('filling', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        child,
        str(tmp_path),
        digest,
        "100000",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    assert line == b"filling\n"
    assert len(list((tmp_path / "tmp").iterdir())) == 1
    process.send_signal(signal.SIGKILL)
    await process.wait()

    store = FilesystemBlobStore(tmp_path, max_size=10**9)
    await store.open()
    try:
        assert list((tmp_path / "tmp").iterdir()) == []
        assert await store.stat(digest) is None
        assert await store.local_path(digest) is None
        assert (await store.stats()).count == 0
        assert await store.verify() == []
    finally:
        await store.close()


async def test_second_gate_on_the_same_directory_is_refused(
    store: FilesystemBlobStore, tmp_path: Path
) -> None:
    other = FilesystemBlobStore(tmp_path, max_size=1)
    with pytest.raises(StorageLocked):
        await other.open()
    # A read-only tool may still look (and must not touch the running gate's fills).
    writer = await store.begin_fill(sha(b"in progress"))
    await writer.write(b"in progress")
    await other.open(exclusive=False)
    assert len(list((tmp_path / "tmp").iterdir())) == 1
    await writer.abort()


async def test_lru_eviction_holds_the_cap(tmp_path: Path) -> None:
    evicted: list[tuple[str, int]] = []
    store = FilesystemBlobStore(
        tmp_path, max_size=3000, on_evict=lambda digest, size: evicted.append((digest, size))
    )
    await store.open()
    a = await put(store, b"a" * 1000)
    b = await put(store, b"b" * 1000)
    c = await put(store, b"c" * 1000)
    assert await store.local_path(a) is not None  # a is now more recent than b
    d = await put(store, b"d" * 1000)

    assert evicted == [(b, 1000)]
    assert await store.stat(b) is None
    assert not store.blob_path(b).exists()
    for digest in (a, c, d):
        assert await store.stat(digest) == 1000
    assert (await store.stats()).bytes <= 3000

    await store.open_reader(c)  # reading counts as an access too
    e = await put(store, b"e" * 1500)
    assert [digest for digest, _ in evicted[1:]] == [a, d]
    assert {await store.stat(x) for x in (c, e)} == {1000, 1500}
    assert (await store.stats()).bytes <= 3000
    await store.close()


async def test_the_accounting_may_live_in_a_shared_redis_ledger(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    prefix = f"blobstore-{os.getpid()}-{id(tmp_path)}:"
    client = Redis.from_url(redis_server.redis_url)
    ledger, other = RedisLedger(client, key_prefix=prefix), RedisLedger(client, key_prefix=prefix)
    try:
        store = FilesystemBlobStore(tmp_path, max_size=2500, ledger=ledger)
        await store.open()
        a = await put(store, b"a" * 1000)
        b = await put(store, b"b" * 1000)
        assert await store.local_path(a) is not None  # a is now more recent than b
        c = await put(store, b"c" * 1000)
        assert await store.stat(b) is None and not store.blob_path(b).exists()
        # Another process's view of the same ledger agrees, nothing reserved or draining.
        assert await other.entries() == [(a, 1000), (c, 1000)]
        assert (await other.usage()).used == 2000
        await store.close()
        # A restart re-lists the directory into the shared ledger without counting twice.
        store = FilesystemBlobStore(tmp_path, max_size=2500, ledger=ledger)
        await store.open()
        usage = await other.usage()
        assert (usage.blobs, usage.bytes) == (2, 2000)
        await store.close()
    finally:
        await ledger.close()
        await other.close()
        await client.aclose()


async def test_never_evicts_leased_or_protected_blobs(tmp_path: Path) -> None:
    pinned: set[str] = set()
    store = FilesystemBlobStore(tmp_path, max_size=2000, protected=lambda: pinned)
    await store.open()
    a = await put(store, b"a" * 1000)
    b = await put(store, b"b" * 1000)
    pinned.add(a)
    async with store.lease(b):
        # Everything else is leased or pinned: the newcomer is refused before it writes.
        with pytest.raises(CacheFull):
            await put(store, b"c" * 1000)
        assert await store.stat(a) == 1000
        assert await store.stat(b) == 1000
        with pytest.raises(CacheFull):
            await put(store, b"d" * 3000)  # larger than the cap
        assert list((tmp_path / "tmp").iterdir()) == []
        assert (await store.stats()).used == 2000
    e = await put(store, b"e" * 500)
    assert await store.stat(b) is None  # the lease ended: b is least recently used
    assert await store.stat(a) == 1000
    assert await store.stat(e) == 500
    await store.close()


async def test_fill_in_progress_is_not_evicted(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path, max_size=1000)
    await store.open()
    data = b"f" * 1000
    async with store.lease(sha(data)):
        writer = await store.begin_fill(sha(data))
        await writer.write(data)
        await writer.commit(len(data))
        with pytest.raises(CacheFull):
            await put(store, b"o" * 600)
        assert await store.stat(sha(data)) == 1000
    await store.close()


async def test_lru_order_survives_restart(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path, max_size=3000)
    await store.open()
    old = await put(store, b"1" * 1000)
    new = await put(store, b"2" * 1000)
    os.utime(store.blob_path(old), (1_000_000, 1_000_000))
    os.utime(store.blob_path(new), (2_000_000, 2_000_000))
    await store.close()

    store = FilesystemBlobStore(tmp_path, max_size=2500)
    await store.open()
    assert (await store.stats()).count == 2
    await put(store, b"3" * 1000)
    assert await store.stat(old) is None
    assert await store.stat(new) == 1000
    await store.close()


async def test_verify_finds_a_corrupted_blob(store: FilesystemBlobStore) -> None:
    good = await put(store, b"good" * 1000)
    bad = await put(store, b"bad!" * 1000)
    path = store.blob_path(bad)
    path.write_bytes(b"BAD!" + path.read_bytes()[4:])

    assert await store.verify() == [bad]
    assert await store.stat(bad) == 4000
    assert await store.verify(remove=True) == [bad]
    assert await store.stat(bad) is None
    assert not path.exists()
    assert await store.verify() == []
    assert await store.stat(good) == 4000


async def test_delete(store: FilesystemBlobStore) -> None:
    digest = await put(store, b"x" * 10)
    assert await store.delete(digest)
    assert not await store.delete(digest)
    assert await store.local_path(digest) is None
    assert (await store.stats()).count == 0


async def test_eviction_hook_may_be_a_coroutine(tmp_path: Path) -> None:
    forgotten: list[str] = []

    async def forget(digest: str, size: int) -> None:
        await asyncio.sleep(0)
        forgotten.append(digest)

    store = FilesystemBlobStore(tmp_path, max_size=1000, on_evict=forget)
    await store.open()
    first = await put(store, b"1" * 1000)
    await put(store, b"2" * 1000)
    assert forgotten == [first]
    await store.close()


async def test_a_fill_reserves_its_size_before_writing(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path, max_size=3000)
    await store.open()
    old = await put(store, b"1" * 1000)
    kept = await put(store, b"2" * 1000)
    data = b"3" * 1500
    writer = await store.begin_fill(sha(data), len(data))
    # Room is made at once (the least recently used goes), before the first byte lands.
    assert await store.stat(old) is None and not store.blob_path(old).exists()
    stats = await store.stats()
    assert (stats.bytes, stats.filling, stats.used) == (1000, 1500, 2500)
    # A second fill cannot take the reserved room: only `kept` may go for it.
    async with store.lease(kept):
        with pytest.raises(CacheFull):
            await store.begin_fill(sha(b"4" * 600), 600)
    assert await store.stat(kept) == 1000
    await writer.write(data)
    await writer.commit(len(data))
    stats = await store.stats()
    assert (stats.bytes, stats.filling, stats.used) == (2500, 0, 2500)
    await store.close()


async def test_a_fill_of_unknown_size_reserves_as_it_writes(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path, max_size=2000)
    await store.open()
    held = await put(store, b"h" * 1000)
    data = b"u" * 1500
    writer = await store.begin_fill(sha(data))
    await writer.write(data[:900])
    assert (await store.stats()).filling == 900
    async with store.lease(held):
        with pytest.raises(CacheFull):
            await writer.write(data[900:])
    assert (await store.stats()).used == 1900
    await writer.abort()
    stats = await store.stats()
    assert (stats.filling, stats.used) == (0, 1000)
    assert list((tmp_path / "tmp").iterdir()) == []
    await store.close()


async def test_a_blob_deleted_while_leased_counts_until_the_lease_ends(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path, max_size=2000)
    await store.open()
    digest = await put(store, b"d" * 1000)
    async with store.lease(digest):
        reader = await store.open_reader(digest)
        assert reader is not None
        assert await store.delete(digest)
        stats = await store.stats()
        # Unlinked, but a reader holds it open: still on the disk, still counted.
        assert (stats.bytes, stats.removed_open, stats.used) == (0, 1000, 1000)
        with pytest.raises(CacheFull):
            await store.begin_fill(sha(b"n" * 1500), 1500)
        assert await reader.read_at(0, 4) == b"dddd"
        await reader.aclose()
    stats = await store.stats()
    assert (stats.removed_open, stats.used) == (0, 0)
    await put(store, b"n" * 1500)
    await store.close()


async def test_stats_beside_a_running_gate_count_its_fills(tmp_path: Path) -> None:
    gate = FilesystemBlobStore(tmp_path, max_size=10_000)
    await gate.open()
    await put(gate, b"p" * 1000)
    writer = await gate.begin_fill(sha(b"f" * 3000), 3000)
    await writer.write(b"f" * 700)
    beside = FilesystemBlobStore(tmp_path, max_size=10_000)
    await beside.open(exclusive=False)
    stats = await beside.stats()
    assert (stats.bytes, stats.filling, stats.used) == (1000, 700, 1700)
    await writer.abort()
    await gate.close()
