"""Shutdown drain: after SIGTERM, finish what is in flight and refuse what is new.

On SIGTERM the gate stops being ready at once (`/readyz` answers 503), answers every
new request with 503 `UNAVAILABLE` and `Connection: close` (a client retries elsewhere,
instead of meeting a dropped connection), and lets requests already in flight finish,
for at most `shutdown_timeout` seconds in all; the command line then closes the server.
`/healthz` and `/metrics` keep answering: the process is alive until it exits.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from proxy.errors import ServiceUnavailable
from proxy.http.middleware import Handler

# Answered while draining: liveness and scrapes describe a process that still runs.
_STILL_SERVED = frozenset({"/healthz", "/metrics"})


class Drain:
    """Whether the gate is draining, and which requests are in flight.

    A request is in flight until its task ends, which is after its response is sent:
    a cached blob goes out by sendfile after the handler has returned.
    """

    def __init__(self) -> None:
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def inflight(self) -> int:
        """How many requests are in flight."""
        return len(self._tasks)

    def begin(self) -> None:
        """Stop taking new requests (they get 503 from now on)."""
        self.draining = True

    def track(self, task: asyncio.Task[Any]) -> None:
        """Count the request `task` serves as in flight until the task ends."""
        if task in self._tasks:
            return
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    async def idle(self) -> None:
        """Return once no request is in flight."""
        await self._idle.wait()


DRAIN = web.AppKey("drain", Drain)


@web.middleware
async def drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse new requests while draining; count the others in flight."""
    drain = request.app[DRAIN]
    if drain.draining and request.path not in _STILL_SERVED:
        if request.path == "/readyz":
            return web.json_response({"status": "unready", "shutdown": "draining"}, status=503)
        raise ServiceUnavailable(
            "the gate is shutting down; retry", headers={"Connection": "close", "Retry-After": "1"}
        )
    task = asyncio.current_task()
    if task is not None:
        # aiohttp runs each request in its own task, response sending included.
        drain.track(task)
    response = await handler(request)
    if drain.draining and not response.prepared:
        # Finished during the drain: no further request on this connection.
        response.force_close()
    return response
