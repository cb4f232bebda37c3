"""A token-auth upstream that can turn hostile, with its token service and a CDN.

Owns the "upstream side" of the trust and reliability tests: three small aiohttp servers
on loopback addresses, each recording every request it receives (with its headers, so a
test can prove who was sent ``Authorization`` or a cookie):

- ``registry``: a Bearer-auth registry serving one manifest and one blob per repository.
  Its challenge's realm is whatever ``HostileUpstream.realm`` says (its own token
  service by default, or a foreign host), and a blob GET answers with a redirect to
  ``redirect_to`` when set, plus a ``Set-Cookie``;
- ``token``: its token service, on the registry's own address (another port). Its
  ``mode`` makes it answer normally, fail with 503 or hang;
- ``foreign``: on another loopback address (127.0.0.2): a host an attacker controls. It
  answers token requests with a token and blob requests with the blob, so a gate that
  trusted it would visibly succeed.

Any server can go ``down()`` (connections refused) and come back ``up()`` on the same port.
Servers run on whatever loop starts them: ``start_async()`` in a test's own loop, or
``start(loop_thread)`` on a ``fault_proxy.LoopThread`` for a gate in another process.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from tests.support.fault_proxy import LoopThread

__all__ = [
    "PASSWORD",
    "TOKEN",
    "USER",
    "FakeServer",
    "HostileUpstream",
    "Seen",
    "blob_for",
    "manifest_for",
    "sha256",
]

USER, PASSWORD = "gate", "hostile-test-password"
TOKEN = "hostile-test-token"
FOREIGN_TOKEN = "foreign-token"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_for(repository: str) -> bytes:
    return f"blob of {repository}\n".encode() * 8


def manifest_for(repository: str) -> bytes:
    blob = blob_for(repository)
    document = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(blob),
            "size": len(blob),
        },
        "layers": [],
    }
    return json.dumps(document, sort_keys=True).encode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass(frozen=True)
class Seen:
    """One request a server received."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]


class FakeServer:
    """An aiohttp app on ``host``, answering every path with ``handler``, recording all."""

    def __init__(self, name: str, handler: Handler, host: str = "127.0.0.1") -> None:
        self.name = name
        self.handler = handler
        self.host = host
        self.port = 0
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        self.hang = asyncio.Event()  # set: hanging handlers return

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.seen.append(Seen(request.method, request.path_qs, CIMultiDict(request.headers)))
        return await self.handler(request)

    async def up_async(self) -> None:
        if self._runner is not None:
            return
        self.hang = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port, reuse_address=True).start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def down_async(self) -> None:
        runner, self._runner = self._runner, None
        self.hang.set()
        if runner is not None:
            await runner.cleanup()

    def requests(self, contains: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if contains in s.path_qs]

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()


class HostileUpstream:
    """The registry, its token service and a foreign host, with switchable behaviour."""

    def __init__(self, foreign_host: str = "127.0.0.2") -> None:
        self.registry = FakeServer("registry", self._registry)
        self.token = FakeServer("token", self._token)
        self.foreign = FakeServer("foreign", self._foreign, host=foreign_host)
        # None: the token service's own /token. Tests point it at a foreign URL.
        self.realm: str | None = None
        self.token_mode = "ok"  # "ok", "503" or "hang"
        self.redirect_to: str | None = None  # blob GETs redirect here (+ /<digest>)
        self.token_asked = asyncio.Event()  # set by every token request (in-loop tests)
        self._loop: LoopThread | None = None

    # -- lifecycle -------------------------------------------------------------------

    def servers(self) -> tuple[FakeServer, ...]:
        return (self.registry, self.token, self.foreign)

    async def start_async(self) -> HostileUpstream:
        for server in self.servers():
            await server.up_async()
        return self

    async def stop_async(self) -> None:
        for server in self.servers():
            await server.down_async()

    def start(self, loop: LoopThread) -> HostileUpstream:
        self._loop = loop
        loop.run(self.start_async())
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.run(self.stop_async())

    def down(self, *servers: FakeServer) -> None:
        assert self._loop is not None
        for server in servers:
            self._loop.run(server.down_async())

    def up(self, *servers: FakeServer) -> None:
        assert self._loop is not None
        for server in servers:
            self._loop.run(server.up_async())

    def clear(self) -> None:
        for server in self.servers():
            server.clear()

    # -- what tests read -------------------------------------------------------------

    def authorized_hosts(self) -> dict[str, list[str]]:
        """``{server name: [Authorization values it received]}`` (servers that got any)."""
        found: dict[str, list[str]] = {}
        for server in self.servers():
            values = [
                s.headers["Authorization"] for s in server.seen if "Authorization" in s.headers
            ]
            if values:
                found[server.name] = values
        return found

    # -- handlers --------------------------------------------------------------------

    @property
    def realm_url(self) -> str:
        return self.realm or f"{self.token.url}/token"

    async def _registry(self, request: web.Request) -> web.StreamResponse:
        # Pointing its realm away from its token service, it refuses every token (as a
        # hostile upstream would, to make clients follow the new challenge).
        own_realm = f":{self.token.port}/" in self.realm_url
        if not own_realm or request.headers.get("Authorization") != f"Bearer {TOKEN}":
            challenge = f'Bearer realm="{self.realm_url}",service="hostile"'
            body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "log in"}]})
            return web.Response(
                status=401,
                text=body,
                content_type="application/json",
                headers={"WWW-Authenticate": challenge},
            )
        path = request.path
        if path in ("/v2", "/v2/"):
            return web.json_response({})
        repository = path[len("/v2/") :].split("/manifests/")[0].split("/blobs/")[0]
        if "/manifests/" in path:
            body = manifest_for(repository)
            response = web.Response(body=body, headers={"Docker-Content-Digest": sha256(body)})
            response.content_type = MANIFEST_TYPE
            return response
        if "/blobs/" in path:
            blob = blob_for(repository)
            if self.redirect_to is not None:
                raise web.HTTPTemporaryRedirect(
                    f"{self.redirect_to}/{repository}/{sha256(blob)}",
                    headers={"Set-Cookie": "session=upstream-cookie; Path=/"},
                )
            return web.Response(body=blob, headers={"Docker-Content-Digest": sha256(blob)})
        return web.json_response({"errors": [{"code": "NAME_UNKNOWN", "message": "?"}]}, status=404)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.token_asked.set()
        if self.token_mode == "503":
            return web.Response(status=503, text="token service down")
        if self.token_mode == "hang":
            await self.token.hang.wait()
            return web.Response(status=503, text="token service was hanging")
        if request.headers.get("Authorization") != basic(USER, PASSWORD):
            return web.json_response({"error": "bad credentials"}, status=401)
        return web.json_response({"token": TOKEN, "expires_in": 300})

    async def _foreign(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/blob/"):
            # /blob/<repository>/<digest>: where a redirect_to of {foreign.url}/blob sends.
            repository = request.path[len("/blob/") :].rsplit("/", 1)[0]
            return web.Response(body=blob_for(repository))
        return web.json_response({"token": FOREIGN_TOKEN, "expires_in": 300})
