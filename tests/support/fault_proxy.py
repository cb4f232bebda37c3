"""A fault-injecting HTTP proxy between the gate and a real upstream registry.

Owns the "what reached the upstream" side of the cache tests and benchmarks: an aiohttp
server on a loopback port (on its own event loop thread) that forwards every request to
a target registry and relays the answer, counting requests by ``(method, kind)`` (kind is
the path's endpoint: ``base``, ``manifest``, ``blob``, ``upload``, ``tags``,
``referrers``, ``other``) and the body bytes it relays. A fault can be switched on for
matching requests:

- ``corrupt``: flip one byte of the body (same length), at ``offset`` (default: middle);
- ``truncate``: keep the upstream's ``Content-Length``, send ``keep`` bytes (default:
  half), then abort the connection;
- ``short``: send ``keep`` bytes chunked (no length) and end the body cleanly;
- ``html``: answer 200 with an HTML page instead of the body;
- ``stall``: send ``keep`` bytes, wait for ``release()`` (or ``timeout``), send the rest
  (any body fault also pauses like this at ``pause_at`` bytes, when set);
- ``hang``: answer nothing until ``release()`` (or ``timeout``), then forward;
- ``status``: answer ``status`` (default 503) with an OCI error body;
- ``429``: answer 429 with ``Retry-After``;
- ``slow``: wait ``delay`` seconds, then forward;
- ``redirect``: answer 307 to the same path on this proxy (a redirect loop).

``down()`` stops listening and drops every open connection (clients get "connection
refused"), ``up()`` listens again on the same port. The target may be a callable, so the
proxy follows a registry restarted on a new port. Stdlib plus aiohttp only; it does not
import the gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Collection, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "FaultProxy",
    "LoopThread",
    "Passed",
    "path_kind",
]

T = TypeVar("T")

FAULT_KINDS = frozenset(
    {"corrupt", "truncate", "short", "html", "stall", "hang", "status", "429", "slow", "redirect"}
)
# Faults that change a body: by default they apply to blob GETs only.
BODY_FAULTS = frozenset({"corrupt", "truncate", "short", "html", "stall"})
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)
CHUNK = 256 * 1024
HTML_PAGE = b"<html><body><h1>Service temporarily unavailable</h1></body></html>\n"


def path_kind(path: str) -> str:
    """Which registry endpoint a request path addresses."""
    if path.rstrip("/") == "/v2":
        return "base"
    if not path.startswith("/v2/"):
        return "other"
    if "/blobs/uploads" in path:
        return "upload"
    if "/manifests/" in path:
        return "manifest"
    if "/blobs/" in path:
        return "blob"
    if path.endswith("/tags/list"):
        return "tags"
    if "/referrers/" in path:
        return "referrers"
    return "other"


class LoopThread:
    """An asyncio event loop on a daemon thread, for servers synchronous code uses."""

    def __init__(self, name: str = "fault-proxy") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the loop thread (for state the loop owns)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class Fault:
    """One switchable misbehaviour and which requests it hits.

    ``kinds``/``methods`` default to blob GETs for body faults and to every request for
    ``hang``/``status``/``429``; ``contains`` narrows to paths containing a string (a
    digest, a repository); ``times`` limits how many requests it hits (None: all).
    """

    kind: str
    kinds: Collection[str] | None = None
    methods: Collection[str] | None = None
    contains: str = ""
    times: int | None = None
    offset: int | None = None  # corrupt: which byte of the body
    keep: int | None = None  # truncate/short/stall: bytes sent first
    pause_at: int | None = None  # any body fault: wait for release() after this many bytes
    status: int = 503
    retry_after: str = "7"
    timeout: float = 30.0  # hang/stall: longest wait for release()
    delay: float = 0.5  # slow: seconds before forwarding
    hits: int = 0
    released: bool = False  # set by release(): holds no more

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; one of {sorted(FAULT_KINDS)}")
        if self.kinds is None:
            self.kinds = {"blob"} if self.kind in BODY_FAULTS else None
        if self.methods is None and self.kind in BODY_FAULTS:
            self.methods = {"GET"}

    def matches(self, method: str, kind: str, path_qs: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.kinds is not None and kind not in self.kinds:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        return self.contains in path_qs


@dataclass
class Passed:
    """One request the proxy received (counted on arrival), and what became of it."""

    method: str
    path_qs: str
    kind: str
    fault: str | None
    status: int | None = None  # None: no answer (yet, or the upstream was unreachable)
    body_bytes: int = 0  # handed to the client's connection so far


@dataclass
class _State:
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    body_bytes: Counter[str] = field(default_factory=Counter)
    log: list[Passed] = field(default_factory=list)


class FaultProxy:
    """Forwards ``http://127.0.0.1:<port>/...`` to ``target`` (a URL or a callable
    returning one), with switchable faults. ``start()``/``stop()``, or use ``with``."""

    def __init__(
        self,
        target: str | Callable[[], str],
        *,
        name: str = "fault-proxy",
        loop: LoopThread | None = None,
    ) -> None:
        self._target = target
        self.name = name
        self._own_loop = loop is None
        self._loops = loop
        self._lock = threading.Lock()
        self._state = _State()
        self._fault: Fault | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None
        self._release: asyncio.Event | None = None
        self.port = 0

    # -- addresses -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        target = self._target() if callable(self._target) else self._target
        return target.rstrip("/")

    @property
    def listening(self) -> bool:
        return self._site is not None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def loops(self) -> LoopThread:
        if self._loops is None:
            self._loops = LoopThread(self.name)
        return self._loops

    def start(self) -> FaultProxy:
        self.loops.run(self._start())
        return self

    def stop(self) -> None:
        if self._loops is None:
            return
        if not self._loops.loop.is_closed():
            self._loops.run(self._stop())
        if self._own_loop:
            self._loops.close()

    def down(self) -> None:
        """Stop listening and drop open connections: new connections are refused."""
        self.loops.run(self._down())

    def up(self) -> None:
        """Listen again, on the same port."""
        self.loops.run(self._listen(self.port))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start(self) -> None:
        self._release = asyncio.Event()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=120),
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        await self._listen(0)

    async def _listen(self, port: int) -> None:
        if self._site is not None:
            return
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self._runner, self._site = runner, site
        self.port = int(runner.addresses[0][1])

    async def _down(self) -> None:
        runner, self._runner, self._site = self._runner, None, None
        # Wake hanging handlers first so shutdown does not wait for them.
        self._wake()
        if runner is not None:
            await runner.cleanup()

    async def _stop(self) -> None:
        await self._down()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- faults ------------------------------------------------------------------------

    def set_fault(self, kind: str | Fault | None, **options: Any) -> Fault | None:
        """Switch a fault on (``set_fault("corrupt", contains=digest)``) or off (None);
        requests held by the fault it replaces are released."""
        fault = kind if isinstance(kind, Fault) or kind is None else Fault(kind, **options)
        with self._lock:
            old, self._fault = self._fault, fault
        if old is not None:
            self._release_fault(old)
        return fault

    def clear_fault(self) -> None:
        self.set_fault(None)

    @contextlib.contextmanager
    def fault(self, kind: str, **options: Any) -> Iterator[Fault]:
        """``with proxy.fault("hang"):`` - on inside the block, off (and released) after."""
        fault = self.set_fault(kind, **options)
        assert fault is not None
        try:
            yield fault
        finally:
            self.clear_fault()

    def release(self) -> None:
        """Let every request the current fault holds (hang, stall, pause) go on, and
        those that reach its hold later: from now on the fault no longer holds."""
        with self._lock:
            fault = self._fault
        if fault is not None:
            self._release_fault(fault)

    def _release_fault(self, fault: Fault) -> None:
        fault.released = True
        loops = self._loops
        if loops is not None and not loops.loop.is_closed():
            loops.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        event, self._release = self._release, asyncio.Event()
        if event is not None:
            event.set()

    async def _wait_release(self, fault: Fault) -> None:
        deadline = asyncio.get_running_loop().time() + fault.timeout
        while not fault.released:
            event = self._release
            assert event is not None
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    def _take_fault(self, method: str, kind: str, path_qs: str) -> Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None or not fault.matches(method, kind, path_qs):
                return None
            fault.hits += 1
            return fault

    # -- what tests read ------------------------------------------------------------------

    def reset(self) -> None:
        """Forget counts and the log (the fault stays as it is)."""
        with self._lock:
            self._state = _State()

    def count(self, method: str | None = None, kind: str | None = None, contains: str = "") -> int:
        """Requests received, by method and kind (None: any), whose path contains
        ``contains``."""
        with self._lock:
            return sum(
                1
                for p in self._state.log
                if (method is None or p.method == method)
                and (kind is None or p.kind == kind)
                and contains in p.path_qs
            )

    def counts(self) -> dict[tuple[str, str], int]:
        """``{(method, kind): requests}`` since the last reset."""
        with self._lock:
            return dict(self._state.counts)

    def body_bytes(self, kind: str | None = None) -> int:
        """Body bytes relayed to the client (the gate), of one kind or all."""
        with self._lock:
            if kind is None:
                return sum(self._state.body_bytes.values())
            return self._state.body_bytes[kind]

    def log(self) -> list[Passed]:
        with self._lock:
            return list(self._state.log)

    def summary(self) -> str:
        """``GET blob=2 HEAD manifest=1 ...`` for messages."""
        return " ".join(f"{m} {k}={n}" for (m, k), n in sorted(self.counts().items())) or "none"

    def _record(self, passed: Passed) -> None:
        with self._lock:
            self._state.counts[(passed.method, passed.kind)] += 1
            self._state.log.append(passed)

    def _sent(self, passed: Passed, size: int) -> None:
        # Counted when handed to the transport (before the write returns): an upper
        # bound of what the client can have received, e.g. while a stall holds.
        with self._lock:
            passed.body_bytes += size
            self._state.body_bytes[passed.kind] += size

    # -- forwarding ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        kind = path_kind(request.path)
        fault = self._take_fault(request.method, kind, request.path_qs)
        passed = Passed(request.method, request.path_qs, kind, fault.kind if fault else None)
        self._record(passed)
        try:
            return await self._answer(request, kind, fault, passed)
        except ConnectionResetError:
            # The client (the gate) went away, e.g. it timed out a hang: not our error.
            return web.Response(status=499)

    async def _answer(
        self, request: web.Request, kind: str, fault: Fault | None, passed: Passed
    ) -> web.StreamResponse:
        if fault is not None and fault.kind == "hang":
            await self._wait_release(fault)
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.kind == "redirect":
            passed.status = 307
            hop = int(request.query.get("hop", "0")) + 1
            return web.Response(status=307, headers={"Location": f"{request.path}?hop={hop}"})
        if fault is not None and fault.kind in ("status", "429"):
            status = 429 if fault.kind == "429" else fault.status
            code = "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE"
            headers = {"Retry-After": fault.retry_after} if status == 429 else {}
            body = json.dumps({"errors": [{"code": code, "message": f"{self.name} fault"}]})
            passed.status = status
            return web.Response(
                status=status, text=body, content_type="application/json", headers=headers
            )
        assert self._session is not None
        # A multidict: a client's several Accept lines must all reach the upstream.
        outgoing = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP
        )
        data = await request.read() if request.body_exists else None
        try:
            upstream = await self._session.request(
                request.method,
                self.target + request.path_qs,
                headers=outgoing,
                data=data,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError):
            # The target itself is down: so is this proxy, as far as clients can tell.
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=502)
        async with upstream:
            return await self._relay(request, upstream, fault, passed)

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        fault: Fault | None,
        passed: Passed,
    ) -> web.StreamResponse:
        passed.status = upstream.status
        headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP]
        length_header = upstream.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        body_fault = (
            fault
            if fault is not None and fault.kind in BODY_FAULTS and upstream.status in (200, 206)
            else None
        )
        if body_fault is not None and body_fault.kind == "html":
            await upstream.read()
            page = web.StreamResponse(status=200, headers={"Content-Type": "text/html"})
            page.content_length = len(HTML_PAGE)
            await page.prepare(request)
            if body_fault.pause_at is not None:
                await self._wait_release(body_fault)
            self._sent(passed, len(HTML_PAGE))
            await page.write(HTML_PAGE)
            await page.write_eof()
            return page
        response = web.StreamResponse(status=upstream.status)
        for name, value in headers:
            response.headers.add(name, value)
        keep = None
        if body_fault is not None and body_fault.kind in ("truncate", "short", "stall"):
            keep = body_fault.keep if body_fault.keep is not None else (length or 2) // 2
        if body_fault is not None and body_fault.kind == "short":
            response.enable_chunked_encoding()
        elif length is not None:
            response.content_length = length
        await response.prepare(request)
        if request.method == "HEAD":
            await upstream.read()
            await response.write_eof()
            return response
        flip_at = pause = cut = None
        if body_fault is not None:
            half = (length or 2) // 2
            if body_fault.kind == "corrupt":
                flip_at = body_fault.offset if body_fault.offset is not None else half
            pause = body_fault.pause_at
            if body_fault.kind == "stall":
                pause = keep
            elif body_fault.kind in ("truncate", "short"):
                cut = keep
        sent = 0
        async for data in upstream.content.iter_chunked(CHUNK):
            chunk = data
            if flip_at is not None and sent <= flip_at < sent + len(chunk):
                mutable = bytearray(chunk)
                mutable[flip_at - sent] ^= 0xFF
                chunk = bytes(mutable)
            while chunk:
                stops = [b for b in (pause, cut) if b is not None]
                stop = min(stops) if stops else None
                if stop is None or sent + len(chunk) < stop:
                    self._sent(passed, len(chunk))
                    sent += len(chunk)
                    await response.write(chunk)
                    break
                head, chunk = chunk[: stop - sent], chunk[stop - sent :]
                if head:
                    self._sent(passed, len(head))
                    sent += len(head)
                    await response.write(head)
                if stop == pause:
                    assert body_fault is not None
                    await self._wait_release(body_fault)
                    pause = None
                    continue
                assert body_fault is not None
                if body_fault.kind == "truncate":
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                await response.write_eof()  # short: a clean, early end
                return response
        await response.write_eof()
        return response

    def __repr__(self) -> str:
        return f"FaultProxy({self.name!r}, {self.url} -> {self.target})"
