"""Upstream misbehaviour a real registry will not produce, and what the gate makes of it.

A tiny fault-injecting fake registry (an aiohttp app on a loopback port, run on a
background event loop thread in this process) plays upstreams that rate-limit, fail,
hang, send manifests that do not match their digest or their declared type, send
oversized manifests, point their Bearer realm at the cloud metadata address or at a
foreign host, and redirect blobs (to another loopback port, in a loop, or to a host the
gate must not visit). One gate fronts them all; each fake records every request it
receives, so a test can prove what the gate did *not* send.

Paths are ``/v2/<scenario>/<variant>/...``: the scenario picks the misbehaviour, the
variant (unique per test) picks the content, so the gate's cache never answers for the
upstream. Each test also gets a registry name of its own from a pool (all pointing at
the same fake), so one test's failures cannot open the circuit breaker for the next.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.support.gate import GateProcess
from tests.support.images import MT_DOCKER_LIST, MT_OCI_MANIFEST
from tests.support.registry_client import MANIFEST_ACCEPT
from tests.support.wire import Reply, request

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ACCEPT_LINES = [("Accept", mt) for mt in MANIFEST_ACCEPT]
READ_TIMEOUT = 1.0  # the gate's timeouts.read for the fakes: hangs cost ~1 s
HANG_SECONDS = 8.0  # longer than READ_TIMEOUT, shorter than a test should ever take
RETRY_AFTER = "17"
TOKEN = "fake-upstream-token-123"
RIGHT_PASSWORD = "fake-right-password"
WRONG_PASSWORD = "fake-wrong-password"
INTERNAL_DETAIL = "panic: internal-secret-detail at db.go:42"
MAX_MANIFEST = 4 * 1024 * 1024
POOL_SIZE = 64  # registry names f0.example ... for the anonymous fault fake


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@functools.cache
def blob_for(variant: str) -> bytes:
    return f"blob content for {variant}\n".encode() * 10


@functools.cache
def manifest_for(variant: str) -> bytes:
    blob = blob_for(variant)
    document = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(blob),
            "size": len(blob),
        },
        "layers": [],
        "annotations": {"variant": variant},
    }
    return json.dumps(document, sort_keys=True).encode()


# -- the fake upstream ---------------------------------------------------------------------


class LoopThread:
    """An asyncio event loop on a daemon thread, for servers the synchronous tests use."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-upstreams")
        self.thread.daemon = True
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass(frozen=True)
class Seen:
    """One request a fake received."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]


class FakeRegistry:
    """An aiohttp app answering every path with ``handler``; records what it receives."""

    def __init__(self, loops: LoopThread, handler: Handler, host: str = "127.0.0.1") -> None:
        self.loops = loops
        self.handler = handler
        self.host_ip = host
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host_ip}:{self.port}"

    async def _dispatch(self, req: web.Request) -> web.StreamResponse:
        with self._lock:
            self.seen.append(Seen(req.method, req.path_qs, CIMultiDict(req.headers)))
        return await self.handler(req)

    async def _start(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host_ip, 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def _stop(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def start(self) -> FakeRegistry:
        self.loops.run(self._start())
        return self

    def stop(self) -> None:
        self.loops.run(self._stop())

    async def hang(self) -> None:
        """Sleep as a stuck upstream would, but wake up when the fake is stopped."""
        assert self._release is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._release.wait(), HANG_SECONDS)

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()

    def requests(self, contains: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if contains in s.path_qs]


def oci_error(status: int, code: str, message: str, **headers: str) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


def manifest_response(body: bytes, content_type: str, digest: str | None = None) -> web.Response:
    response = web.Response(
        status=200, body=body, headers={"Docker-Content-Digest": digest or sha256(body)}
    )
    response.content_type = content_type
    return response


def content_response(req: web.Request, variant: str) -> web.Response:
    """The well-behaved answer: the variant's manifest or its blob."""
    if "/manifests/" in req.path:
        return manifest_response(manifest_for(variant), MT_OCI_MANIFEST)
    blob = blob_for(variant)
    return web.Response(
        body=blob,
        content_type="application/octet-stream",
        headers={"Docker-Content-Digest": sha256(blob)},
    )


def make_scenarios(fake: Callable[[], FakeRegistry], cdn: Callable[[], FakeRegistry]) -> Handler:
    """The anonymous fault-injecting upstream: ``/v2/<scenario>/<variant>/...``."""

    async def handler(req: web.Request) -> web.StreamResponse:
        path = req.path
        if path in ("/v2", "/v2/"):
            return web.json_response({})
        if path.startswith("/loop/"):
            hop = int(path.rsplit("/", 1)[1])
            raise web.HTTPFound(f"/loop/{hop + 1}")
        parts = path.split("/")
        scenario, variant = (parts[2], parts[3]) if len(parts) > 4 else ("", "")
        manifest = manifest_for(variant)
        if scenario == "s429":
            return oci_error(429, "TOOMANYREQUESTS", "slow down", **{"Retry-After": RETRY_AFTER})
        if scenario == "s429bare":
            return oci_error(429, "TOOMANYREQUESTS", "slow down")
        if scenario == "s500":
            return web.Response(status=500, text=INTERNAL_DETAIL)
        if scenario == "s503":
            return oci_error(503, "UNAVAILABLE", INTERNAL_DETAIL)
        if scenario == "s404":
            return oci_error(404, "MANIFEST_UNKNOWN", "nope")
        if scenario == "hang":
            await fake().hang()
            return content_response(req, variant)
        if scenario == "stall":
            if req.method == "HEAD":
                return content_response(req, variant)
            # Headers and half a manifest, then nothing.
            response = web.StreamResponse(
                status=200,
                headers={
                    "Content-Type": MT_OCI_MANIFEST,
                    "Content-Length": str(len(manifest)),
                    "Docker-Content-Digest": sha256(manifest),
                },
            )
            await response.prepare(req)
            await response.write(manifest[: len(manifest) // 2])
            await fake().hang()
            return response
        if scenario == "baddigest":
            # Claims whatever digest was asked for; the body hashes to something else.
            return manifest_response(manifest, MT_OCI_MANIFEST, digest=parts[-1])
        if scenario == "mismatch":
            return manifest_response(manifest, MT_DOCKER_LIST)
        if scenario == "ambiguous":
            doc = {**json.loads(manifest), "manifests": []}
            return manifest_response(json.dumps(doc).encode(), MT_OCI_MANIFEST)
        if scenario == "huge":
            padding = b" " * (MAX_MANIFEST + 1 - len(manifest))
            return manifest_response(manifest[:-1] + padding + b"}", MT_OCI_MANIFEST)
        if scenario == "hugechunked":
            response = web.StreamResponse(status=200, headers={"Content-Type": MT_OCI_MANIFEST})
            response.enable_chunked_encoding()
            await response.prepare(req)
            await response.write(manifest[:-1])
            chunk = b" " * 65536
            for _ in range(MAX_MANIFEST // len(chunk) + 2):
                await response.write(chunk)
            await response.write(b"}")
            return response
        if scenario == "ok":
            return content_response(req, variant)
        if scenario == "redirloop":
            raise web.HTTPFound("/loop/1")
        if scenario == "tocdn":
            raise web.HTTPTemporaryRedirect(f"{cdn().url}/cdn/{variant}/{parts[-1]}?sig=abc")
        return oci_error(404, "NAME_UNKNOWN", f"no scenario {scenario!r}")

    return handler


def make_cdn() -> Handler:
    """A blob store on another port (``/cdn/<variant>/<digest>``): refuses any request
    that carries credentials."""

    async def handler(req: web.Request) -> web.StreamResponse:
        if "Authorization" in req.headers:
            return web.Response(status=403, text="credentials sent to the CDN")
        variant = req.path.split("/")[2]
        return web.Response(body=blob_for(variant), content_type="application/octet-stream")

    return handler


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make_authenticated(
    scheme: str, own: Callable[[], FakeRegistry], cdn: Callable[[], FakeRegistry]
) -> Handler:
    """An upstream demanding Basic auth, or a Bearer token from its own ``/token``."""

    async def handler(req: web.Request) -> web.StreamResponse:
        path = req.path
        if path == "/token":
            if req.headers.get("Authorization") != _basic("gate", RIGHT_PASSWORD):
                return web.json_response({"error": "bad credentials"}, status=401)
            return web.json_response({"token": TOKEN, "expires_in": 300})
        wanted = f"Bearer {TOKEN}" if scheme == "bearer" else _basic("gate", RIGHT_PASSWORD)
        if req.headers.get("Authorization") != wanted:
            if scheme == "bearer":
                challenge = f'Bearer realm="{own().url}/token",service="fake"'
            else:
                challenge = 'Basic realm="fake"'
            return oci_error(401, "UNAUTHORIZED", "log in", **{"WWW-Authenticate": challenge})
        parts = path.split("/")
        scenario, variant = (parts[2], parts[3]) if len(parts) > 4 else ("", "")
        if "/blobs/" in path:
            digest = parts[-1]
            if scenario == "tocdn":
                raise web.HTTPTemporaryRedirect(f"{cdn().url}/cdn/{variant}/{digest}?sig=abc")
            if scenario == "tolocalhost":
                raise web.HTTPTemporaryRedirect(
                    f"http://localhost:{cdn().port}/cdn/{variant}/{digest}"
                )
            if scenario == "tometadata":
                raise web.HTTPTemporaryRedirect("http://169.254.169.254/latest/meta-data/")
        return content_response(req, variant)

    return handler


def make_realm_elsewhere(realm: Callable[[], str]) -> Handler:
    """An upstream whose Bearer challenge sends the gate to ``realm()``."""

    async def handler(req: web.Request) -> web.StreamResponse:
        challenge = f'Bearer realm="{realm()}",service="fake",scope="repository:x/y:pull"'
        return oci_error(401, "UNAUTHORIZED", "log in", **{"WWW-Authenticate": challenge})

    return handler


async def record_only(req: web.Request) -> web.StreamResponse:
    return web.json_response({"token": "stolen", "expires_in": 300})


@dataclass
class Fakes:
    faults: FakeRegistry
    cdn: FakeRegistry
    bearer: FakeRegistry
    basic: FakeRegistry
    metadata: FakeRegistry
    foreign: FakeRegistry
    foreign_token: FakeRegistry  # on 127.0.0.2: a host the gate must not visit
    localhost_realm: FakeRegistry
    localhost_token: FakeRegistry  # 127.0.0.1, but named "localhost" by the realm

    def all(self) -> list[FakeRegistry]:
        return [v for v in vars(self).values() if isinstance(v, FakeRegistry)]

    def clear(self) -> None:
        for fake in self.all():
            fake.clear()


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    loops = LoopThread()
    started: dict[str, FakeRegistry] = {}

    def start(name: str, handler: Handler, host: str = "127.0.0.1") -> None:
        started[name] = FakeRegistry(loops, handler, host).start()

    def fake(name: str) -> Callable[[], FakeRegistry]:
        return lambda: started[name]  # late: handlers may name fakes started after them

    try:
        start("cdn", make_cdn())
        start("faults", make_scenarios(fake("faults"), fake("cdn")))
        start("bearer", make_authenticated("bearer", fake("bearer"), fake("cdn")))
        start("basic", make_authenticated("basic", fake("basic"), fake("cdn")))
        start("metadata", make_realm_elsewhere(lambda: "http://169.254.169.254/latest/token"))
        start("foreign_token", record_only, host="127.0.0.2")
        start("foreign", make_realm_elsewhere(lambda: f"{started['foreign_token'].url}/token"))
        start("localhost_token", record_only)
        start(
            "localhost_realm",
            make_realm_elsewhere(lambda: f"http://localhost:{started['localhost_token'].port}/t"),
        )
        yield Fakes(**started)
    finally:
        for server in started.values():
            server.stop()
        loops.close()


@pytest.fixture(scope="module")
def fault_gate(fakes: Fakes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GateProcess]:
    timeouts = {"connect": 2.0, "read": READ_TIMEOUT}

    def upstream(registry: str, fake: FakeRegistry, **extra: Any) -> dict[str, Any]:
        return {"registry": registry, "url": fake.url, "timeouts": timeouts, **extra}

    creds = {"username": "gate", "password_env": "FAKE_RIGHT_PASSWORD"}
    table = [upstream(f"f{i}.example", fakes.faults) for i in range(POOL_SIZE)]
    table += [
        upstream("bearer.example", fakes.bearer, **creds),
        upstream("basic.example", fakes.basic, **creds),
        upstream("wrong.example", fakes.basic, username="gate", password_env="FAKE_WRONG"),
        upstream("metadata.example", fakes.metadata),
        upstream("foreign.example", fakes.foreign),
        upstream("localhost-realm.example", fakes.localhost_realm),
    ]
    process = GateProcess(
        tmp_path_factory.mktemp("fault-gate"),
        {"upstreams": table},
        env={"FAKE_RIGHT_PASSWORD": RIGHT_PASSWORD, "FAKE_WRONG": WRONG_PASSWORD},
        name="fault-gate",
    )
    with process:
        yield process


@pytest.fixture(scope="module")
def registry_pool() -> Iterator[str]:
    return (f"f{i}.example" for i in range(POOL_SIZE))


@pytest.fixture
def upstream(registry_pool: Iterator[str]) -> str:
    """A registry name (pointing at the fault fake) that no other test has used."""
    name = next(registry_pool, None)
    assert name is not None, "POOL_SIZE too small for the number of fault tests"
    return name


@pytest.fixture
def variant() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def gate(fault_gate: GateProcess, fakes: Fakes) -> GateProcess:
    fakes.clear()
    return fault_gate


def get(gate: GateProcess, path: str, method: str = "GET") -> Reply:
    return request(gate.url, method, path, ACCEPT_LINES, timeout=HANG_SECONDS + 10)


def assert_error(reply: Reply, status: int, code: str, *, names: str | None = None) -> None:
    assert reply.status == status, reply
    assert (reply.header("Content-Type") or "").startswith("application/json"), reply.headers
    assert reply.error_codes[:1] == [code], reply
    text = reply.body.decode(errors="replace")
    for leak in ("Traceback", 'File "', RIGHT_PASSWORD, WRONG_PASSWORD, TOKEN, INTERNAL_DETAIL):
        assert leak not in text, f"{leak!r} leaked into {text}"
    if names is not None:
        assert names in " ".join(reply.error_messages), f"error does not name {names}: {text}"


def pull_path(kind: str, registry: str, scenario: str, variant: str) -> str:
    base = f"/v2/{registry}/{scenario}/{variant}"
    if kind == "manifest":
        return f"{base}/manifests/v1"
    if kind == "blob":
        return f"{base}/blobs/{sha256(blob_for(variant))}"
    assert kind == "tags"
    return f"{base}/tags/list"


KINDS = ["manifest", "blob", "tags"]


# -- status mapping ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_429_passes_through_with_retry_after(
    gate: GateProcess, upstream: str, variant: str, kind: str
) -> None:
    reply = get(gate, pull_path(kind, upstream, "s429", variant))
    assert_error(reply, 429, "TOOMANYREQUESTS", names=upstream)
    assert reply.header("Retry-After") == RETRY_AFTER


def test_429_without_retry_after_still_tells_the_client_when(
    gate: GateProcess, upstream: str, variant: str
) -> None:
    reply = get(gate, pull_path("manifest", upstream, "s429bare", variant))
    assert_error(reply, 429, "TOOMANYREQUESTS")
    assert (reply.header("Retry-After") or "").isdigit(), reply.headers


@pytest.mark.parametrize("scenario", ["s500", "s503"])
@pytest.mark.parametrize("kind", KINDS)
def test_upstream_5xx_is_502_naming_the_upstream(
    gate: GateProcess, upstream: str, variant: str, kind: str, scenario: str
) -> None:
    reply = get(gate, pull_path(kind, upstream, scenario, variant))
    assert_error(reply, 502, "UNAVAILABLE", names=upstream)


@pytest.mark.parametrize("kind", KINDS)
def test_upstream_hang_is_504(gate: GateProcess, upstream: str, variant: str, kind: str) -> None:
    started = time.monotonic()
    reply = get(gate, pull_path(kind, upstream, "hang", variant))
    elapsed = time.monotonic() - started
    assert_error(reply, 504, "UNAVAILABLE", names=upstream)
    assert READ_TIMEOUT * 0.8 < elapsed < HANG_SECONDS - 1, elapsed


def test_manifest_stalling_mid_body_is_504(gate: GateProcess, upstream: str, variant: str) -> None:
    reply = get(gate, pull_path("manifest", upstream, "stall", variant))
    assert_error(reply, 504, "UNAVAILABLE")


def test_upstream_404_is_manifest_or_blob_unknown(
    gate: GateProcess, upstream: str, variant: str
) -> None:
    codes = {"manifest": "MANIFEST_UNKNOWN", "blob": "BLOB_UNKNOWN", "tags": "NAME_UNKNOWN"}
    for kind, code in codes.items():
        assert_error(get(gate, pull_path(kind, upstream, "s404", variant)), 404, code)


def test_the_fault_gate_serves_a_good_upstream(
    gate: GateProcess, upstream: str, variant: str
) -> None:
    """Control: the same fake, well behaved, is served normally."""
    manifest, blob = manifest_for(variant), blob_for(variant)
    reply = get(gate, pull_path("manifest", upstream, "ok", variant))
    assert reply.status == 200, reply
    assert reply.body == manifest
    reply = get(gate, f"/v2/{upstream}/ok/{variant}/manifests/{sha256(manifest)}")
    assert reply.status == 200 and reply.body == manifest, reply
    reply = get(gate, pull_path("blob", upstream, "ok", variant))
    assert reply.status == 200 and reply.body == blob, reply


# -- manifest verification --------------------------------------------------------------------


def test_manifest_by_digest_that_does_not_match_is_502(
    gate: GateProcess, upstream: str, variant: str
) -> None:
    wanted = sha256(b"something else " + variant.encode())
    reply = get(gate, f"/v2/{upstream}/baddigest/{variant}/manifests/{wanted}")
    assert_error(reply, 502, "UNAVAILABLE", names=upstream)
    assert manifest_for(variant) not in reply.body


def test_manifest_whose_media_type_contradicts_content_type_is_502(
    gate: GateProcess, upstream: str, variant: str
) -> None:
    for ref in ("v1", sha256(manifest_for(variant))):
        reply = get(gate, f"/v2/{upstream}/mismatch/{variant}/manifests/{ref}")
        assert_error(reply, 502, "UNAVAILABLE", names=upstream)


def test_ambiguous_manifest_is_502(gate: GateProcess, upstream: str, variant: str) -> None:
    reply = get(gate, pull_path("manifest", upstream, "ambiguous", variant))
    assert_error(reply, 502, "UNAVAILABLE")


@pytest.mark.parametrize("scenario", ["huge", "hugechunked"])
def test_manifest_over_4_mib_is_502(
    gate: GateProcess, upstream: str, variant: str, scenario: str
) -> None:
    reply = get(gate, pull_path("manifest", upstream, scenario, variant))
    assert_error(reply, 502, "UNAVAILABLE")
    assert len(reply.body) < 4096


# -- where an upstream may send the gate -----------------------------------------------------


def test_bearer_realm_at_the_metadata_address_is_not_contacted(gate: GateProcess) -> None:
    started = time.monotonic()
    reply = get(gate, "/v2/metadata.example/x/y/manifests/v1")
    assert_error(reply, 502, "UNAVAILABLE", names="metadata.example")
    # Refused by policy, not by a connection timing out (in the test namespace a
    # connection would fail at once anyway; on a host with a route it would hang).
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("registry", "recorder"),
    [("foreign.example", "foreign_token"), ("localhost-realm.example", "localhost_token")],
)
def test_bearer_realm_on_a_foreign_host_gets_no_token_request(
    gate: GateProcess, fakes: Fakes, registry: str, recorder: str
) -> None:
    token_server: FakeRegistry = getattr(fakes, recorder)
    digest = sha256(b"x")
    for path in (f"/v2/{registry}/x/y/manifests/v1", f"/v2/{registry}/x/y/blobs/{digest}"):
        reply = get(gate, path)
        assert_error(reply, 502, "UNAVAILABLE", names=registry)
    assert token_server.requests() == [], "the gate sent a token request to a foreign realm"


@pytest.mark.parametrize("registry", ["bearer.example", "basic.example"])
def test_blob_redirect_is_followed_without_authorization(
    gate: GateProcess, fakes: Fakes, variant: str, registry: str
) -> None:
    origin = fakes.bearer if registry == "bearer.example" else fakes.basic
    blob = blob_for(variant)
    reply = get(gate, pull_path("blob", registry, "tocdn", variant))
    assert reply.status == 200, reply
    assert reply.body == blob
    assert reply.header("Docker-Content-Digest") == sha256(blob)
    # The upstream got the gate's credentials (the redirect answered an authorised
    # request) ...
    assert any("Authorization" in s.headers for s in origin.requests(variant)), origin.seen
    # ... and the CDN on another port got the request(s), without them.
    cdn_requests = fakes.cdn.requests(variant)
    assert any(s.method == "GET" for s in cdn_requests), cdn_requests
    for seen in cdn_requests:
        assert "Authorization" not in seen.headers, seen
        assert seen.path_qs == f"/cdn/{variant}/{sha256(blob)}?sig=abc"


def test_anonymous_blob_redirect_to_another_port(
    gate: GateProcess, fakes: Fakes, upstream: str, variant: str
) -> None:
    reply = get(gate, pull_path("blob", upstream, "tocdn", variant))
    assert reply.status == 200, reply
    assert reply.body == blob_for(variant)
    assert any(s.method == "GET" for s in fakes.cdn.requests(variant))


@pytest.mark.parametrize("scenario", ["tolocalhost", "tometadata"])
def test_blob_redirect_to_a_host_the_upstream_may_not_use_is_502(
    gate: GateProcess, fakes: Fakes, variant: str, scenario: str
) -> None:
    started = time.monotonic()
    reply = get(gate, pull_path("blob", "bearer.example", scenario, variant))
    assert_error(reply, 502, "UNAVAILABLE", names="bearer.example")
    assert time.monotonic() - started < 2.0
    assert fakes.cdn.requests() == []


def test_redirect_loop_is_502(gate: GateProcess, fakes: Fakes, upstream: str, variant: str) -> None:
    reply = get(gate, pull_path("blob", upstream, "redirloop", variant))
    assert_error(reply, 502, "UNAVAILABLE", names=upstream)
    hops = fakes.faults.requests("/loop/")
    # Each attempt gives up after at most 10 hops (a HEAD before the GET is allowed).
    assert 10 <= len(hops) <= 22, [s.path_qs for s in hops]
    assert max(int(s.path_qs.rsplit("/", 1)[1]) for s in hops) <= 11


# -- credentials -----------------------------------------------------------------------------------


@pytest.mark.parametrize("registry", ["bearer.example", "basic.example"])
def test_authenticated_upstreams_are_pulled(gate: GateProcess, variant: str, registry: str) -> None:
    reply = get(gate, pull_path("manifest", registry, "ok", variant))
    assert reply.status == 200, reply
    assert reply.body == manifest_for(variant)
    reply = get(gate, pull_path("blob", registry, "ok", variant))
    assert reply.status == 200 and reply.body == blob_for(variant), reply


def test_upstream_refusing_the_credentials_is_denied(
    gate: GateProcess, fakes: Fakes, variant: str
) -> None:
    reply = get(gate, pull_path("manifest", "wrong.example", "ok", variant))
    assert_error(reply, 403, "DENIED", names="wrong.example")
    # One retry after the challenge, no hammering.
    assert len(fakes.basic.requests(variant)) <= 2
