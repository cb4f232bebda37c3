"""What every `BlobStore` promises (filesystem and S3 alike): a blob is visible only once
its bytes verified, failures leave nothing, reads by range, LRU eviction under the cap
honouring leases and pins, corruption found, a restart sees what was published."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio

from proxy.errors import DigestInvalid
from proxy.storage.blobstore import CacheFull
from proxy.storage.redis_ledger import RedisLedger
from proxy.storage.s3 import PART_SIZE, SMALL_BLOB, S3BlobStore
from tests.contract.backends import Backend, S3Backend, backend_named
from tests.contract.conftest import BLOB_BACKENDS


@pytest.fixture(params=BLOB_BACKENDS)
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Backend]:
    """As the conftest's, with `s3-redis` too (the accounting in a shared ledger)."""
    async with backend_named(
        request.param,
        tmp_path,
        lambda: request.getfixturevalue("seaweed_s3"),
        monkeypatch,
        lambda: request.getfixturevalue("redis_server").redis_url,
    ) as opened:
        yield opened


# More than one S3 part: the multipart path, not only the single PutObject.
MULTIPART = PART_SIZE + 1_500_000


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def put(store, data: bytes) -> str:
    digest = sha(data)
    writer = await store.begin_fill(digest, len(data))
    await writer.write(data)
    await writer.commit(len(data))
    return digest


async def read_all(store, digest: str) -> bytes:
    reader = await store.open_reader(digest)
    assert reader is not None
    try:
        out = bytearray()
        while chunk := await reader.read_at(len(out), 1 << 20):
            out += chunk
        return bytes(out)
    finally:
        await reader.aclose()


@pytest.mark.parametrize("size", [0, 300_000, MULTIPART])
async def test_published_only_after_verified_commit(backend: Backend, size: int) -> None:
    store = await backend.blobs()
    data = os.urandom(size)
    digest = sha(data)
    writer = await store.begin_fill(digest, size)
    for start in range(0, size, 1 << 20):
        await writer.write(data[start : start + (1 << 20)])
        assert await store.stat(digest) is None
        assert await store.open_reader(digest) is None
        assert await backend.blob_objects() == []
    await writer.commit(size)

    assert await store.stat(digest) == size
    assert await read_all(store, digest) == data
    assert await backend.blob_objects() == [digest]
    assert await backend.leftovers() == 0
    stats = await store.stats()
    assert (stats.count, stats.bytes, stats.filling) == (1, size, 0)


@pytest.mark.parametrize("size", [300_000, MULTIPART])
async def test_a_bad_digest_leaves_nothing_visible(backend: Backend, size: int) -> None:
    store = await backend.blobs()
    data = os.urandom(size)
    digest = sha(b"what the upstream promised")
    writer = await store.begin_fill(digest)
    await writer.write(data)
    with pytest.raises(DigestInvalid):
        await writer.commit()
    assert await store.stat(digest) is None
    assert await backend.blob_objects() == []
    assert await backend.leftovers() == 0
    assert (await store.stats()).used == 0
    await writer.abort()  # harmless after a failed commit


async def test_a_wrong_size_leaves_nothing_visible(backend: Backend) -> None:
    store = await backend.blobs()
    data = os.urandom(MULTIPART)
    writer = await store.begin_fill(sha(data))
    await writer.write(data)
    with pytest.raises(DigestInvalid):
        await writer.commit(len(data) + 1)
    assert await store.stat(sha(data)) is None
    assert await backend.blob_objects() == []
    assert await backend.leftovers() == 0


async def test_abort_leaves_nothing(backend: Backend) -> None:
    store = await backend.blobs()
    data = os.urandom(MULTIPART)
    writer = await store.begin_fill(sha(data), len(data))
    await writer.write(data[:-10])
    await writer.abort()
    await writer.abort()
    with pytest.raises(ValueError):
        writer.open_reader()
    assert await store.stat(sha(data)) is None
    assert await backend.blob_objects() == []
    assert await backend.leftovers() == 0
    assert (await store.stats()).used == 0


@pytest.mark.parametrize("digest", ["sha256:../../etc/passwd", "sha256:ABC", "md5:abcd"])
async def test_a_malformed_digest_is_refused(backend: Backend, digest: str) -> None:
    store = await backend.blobs()
    with pytest.raises(DigestInvalid):
        await store.begin_fill(digest)


async def test_ranged_reads(backend: Backend) -> None:
    store = await backend.blobs()
    data = os.urandom(MULTIPART)
    digest = await put(store, data)
    reader = await store.open_reader(digest)
    assert reader is not None
    try:
        # Forward, backward, across the part boundary, past the end.
        for offset, size in [
            (0, 10),
            (10, 1000),
            (5_000_000, 1 << 20),
            (PART_SIZE - 100, 200),
            (3, 7),
            (len(data) - 5, 100),
        ]:
            assert await reader.read_at(offset, size) == data[offset : offset + size]
        assert await reader.read_at(len(data), 10) == b""
    finally:
        await reader.aclose()


async def test_a_fill_is_readable_while_it_runs_and_after_commit(backend: Backend) -> None:
    store = await backend.blobs()
    data = os.urandom(MULTIPART)
    writer = await store.begin_fill(sha(data), len(data))
    await writer.write(data[:40_000])
    reader = writer.open_reader()
    assert await reader.read_at(0, 100_000) == data[:40_000]
    await writer.write(data[40_000:])
    await writer.commit(len(data))
    assert await reader.read_at(len(data) - 20_000, 30_000) == data[-20_000:]
    await reader.aclose()
    late = writer.open_reader()  # after commit: reads the published blob
    assert await late.read_at(0, 10) == data[:10]
    await late.aclose()


async def test_stat_and_delete(backend: Backend) -> None:
    store = await backend.blobs()
    digest = await put(store, b"bye")
    assert await store.stat(digest) == 3
    assert await store.delete(digest) is True
    assert await store.delete(digest) is False
    assert await store.stat(digest) is None
    assert await store.open_reader(digest) is None
    assert await backend.blob_objects() == []
    assert (await store.stats()).used == 0


async def test_eviction_under_the_cap_honours_leases_and_protected(backend: Backend) -> None:
    evicted: list[tuple[str, int]] = []
    protected: set[str] = set()

    async def on_evict(digest: str, size: int) -> None:
        evicted.append((digest, size))

    store = await backend.blobs(max_size=3_500, protected=lambda: protected, on_evict=on_evict)
    a, b, c = [await put(store, bytes([n]) * 1000) for n in range(3)]  # oldest first
    protected.add(a)
    async with store.lease(b):
        d = await put(store, b"d" * 1000)  # only c may go
    assert evicted == [(c, 1000)]
    assert await backend.blob_objects() == sorted([a, b, d])
    # A read refreshes the order: b is now the most recent, so d goes next.
    assert await read_all(store, b) == bytes([1]) * 1000
    await put(store, b"e" * 1000)
    assert evicted[-1] == (d, 1000)
    stats = await store.stats()
    assert stats.used <= 3_500
    assert await store.gc() == []


async def test_cache_full_when_nothing_can_go(backend: Backend) -> None:
    protected: set[str] = set()
    store = await backend.blobs(max_size=2_500, protected=lambda: protected)
    a = await put(store, b"a" * 1000)
    protected.add(a)
    b = await put(store, b"b" * 1000)
    async with store.lease(b):
        with pytest.raises(CacheFull) as full:
            await store.begin_fill(sha(b"c" * 1000), 1000)
        assert not full.value.never
    with pytest.raises(CacheFull) as never:
        await store.begin_fill(sha(b"x" * 3000), 3000)
    assert never.value.never
    # Nothing was evicted by the refused reservations.
    assert await backend.blob_objects() == sorted([a, b])
    # A fill of unknown size is refused when its bytes outgrow what can be freed.
    writer = await store.begin_fill(sha(b"y" * 2000))
    async with store.lease(b):
        with pytest.raises(CacheFull):
            await writer.write(b"y" * 2000)
    await writer.abort()
    assert (await store.stats()).filling == 0


async def test_verify_detects_corruption(backend: Backend) -> None:
    store = await backend.blobs()
    good = await put(store, b"good content")
    bad = await put(store, b"will be damaged")
    await backend.corrupt_blob(bad, b"damaged bytes!!")
    assert await store.verify() == [bad]
    assert await store.stat(bad) is not None
    assert await store.verify(remove=True) == [bad]
    assert await store.stat(bad) is None
    assert await backend.blob_objects() == [good]
    assert await store.verify() == []


async def test_reopen_sees_what_was_published(backend: Backend) -> None:
    store = await backend.blobs()
    first = await put(store, b"first" * 100)
    second = await put(store, b"second" * 100)
    unfinished = await store.begin_fill(sha(b"never"), 5)
    await unfinished.write(b"nev")
    await unfinished.abort()
    await store.close()

    again = await backend.blobs()
    assert await again.stat(first) == 500
    assert await again.stat(second) == 600
    assert await again.stat(sha(b"never")) is None
    assert await read_all(again, second) == b"second" * 100
    stats = await again.stats()
    assert (stats.count, stats.bytes) == (2, 1100)
    # Beside a running store (exclusive=False, as `cache stats` opens it) too.
    beside = await backend.blobs(exclusive=False)
    assert (await beside.stats()).count == 2


# S3 only (the filesystem store's crash test is tests/test_blobstore.py): what a dead
# process leaves on an object store is an incomplete multipart upload.
async def test_a_crash_mid_fill_leaves_no_object_and_the_sweep_aborts_the_upload(
    s3_backend: S3Backend,
) -> None:
    backend = s3_backend
    store = await backend.blobs()
    data = os.urandom(2 * PART_SIZE + 100)
    digest = sha(data)
    writer = await store.begin_fill(digest, len(data))
    await writer.write(data[: 2 * PART_SIZE])
    await writer._sent()  # the parts reached the store
    # The process dies here: no commit, no abort.
    del writer
    await store.close()
    assert await backend.uploads() != []
    assert await backend.blob_objects() == []

    # A restart that does not consider the upload old keeps it (another replica's
    # live fill looks the same); one past the age bound aborts it.
    kept = await backend.blobs(sweep_age=3600)
    assert await kept.stat(digest) is None
    assert await backend.uploads() != []
    await kept.close()
    swept = await backend.blobs(sweep_age=0)
    assert await swept.stat(digest) is None
    assert await backend.uploads() == []
    assert await backend.blob_objects() == []
    assert await backend.leftovers() == 0


async def test_redirect_url_is_a_working_presigned_get_only_when_enabled(
    s3_backend: S3Backend,
) -> None:
    store = await s3_backend.blobs()
    data = os.urandom(100_000)
    digest = await put(store, data)
    assert await store.redirect_url(digest) is None  # storage.s3.redirect is off
    store.bucket = dataclasses.replace(store.bucket, redirect=True)
    assert await store.redirect_url(sha(b"not cached")) is None
    url = await store.redirect_url(digest)
    assert url is not None
    async with aiohttp.ClientSession() as session:
        # No credentials of ours go with it: the signature in the URL is the access.
        async with session.get(url) as response:
            assert response.status == 200
            assert await response.read() == data
        async with session.get(url.replace("Signature=", "Signature=0")) as response:
            assert response.status == 403


async def test_a_relay_is_readable_and_verified_but_never_stored(s3_backend: S3Backend) -> None:
    """`SharedBlobs.begin_relay`: a fill streamed from another replica's fill is spooled
    for this replica's readers and verified, but not uploaded (the other replica does)."""
    store = await s3_backend.blobs()
    data = os.urandom(MULTIPART)
    digest = sha(data)
    writer = await store.begin_relay(digest, len(data))
    await writer.write(data[: PART_SIZE + 10])
    reader = writer.open_reader()
    assert await reader.read_at(PART_SIZE, 10) == data[PART_SIZE : PART_SIZE + 10]
    await writer.write(data[PART_SIZE + 10 :])
    assert await s3_backend.uploads() == []  # no part sent
    await writer.commit(len(data))
    assert await reader.read_at(len(data) - 10, 10) == data[-10:]
    await reader.aclose()
    assert await store.stat(digest) is None
    assert await s3_backend.blob_objects() == []
    assert await s3_backend.leftovers() == 0
    assert (await store.stats()).used == 0

    bad = await store.begin_relay(sha(b"promised"))
    await bad.write(b"something else")
    with pytest.raises(DigestInvalid):
        await bad.commit()
    assert await s3_backend.leftovers() == 0


async def test_with_its_shared_ledger_down_a_hit_is_served_and_a_fill_refused(
    s3_backend: S3Backend,
) -> None:
    """A replica whose Redis is down: it starts, serves what the bucket holds (a HEAD
    instead of the ledger), and refuses fills with CacheFull (relayed uncached by the
    pull path, not counted outside a cap the replicas share), never another error."""
    data = os.urandom(300_000)
    digest = await put(await s3_backend.blobs(), data)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = redis.asyncio.Redis(port=port, socket_connect_timeout=1, socket_timeout=1)
    ledger = RedisLedger(client, key_prefix="down:")
    assert s3_backend.bucket is not None
    store = S3BlobStore(
        s3_backend.bucket, s3_backend.root / "spool-down", 100_000_000, ledger=ledger
    )
    try:
        await store.open()
        assert await store.stat(digest) == len(data)
        assert await read_all(store, digest) == data
        with pytest.raises(CacheFull) as full:
            await store.begin_fill(sha(b"new"), 3)
        assert not full.value.never
        assert (await store.stats()).count == 0  # the last figures known (none)
        assert await store.gc() == []
        assert await s3_backend.blob_objects() == [digest]
    finally:
        await store.close()
        await ledger.close()
        await client.aclose()


async def test_a_small_blob_is_read_from_the_bucket_once_then_from_memory(
    s3_backend: S3Backend,
) -> None:
    """`SMALL_BLOB`s are verified and kept in memory: a later change to the object (here
    damage) is not read again; a store that never read it streams what the bucket has."""
    small, large = os.urandom(SMALL_BLOB), os.urandom(SMALL_BLOB + 1)
    store = await s3_backend.blobs()
    small_digest, large_digest = await put(store, small), await put(store, large)
    assert await read_all(store, small_digest) == small
    assert await read_all(store, large_digest) == large
    await s3_backend.corrupt_blob(small_digest, b"x" * len(small))
    await s3_backend.corrupt_blob(large_digest, b"y" * len(large))
    assert await read_all(store, small_digest) == small  # memory
    assert await read_all(store, large_digest) == b"y" * len(large)  # streamed each time
    # Another replica has no copy, and does not keep a damaged one: it streams the object
    # (as a filesystem store serves its file; `verify` is what finds the damage).
    other = await s3_backend.blobs(exclusive=False)
    assert await read_all(other, small_digest) == b"x" * len(small)
    await s3_backend.corrupt_blob(small_digest, b"z" * len(small))
    assert await read_all(other, small_digest) == b"z" * len(small)


async def test_a_small_blob_deleted_through_one_replica_is_not_served_from_anothers_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    async with backend_named(
        "s3-redis",
        tmp_path,
        lambda: request.getfixturevalue("seaweed_s3"),
        monkeypatch,
        lambda: request.getfixturevalue("redis_server").redis_url,
    ) as replicas:
        first, second = await replicas.blobs(), await replicas.blobs(exclusive=False)
        data = os.urandom(1000)
        digest = await put(first, data)
        assert await read_all(second, digest) == data  # now in second's memory
        assert await first.delete(digest)
        assert await second.open_reader(digest) is None
        assert await second.stat(digest) is None
