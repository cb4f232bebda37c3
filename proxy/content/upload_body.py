"""A client's upload body on its way upstream: hashed, counted, held to a minimum rate.

The gate streams upload bodies (it never holds a layer in memory), so it cannot read a
body first and decide afterwards. `ClientBody` wraps the client's chunks for the upstream
request instead: it feeds every chunk to the session's running hash, counts it, and cuts
a client that delivers less than `min_rate` bytes per second over a window of
`window` seconds. Only time spent waiting for the client counts (time the upstream takes
to accept a chunk is the upstream's). When the client fails (too slow, disconnected, a
broken body) the stream ends early and cleanly, and `failure` says why: the caller then
cancels the upstream session. Ending cleanly rather than raising inside the HTTP client
keeps a client's fault from counting as an upstream failure (circuit breaker).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal, Protocol

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

ClientFailure = Literal["too_slow", "client_gone"]
# What reading a client's body raises when the client goes away or breaks its framing.
_CLIENT_ERRORS = (OSError, HttpProcessingError, aiohttp.ClientError)


class Hasher(Protocol):
    """The part of a `hashlib` object the body feeds."""

    def update(self, data: bytes, /) -> None:
        """Add `data` to the hash."""


class ClientBody:
    """An async iterable of the client's chunks for one upstream request (iterate once)."""

    def __init__(
        self,
        source: AsyncIterator[bytes],
        hasher: Hasher,
        *,
        min_rate: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._hasher = hasher
        # Bytes the client must deliver within each window of waiting (0: no rule).
        self._quota = math.ceil(min_rate * window)
        self._window = window
        self._clock = clock
        self.size = 0
        self.failure: ClientFailure | None = None

    async def _next(self, budget: float | None) -> bytes | None:
        """The client's next chunk; None at its end or on a failure (then `failure` is set)."""
        try:
            async with asyncio.timeout(budget):
                return await anext(self._source)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            self.failure = "too_slow"
            return None
        except _CLIENT_ERRORS:
            self.failure = "client_gone"
            return None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        waited = 0.0  # seconds spent waiting for the client in the current window
        received = 0  # bytes received in the current window
        while True:
            budget = self._window - waited if self._quota else None
            started = self._clock()
            chunk = await self._next(budget)
            if chunk is None:
                return
            waited += self._clock() - started
            received += len(chunk)
            if received >= self._quota:
                # The quota of this window is met: a new window starts.
                waited, received = 0.0, 0
            elif waited >= self._window:
                self.failure = "too_slow"
                return
            self._hasher.update(chunk)
            self.size += len(chunk)
            yield chunk
