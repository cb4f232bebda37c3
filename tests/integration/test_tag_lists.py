"""A hostile upstream's tag list against the gate process: memory bounded, fetches shared.

A real registry does not serve endless multi-MiB tag-list pages, so a small fake upstream
(an aiohttp app on a loopback port, on a background event loop thread) plays one:
``/v2/<scenario>/<variant>/tags/list`` answers pages of about 4 MiB, each with a
``Link: rel="next"`` to the page after, forever. ``short`` pages hold ~380,000 tags of 8
characters (the costliest to parse), ``long`` pages ~32,000 tags of 128 characters, the
same on every page (so only the byte bound stops them). The first page can be held until
the test lets it go, to gather concurrent requests on one fetch.

What is proved (issue 11, item 9): one tag-list request costs the gate a bounded amount
of memory (its peak RSS, ``VmHWM`` in ``/proc/PID/status``, grows by far less than the
unbounded read took) and fails with a 502 naming the upstream by its registry name, never
its address; concurrent identical requests make one upstream fetch sequence; concurrent
requests for many repositories stay within the same memory bound.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.fault_proxy import LoopThread
from tests.support.gate import GateFactory, GateProcess
from tests.support.metrics import scrape, wait_for_value
from tests.support.wire import Reply, request

MIB = 1024 * 1024
REGISTRY = "hostile.example"
PAGE_BYTES = 4 * MIB
# Peak RSS growth allowed for the attacks below (the unbounded read took ~900 MiB).
MEMORY_BOUND = 150 * MIB
CLIENTS = 16


def _page(tag_length: int) -> bytes:
    """Distinct tags of ``tag_length`` characters filling just under ``PAGE_BYTES``."""
    count = (PAGE_BYTES - 1024) // (tag_length + 3)
    tags = [f"t{i:0{tag_length - 1}d}" for i in range(count)]
    page = json.dumps({"name": "x", "tags": tags}, separators=(",", ":")).encode()
    assert len(page) <= PAGE_BYTES
    return page


class HostileUpstream:
    """Endless ~4 MiB tag-list pages; counts each page request; can hold first pages."""

    def __init__(self) -> None:
        self.loops = LoopThread("hostile-upstream")
        self.pages = {"short": _page(8), "long": _page(128)}
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._hold: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, req: web.Request) -> web.StreamResponse:
        with self._lock:
            self.requests.append(req.path_qs)
        if req.path in ("/v2", "/v2/"):
            return web.json_response({})
        scenario = req.path.split("/")[2]
        if scenario not in self.pages or not req.path.endswith("/tags/list"):
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        page = int(req.query.get("page", "0"))
        hold = self._hold
        if page == 0 and hold is not None:
            await hold.wait()
        link = f'<{req.path}?page={page + 1}&n=1000>; rel="next"'
        return web.Response(
            body=self.pages[scenario], content_type="application/json", headers={"Link": link}
        )

    def start(self) -> HostileUpstream:
        async def start() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", 0).start()
            self.port = int(self._runner.addresses[0][1])

        self.loops.run(start())
        return self

    def stop(self) -> None:
        self.release()
        if self._runner is not None:
            self.loops.run(self._runner.cleanup())
        self.loops.close()

    def hold_first_pages(self) -> None:
        async def hold() -> None:
            self._hold = asyncio.Event()

        self.loops.run(hold())

    def release(self) -> None:
        async def release() -> None:
            if self._hold is not None:
                self._hold.set()
            self._hold = None

        if not self.loops.loop.is_closed():
            self.loops.run(release())

    def first_pages(self, variant: str) -> int:
        """Fetch sequences begun for a variant (requests for its first page)."""
        with self._lock:
            return sum(1 for p in self.requests if variant in p and "page=" not in p)

    def pages_served(self, variant: str) -> int:
        with self._lock:
            return sum(1 for p in self.requests if variant in p)


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileUpstream]:
    upstream = HostileUpstream().start()
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture
def gate(hostile: HostileUpstream, gate_factory: GateFactory) -> GateProcess:
    """A gate of each test's own: the peak RSS it reads is this test's."""
    gate = gate_factory(
        {"upstreams": [{"registry": REGISTRY, "url": hostile.url}]}, name="tag-gate"
    )
    get(gate, "/v2/")  # the baseline is a gate that has served
    return gate


def peak_rss(gate: GateProcess) -> int:
    """The gate process's peak resident set size (VmHWM), in bytes."""
    assert gate.pid is not None
    for line in Path(f"/proc/{gate.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def tags_path(scenario: str, variant: str) -> str:
    return f"/v2/{REGISTRY}/{scenario}/{variant}/tags/list?n=1"


def get(gate: GateProcess, path: str) -> Reply:
    return request(gate.url, "GET", path, timeout=120)


def assert_refused_clearly(reply: Reply, gate: GateProcess) -> None:
    assert reply.status == 502, reply
    assert reply.error_codes == ["UNAVAILABLE"], reply
    message = " ".join(reply.error_messages)
    assert REGISTRY in message and "tag list" in message, message
    text = reply.body.decode()
    assert "127.0.0.1" not in text and "Traceback" not in text, text


def pull_decisions(gate: GateProcess) -> float:
    return scrape(gate.url).value(
        "registry_gate_policy_decisions_total", action="pull", decision="allow"
    )


@pytest.mark.parametrize("scenario", ["short", "long"])
def test_one_tag_list_from_endless_4_mib_pages_is_bounded_and_refused(
    gate: GateProcess, hostile: HostileUpstream, scenario: str
) -> None:
    variant = uuid.uuid4().hex[:12]
    before = peak_rss(gate)
    reply = get(gate, tags_path(scenario, variant))
    growth = peak_rss(gate) - before
    pages = hostile.pages_served(variant)
    print(
        f"\n{scenario} tags: {reply.status} {reply.error_messages}; {pages} pages read; "
        f"peak RSS +{growth / MIB:.1f} MiB"
    )
    assert_refused_clearly(reply, gate)
    assert growth < MEMORY_BOUND, f"peak RSS grew {growth / MIB:.0f} MiB"
    # Bounded by the bytes (16 MiB default): the fifth page at most.
    assert pages <= 5, pages


def test_concurrent_identical_tag_lists_make_one_upstream_fetch(
    gate: GateProcess, hostile: HostileUpstream
) -> None:
    variant = uuid.uuid4().hex[:12]
    path = tags_path("long", variant)
    before = peak_rss(gate)
    decided = pull_decisions(gate)
    hostile.hold_first_pages()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(get, gate, path) for _ in range(CLIENTS)]
            # Every request has passed policy, and so joined or started the fetch (no
            # await lies between the decision and joining), before the upstream answers.
            wait_for_value(
                gate.url,
                "registry_gate_policy_decisions_total",
                lambda value: value >= decided + CLIENTS,
                timeout=60,
                action="pull",
                decision="allow",
            )
            hostile.release()
            replies = [f.result() for f in futures]
    finally:
        hostile.release()
    growth = peak_rss(gate) - before
    print(
        f"\n{CLIENTS} concurrent: {hostile.first_pages(variant)} fetch sequence(s), "
        f"{hostile.pages_served(variant)} pages; peak RSS +{growth / MIB:.1f} MiB"
    )
    for reply in replies:
        assert_refused_clearly(reply, gate)
    assert hostile.first_pages(variant) == 1
    assert growth < MEMORY_BOUND, f"peak RSS grew {growth / MIB:.0f} MiB"


def test_concurrent_tag_lists_of_many_repositories_stay_bounded(
    gate: GateProcess, hostile: HostileUpstream
) -> None:
    variants = [uuid.uuid4().hex[:12] for _ in range(CLIENTS)]
    before = peak_rss(gate)
    with ThreadPoolExecutor(CLIENTS) as pool:
        replies = list(pool.map(lambda v: get(gate, tags_path("short", v)), variants))
    growth = peak_rss(gate) - before
    print(f"\n{CLIENTS} repositories at once: peak RSS +{growth / MIB:.1f} MiB")
    for reply in replies:
        assert_refused_clearly(reply, gate)
    assert growth < MEMORY_BOUND, f"peak RSS grew {growth / MIB:.0f} MiB"
