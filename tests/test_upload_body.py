"""proxy/content/upload_body.py: an upload body is hashed, counted and held to a minimum rate.

The clock is the event loop's own (no real waiting beyond the small windows used here):
a source that stalls is cut after one window, one that keeps its quota is not, and a
source that breaks ends the stream cleanly with the failure recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from aiohttp.http_exceptions import ContentLengthError

from proxy.content.upload_body import ClientBody

WINDOW = 0.2
# For sources that must pass: far more time than they need, so a loaded machine passes too.
GENEROUS_WINDOW = 5.0


async def collect(body: ClientBody) -> bytes:
    return b"".join([chunk async for chunk in body])


async def steady(chunks: int, size: int, pause: float = 0.0) -> AsyncIterator[bytes]:
    for index in range(chunks):
        if pause:
            await asyncio.sleep(pause)
        yield bytes([index % 256]) * size


async def test_the_whole_body_passes_hashed_and_counted() -> None:
    hasher = hashlib.sha256()
    body = ClientBody(steady(10, 1000), hasher, min_rate=1024, window=GENEROUS_WINDOW)
    data = await collect(body)
    assert len(data) == body.size == 10_000
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    assert body.failure is None


async def test_a_stalled_client_is_cut_after_one_window() -> None:
    async def stalls() -> AsyncIterator[bytes]:
        yield b"x" * 10
        await asyncio.Event().wait()  # never sends more
        yield b"never"

    body = ClientBody(stalls(), hashlib.sha256(), min_rate=1024, window=WINDOW)
    data = await asyncio.wait_for(collect(body), 10)
    assert body.failure == "too_slow"
    assert data == b"x" * 10


async def test_a_client_dripping_below_the_rate_is_cut() -> None:
    # 10 bytes every 20 ms is 500 B/s: below 1 KiB/s, though never silent for a window.
    body = ClientBody(steady(1000, 10, pause=0.02), hashlib.sha256(), min_rate=1024, window=WINDOW)
    await asyncio.wait_for(collect(body), 10)
    assert body.failure == "too_slow"
    assert body.size < 1000 * 10


async def test_a_client_keeping_the_rate_with_pauses_is_not_cut() -> None:
    # 1 KiB every 10 ms: each chunk alone meets a window's quota.
    body = ClientBody(
        steady(10, 1024, pause=0.01), hashlib.sha256(), min_rate=200, window=GENEROUS_WINDOW
    )
    await collect(body)
    assert body.failure is None
    assert body.size == 10 * 1024


async def test_time_the_upstream_takes_is_not_the_clients() -> None:
    """A consumer slower than the window does not make a fast client too slow."""
    body = ClientBody(steady(3, 4096), hashlib.sha256(), min_rate=1024, window=WINDOW)
    async for _chunk in body:
        await asyncio.sleep(WINDOW * 1.5)
    assert body.failure is None


async def test_no_rule_when_min_rate_is_zero() -> None:
    async def slow() -> AsyncIterator[bytes]:
        await asyncio.sleep(WINDOW * 2)
        yield b"late"

    body = ClientBody(slow(), hashlib.sha256(), min_rate=0, window=WINDOW)
    assert await collect(body) == b"late"
    assert body.failure is None


async def test_a_client_gone_mid_body_ends_the_stream_cleanly() -> None:
    for error in (ConnectionResetError("Connection lost"), ContentLengthError("short body")):

        async def breaks(error: Exception = error) -> AsyncIterator[bytes]:
            yield b"partial"
            raise error

        body = ClientBody(breaks(), hashlib.sha256(), min_rate=1024, window=WINDOW)
        assert await collect(body) == b"partial"
        assert body.failure == "client_gone"
