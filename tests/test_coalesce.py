"""Tests of proxy/content/coalesce.py, and of the pull path's coalesced tag revalidation in-process:
one task per key, shared by its callers, not cancelled by a caller that leaves, kept
referenced while it runs, and cancelled by `close()` (shutdown)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.content.coalesce import Coalescer
from proxy.content.pull_through import PullThrough
from proxy.names.references import Repository
from proxy.settings import StorageSettings, UpstreamSettings
from proxy.storage.cache import Cache
from proxy.storage.manifest_cache import TagEntry
from proxy.upstream.client import UpstreamClient

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def test_concurrent_callers_share_one_task() -> None:
    flights: Coalescer[str, int] = Coalescer("test")
    started = 0
    gate = asyncio.Event()

    async def work() -> int:
        nonlocal started
        started += 1
        await gate.wait()
        return 42

    callers = [asyncio.create_task(flights.run("k", work)) for _ in range(10)]
    await asyncio.sleep(0)
    assert flights.running("k")
    gate.set()
    assert await asyncio.gather(*callers) == [42] * 10
    assert started == 1
    assert not flights.running("k")
    # The key is free again: the next caller starts anew (results are not kept).
    assert await flights.run("k", work) == 42
    assert started == 2


async def test_a_failure_reaches_every_caller() -> None:
    flights: Coalescer[str, int] = Coalescer("test")
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        raise ValueError("upstream broke")

    callers = [asyncio.create_task(flights.run("k", work)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(o, ValueError) for o in outcomes)


async def test_a_caller_that_leaves_does_not_cancel_the_work() -> None:
    flights: Coalescer[str, str] = Coalescer("test")
    gate = asyncio.Event()

    async def work() -> str:
        await gate.wait()
        return "done"

    leaving = asyncio.create_task(flights.run("k", work))
    staying = asyncio.create_task(flights.run("k", work))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    gate.set()
    assert await staying == "done"


async def test_background_work_is_kept_referenced_and_close_cancels_it() -> None:
    flights: Coalescer[str, None] = Coalescer("test")
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task, leader = flights.start("k", work)
    assert leader and flights.start("k", work) == (task, False)
    del task
    gc.collect()  # only the coalescer holds the task now: it must keep running
    await asyncio.sleep(0)
    assert flights.running("k")
    await flights.close()
    assert cancelled.is_set()
    assert not flights.running("k")


class HangingClient(UpstreamClient):
    """An upstream whose every request hangs until cancelled (and says so)."""

    def __init__(self) -> None:
        super().__init__(UpstreamSettings(registry="docker.io", url="http://127.0.0.1:9"))
        self.requests = 0
        self.cancelled = 0
        self.asked = asyncio.Event()

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        self.requests += 1
        self.asked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def test_an_expired_tag_is_revalidated_once_and_the_revalidation_ends_at_close(
    tmp_path: Path,
) -> None:
    cache = await Cache.open(StorageSettings(path=tmp_path, tag_ttl=60), None)
    client = HangingClient()
    pull = PullThrough({"docker.io": client}, cache, revalidate_grace=60)
    repository = Repository.of("docker.io", "library/alpine")
    body = b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'","layers":[]}'
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    try:
        await cache.manifests.put(digest, OCI_MANIFEST, body)
        await cache.record(repository, [digest])
        expired = TagEntry(digest, OCI_MANIFEST, time.time() - 61)
        await cache.tags.put(repository, "3", expired)

        leader = asyncio.create_task(pull.manifest(repository, "3", [], head=False))
        await client.asked.wait()
        leader.cancel()  # its client left; the revalidation goes on
        with pytest.raises(asyncio.CancelledError):
            await leader
        followers = [pull.manifest(repository, "3", [], head=False) for _ in range(20)]
        results = await asyncio.gather(*followers)
        assert {r.body for r in results} == {body}
        assert client.requests == 1 and client.cancelled == 0

        await pull.close()
        assert client.cancelled == 1
    finally:
        await cache.close()
