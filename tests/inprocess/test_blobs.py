"""Blob pulls in process: miss, hit, Range, HEAD, the held check, the store's capabilities
(local file, redirect, stream from its reader) and a fill that fails mid-body."""

from __future__ import annotations

import aiohttp
import pytest

from tests.inprocess.conftest import Gate
from tests.inprocess.stores import REDIRECT_BASE, RedirectingStore, StreamOnlyStore

APP = "docker.io/library/app"
LAYER = bytes(range(256)) * 1024  # 256 KiB, several upstream chunks


def blob_url(name: str, digest: str) -> str:
    return f"/v2/{name}/blobs/{digest}"


async def test_a_miss_fills_once_and_the_next_pull_is_a_hit(gate: Gate) -> None:
    digest = gate.upstream.add_blob("library/app", LAYER)

    assert await gate.pull(blob_url(APP, digest)) == LAYER
    response = await gate.client.get(blob_url(APP, digest))
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == digest
    assert await response.read() == LAYER

    # One held check (HEAD) and one GET, both on the first pull.
    assert gate.upstream.calls == {"head_blob": 1, "open_blob": 1}
    assert gate.metric("registry_gate_cache_hits_total", kind="blob") == 1
    assert gate.metric("registry_gate_served_bytes_total", source="cache") == len(LAYER)
    assert gate.metric("registry_gate_served_bytes_total", source="upstream") == len(LAYER)


@pytest.mark.parametrize("cached", [False, True])
async def test_a_range_is_served_on_a_miss_and_on_a_hit(gate: Gate, cached: bool) -> None:
    digest = gate.upstream.add_blob("library/app", LAYER)
    if cached:
        await gate.pull(blob_url(APP, digest))

    response = await gate.client.get(blob_url(APP, digest), headers={"Range": "bytes=1000-70999"})

    assert response.status == 206
    assert response.headers["Content-Range"] == f"bytes 1000-70999/{len(LAYER)}"
    assert await response.read() == LAYER[1000:71000]
    assert gate.upstream.calls["open_blob"] == 1


async def test_an_unsatisfiable_range_is_416(gate: Gate) -> None:
    digest = gate.upstream.add_blob("library/app", LAYER)
    await gate.pull(blob_url(APP, digest))

    response = await gate.client.get(
        blob_url(APP, digest), headers={"Range": f"bytes={len(LAYER)}-"}
    )

    assert response.status == 416
    assert (await response.json())["errors"][0]["code"] == "RANGE_INVALID"


async def test_head_asks_the_upstream_once_then_the_cache(gate: Gate) -> None:
    digest = gate.upstream.add_blob("library/app", LAYER)

    for _ in range(2):
        response = await gate.client.head(blob_url(APP, digest))
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(LAYER))
    assert gate.upstream.calls == {"head_blob": 2}  # not cached: no GET, still a HEAD

    await gate.pull(blob_url(APP, digest))
    response = await gate.client.head(blob_url(APP, digest))
    assert response.headers["Content-Length"] == str(len(LAYER))
    assert gate.upstream.calls == {"head_blob": 2, "open_blob": 1}


async def test_a_blob_cached_for_one_repository_is_not_served_for_another_without_it(
    gate: Gate,
) -> None:
    digest = gate.upstream.add_blob("library/app", LAYER)
    gate.upstream.add_blob("library/same", LAYER)
    await gate.pull(blob_url(APP, digest))

    other = await gate.client.get(blob_url("docker.io/library/other", digest))
    assert other.status == 404
    assert (await other.json())["errors"][0]["code"] == "BLOB_UNKNOWN"

    # A repository the upstream confirms holding it gets the cached copy: a HEAD, no GET.
    same = await gate.client.get(blob_url("docker.io/library/same", digest))
    assert await same.read() == LAYER
    assert gate.upstream.calls == {"head_blob": 3, "open_blob": 1}


async def test_a_store_without_local_files_streams_hits_from_its_reader(gate: Gate) -> None:
    gate.use_blob_store(StreamOnlyStore)
    digest = gate.upstream.add_blob("library/app", LAYER)
    await gate.pull(blob_url(APP, digest))

    whole = await gate.client.get(blob_url(APP, digest))
    part = await gate.client.get(blob_url(APP, digest), headers={"Range": "bytes=-10"})

    assert whole.status == 200
    assert whole.headers["Content-Length"] == str(len(LAYER))
    assert await whole.read() == LAYER
    assert part.status == 206
    assert await part.read() == LAYER[-10:]
    assert gate.upstream.calls["open_blob"] == 1
    assert gate.metric("registry_gate_cache_hits_total", kind="blob") == 2


async def test_a_store_with_redirects_answers_307_after_the_held_check(gate: Gate) -> None:
    gate.use_blob_store(RedirectingStore)
    digest = gate.upstream.add_blob("library/app", LAYER)

    # Not cached yet: streamed through the gate (and cached).
    assert await gate.pull(blob_url(APP, digest)) == LAYER

    second = await gate.client.get(blob_url(APP, digest), allow_redirects=False)
    assert second.status == 307
    assert second.headers["Location"] == REDIRECT_BASE + digest
    assert gate.metric("registry_gate_blob_redirects_total") == 1

    # The held check comes first: a repository without the blob gets no redirect.
    other = await gate.client.get(
        blob_url("docker.io/library/other", digest), allow_redirects=False
    )
    assert other.status == 404
    assert gate.metric("registry_gate_blob_redirects_total") == 1


async def test_a_fill_that_fails_ends_every_body_short_and_caches_nothing(gate: Gate) -> None:
    digest = gate.upstream.add_blob("library/app", LAYER)
    gate.upstream.break_after[digest] = 128 * 1024

    response = await gate.client.get(blob_url(APP, digest))
    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(LAYER))
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()

    # Nothing of it was published: the next pull fills again, and gets it all.
    del gate.upstream.break_after[digest]
    assert await gate.pull(blob_url(APP, digest)) == LAYER
    assert gate.upstream.calls["open_blob"] == 2
