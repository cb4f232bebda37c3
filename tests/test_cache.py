"""Tests of proxy/storage/cache.py: the stores opened together, and pinned repositories' blobs
kept out of eviction."""

from __future__ import annotations

import hashlib
from pathlib import Path

from proxy.names.references import Repository
from proxy.settings import StorageSettings
from proxy.storage.cache import Cache


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def _put(cache: Cache, data: bytes) -> str:
    digest = _digest(data)
    writer = await cache.blobs.begin_fill(digest)
    await writer.write(data)
    await writer.commit(len(data))
    return digest


async def test_blobs_of_a_pinned_repository_survive_eviction(tmp_path: Path) -> None:
    settings = StorageSettings(path=tmp_path, max_size=3000)
    cache = await Cache.open(settings, None)
    try:
        pinned = Repository.of("docker.io", "alpine")
        other = Repository.of("docker.io", "busybox")
        kept = await _put(cache, b"k" * 1000)
        await cache.record(pinned, [kept])
        await cache.protect(pinned)
        evictable = await _put(cache, b"e" * 1000)
        await cache.record(other, [evictable])
        # Two more blobs push the cache over its 3000-byte cap.
        await _put(cache, b"x" * 1000)
        await _put(cache, b"y" * 1000)
        assert await cache.blobs.stat(kept) == 1000
        assert await cache.blobs.stat(evictable) is None
    finally:
        await cache.close()


async def test_digests_recorded_after_the_pin_are_protected_too(tmp_path: Path) -> None:
    cache = await Cache.open(StorageSettings(path=tmp_path, max_size=2000), None)
    try:
        pinned = Repository.of("registry.corp.example", "team/app")
        await cache.protect(pinned)
        later = await _put(cache, b"l" * 1000)
        await cache.record(pinned, [later])
        await _put(cache, b"a" * 1000)
        await _put(cache, b"b" * 1000)
        assert await cache.blobs.stat(later) == 1000
        assert later in cache.protected
    finally:
        await cache.close()
