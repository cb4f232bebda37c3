"""proxy/upstream/client.py: `map_failure` (the one table from upstream answers to OCI errors),
and the client's token dance, redirects and breaker against a hostile upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from multidict import CIMultiDict

from proxy.errors import (
    BlobUnknown,
    BlobUploadUnknown,
    Denied,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.settings import UpstreamSettings
from proxy.upstream.circuit import CircuitBreaker, CircuitState
from proxy.upstream.client import Kind, PassThroughError, UpstreamClient, map_failure
from tests.support.hostile_upstream import (
    PASSWORD,
    USER,
    HostileUpstream,
    basic,
    blob_for,
    manifest_for,
    sha256,
)

UPSTREAM = "quay.io"
SECRET = "hunter2-s3cret"
NO_HEADERS: CIMultiDict[str] = CIMultiDict()


def oci_body(code: str, message: str = "upstream says no", detail: object = None) -> bytes:
    entry: dict[str, object] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}).encode()


def mapped(
    status: int, kind: Kind = "manifest", headers: CIMultiDict[str] | None = None, body: bytes = b""
) -> RegistryError:
    error = map_failure(
        UPSTREAM, status, kind, headers if headers is not None else NO_HEADERS, body
    )
    # Every mapped error is a complete OCI error document.
    document = json.loads(error.body())
    assert document["errors"][0]["code"] == error.code
    return error


@pytest.mark.parametrize(
    ("kind", "error_type", "code"),
    [
        ("manifest", ManifestUnknown, "MANIFEST_UNKNOWN"),
        ("blob", BlobUnknown, "BLOB_UNKNOWN"),
        ("tags", NameUnknown, "NAME_UNKNOWN"),
        ("upload", BlobUploadUnknown, "BLOB_UPLOAD_UNKNOWN"),
        ("referrers", NameUnknown, "NAME_UNKNOWN"),
        ("ping", NameUnknown, "NAME_UNKNOWN"),
    ],
)
def test_404_per_kind(kind: Kind, error_type: type[RegistryError], code: str) -> None:
    error = mapped(404, kind)
    assert type(error) is error_type
    assert (error.code, error.status) == (code, 404)
    assert UPSTREAM in error.message


@pytest.mark.parametrize("status", [401, 403])
def test_refusals_are_denied(status: int) -> None:
    error = mapped(status, body=oci_body("UNAUTHORIZED", f"token {SECRET} rejected"))
    assert isinstance(error, Denied)
    assert (error.code, error.status) == ("DENIED", 403)
    assert UPSTREAM in error.message


@pytest.mark.parametrize("retry_after", ["30", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_429_carries_retry_after(retry_after: str) -> None:
    headers = CIMultiDict({"retry-after": retry_after})
    error = mapped(429, "blob", headers)
    assert isinstance(error, TooManyRequests)
    assert (error.code, error.status) == ("TOOMANYREQUESTS", 429)
    assert error.headers == {"Retry-After": retry_after}
    assert UPSTREAM in error.message


def test_429_without_retry_after_gets_a_default() -> None:
    error = mapped(429)
    assert error.headers["Retry-After"].isdigit()


@pytest.mark.parametrize("status", [500, 501, 502, 503, 599])
def test_5xx_is_502_naming_the_upstream(status: int) -> None:
    error = mapped(status, body=b"<html>Internal error " + SECRET.encode() + b"</html>")
    assert type(error) is UpstreamUnavailable
    assert (error.code, error.status) == ("UNAVAILABLE", 502)
    assert UPSTREAM in error.message
    assert str(status) in error.message


def test_504_is_504() -> None:
    error = mapped(504)
    assert isinstance(error, UpstreamTimeout)
    assert (error.code, error.status) == ("UNAVAILABLE", 504)
    assert UPSTREAM in error.message


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "MANIFEST_INVALID"),
        (400, "DIGEST_INVALID"),
        (400, "NAME_INVALID"),
        (400, "TAG_INVALID"),
        (400, "SIZE_INVALID"),
        (400, "BLOB_UPLOAD_INVALID"),
        (400, "MANIFEST_BLOB_UNKNOWN"),
        (400, "BLOB_UPLOAD_UNKNOWN"),
        (405, "UNSUPPORTED"),
        (409, "MANIFEST_INVALID"),
        (400, "NAME_UNKNOWN"),
    ],
)
def test_4xx_with_standard_code_passes_through(status: int, code: str) -> None:
    upstream_message = "layer missing at http://10.1.2.3:5000/v2/x (db 10.9.9.9)"
    error = mapped(status, "upload", body=oci_body(code, upstream_message, detail={"x": 1}))
    assert isinstance(error, PassThroughError)
    assert (error.code, error.status) == (code, status)
    assert error.message.startswith(f"upstream {UPSTREAM}: ")
    # The upstream's message and detail are not relayed (they may name internal
    # addresses): the client gets the code's standard message.
    assert "10." not in error.body().decode()
    assert "layer missing" not in error.message
    assert error.detail is None


def test_416_passes_through_as_range_invalid() -> None:
    error = mapped(416, "blob")
    assert (error.code, error.status) == ("RANGE_INVALID", 416)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html>Bad Request</html>",
        oci_body("DENIED"),
        oci_body("UNAUTHORIZED"),
        oci_body("TOOMANYREQUESTS"),
        oci_body("SOMETHING_ELSE"),
        b'{"errors": []}',
        b'{"errors": {"code": "NAME_INVALID"}}',
        b'{"errors": ["NAME_INVALID"]}',
        b'{"errors": [{"message": "no code"}]}',
        b"[]",
        b"\xff\xfe",
        pytest.param(b"[" * 65536, id="deeply-nested"),
        pytest.param(b'{"errors":' * 20000, id="deeply-nested-object"),
    ],
)
@pytest.mark.parametrize("status", [400, 405, 409, 413, 418])
def test_other_4xx_is_502(body: bytes, status: int) -> None:
    error = mapped(status, body=body)
    assert type(error) is UpstreamUnavailable
    assert (error.code, error.status) == ("UNAVAILABLE", 502)
    assert UPSTREAM in error.message
    assert str(status) in error.message


def test_upstream_message_is_bounded() -> None:
    error = mapped(400, body=oci_body("MANIFEST_INVALID", "x" * 100_000))
    assert len(error.message) < 600
    assert "x" * 10 not in error.message


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 429, 500, 502, 503, 504])
def test_no_credentials_in_any_message(status: int) -> None:
    headers = CIMultiDict(
        {
            "WWW-Authenticate": f'Bearer realm="https://auth.example/token?secret={SECRET}"',
            "Authorization": f"Bearer {SECRET}",
            "Set-Cookie": f"session={SECRET}",
            "Retry-After": "5",
        }
    )
    body = json.dumps(
        {"errors": [{"code": "UNAUTHORIZED", "message": "bad", "detail": {"token": SECRET}}]}
    ).encode()
    error = mapped(status, headers=headers, body=body)
    rendered = error.body().decode() + error.message + json.dumps(error.headers)
    assert SECRET not in rendered


# --- the client against a hostile upstream (in-process servers on loopback) -------------------
#
# Which hosts receive the upstream's credentials, and what a failed token dance leaves
# behind. The registry is on 127.0.0.1 under the name quay.io (whose built-in lists hold
# CDN hosts); the foreign host is 127.0.0.2, approved for blob redirects only.


class RecordingObserver:
    def __init__(self) -> None:
        self.token_failures: list[tuple[str, str]] = []

    def observe_upstream(
        self, upstream: str, method: str, status: int | None, seconds: float
    ) -> None:
        pass

    def observe_ratelimit(self, upstream: str, remaining_header: str | None) -> None:
        pass

    def observe_token_failure(self, upstream: str, reason: str) -> None:
        self.token_failures.append((upstream, reason))


@pytest.fixture
async def hostile() -> AsyncIterator[HostileUpstream]:
    fake = await HostileUpstream().start_async()
    try:
        yield fake
    finally:
        await fake.stop_async()


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HOSTILE_PASSWORD", PASSWORD)
    return "HOSTILE_PASSWORD"


ClientFactory = Callable[..., Awaitable[UpstreamClient]]


@pytest.fixture
async def make_client(hostile: HostileUpstream, password: str) -> AsyncIterator[ClientFactory]:
    clients: list[UpstreamClient] = []

    async def make(
        *, breaker: CircuitBreaker | None = None, observer: object = None, **extra: object
    ) -> UpstreamClient:
        settings = UpstreamSettings.model_validate(
            {
                "registry": UPSTREAM,
                "url": hostile.registry.url,
                "username": USER,
                "password_env": password,
                "timeouts": {"connect": 2, "read": 2},
                **extra,
            }
        )
        client = UpstreamClient(settings, observer, breaker=breaker)  # type: ignore[arg-type]
        await client.start()
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.close()


async def pull_manifest(client: UpstreamClient, repository: str = "team/app") -> bytes:
    _, body = await client.get_body(
        f"/v2/{repository}/manifests/v1", kind="manifest", repository=repository, limit=1 << 20
    )
    return body


async def test_realm_on_a_redirect_host_gets_no_credentials(
    hostile: HostileUpstream, make_client: ClientFactory
) -> None:
    hostile.realm = f"{hostile.foreign.url}/token"
    client = await make_client(allowed_redirect_hosts=["127.0.0.2"])
    with pytest.raises(UpstreamUnavailable) as caught:
        await pull_manifest(client)
    assert hostile.foreign.requests() == []
    # The client-facing error names the registry, not the host it was sent to.
    rendered = caught.value.body().decode()
    assert UPSTREAM in rendered
    assert "127.0.0" not in rendered and str(hostile.foreign.port) not in rendered


async def test_realm_listed_for_realms_gets_the_credentials(
    hostile: HostileUpstream, make_client: ClientFactory
) -> None:
    hostile.realm = f"{hostile.token.url.replace('127.0.0.1', 'localhost')}/token"
    client = await make_client(allowed_realm_hosts=["localhost"])
    assert await pull_manifest(client) == manifest_for("team/app")
    assert [s.headers["Authorization"] for s in hostile.token.requests()] == [basic(USER, PASSWORD)]


async def test_blob_redirect_carries_no_credentials_and_no_cookies(
    hostile: HostileUpstream, make_client: ClientFactory
) -> None:
    hostile.redirect_to = f"{hostile.foreign.url}/blob"
    client = await make_client(allowed_redirect_hosts=["127.0.0.2"])
    for repository in ("team/app", "team/other"):
        blob = blob_for(repository)
        response = await client.request(
            "GET",
            f"/v2/{repository}/blobs/{sha256(blob)}",
            kind="blob",
            repository=repository,
            follow_redirects=True,
        )
        assert response.status == 200
        assert await response.read() == blob
        response.release()
    assert set(hostile.authorized_hosts()) == {"registry", "token"}
    for seen in hostile.foreign.requests() + hostile.registry.requests():
        assert "Cookie" not in seen.headers, seen


async def test_a_refused_realm_is_not_remembered(
    hostile: HostileUpstream, make_client: ClientFactory
) -> None:
    observer = RecordingObserver()
    client = await make_client(observer=observer)
    hostile.realm = "http://169.254.169.254/token"
    with pytest.raises(UpstreamUnavailable) as caught:
        await pull_manifest(client)
    assert "169.254" not in caught.value.body().decode()
    assert observer.token_failures == [(UPSTREAM, "realm_refused")]
    hostile.realm = None  # the upstream is fixed
    hostile.registry.clear()
    assert await pull_manifest(client) == manifest_for("team/app")
    # The gate asked the upstream again instead of failing from memory.
    assert hostile.registry.requests("/manifests/")


async def test_a_failed_token_service_is_not_remembered(
    hostile: HostileUpstream, make_client: ClientFactory
) -> None:
    observer = RecordingObserver()
    client = await make_client(observer=observer)
    hostile.token_mode = "503"
    with pytest.raises(UpstreamUnavailable):
        await pull_manifest(client)
    assert observer.token_failures == [(UPSTREAM, "error_status")]
    hostile.token_mode = "ok"
    assert await pull_manifest(client) == manifest_for("team/app")
    assert client._token_locks == {}


async def test_token_service_down_opens_the_circuit_and_recovery_closes_it(
    hostile: HostileUpstream, make_client: ClientFactory
) -> None:
    observer = RecordingObserver()
    breaker = CircuitBreaker(threshold=2, cooldown=0)
    client = await make_client(observer=observer, breaker=breaker)
    assert await pull_manifest(client, "team/app") == manifest_for("team/app")
    await hostile.token.down_async()
    await hostile.registry.down_async()
    # New scopes need new tokens: each failed token fetch counts against the upstream.
    for repository in ("team/b", "team/c"):
        with pytest.raises(UpstreamUnavailable):
            await pull_manifest(client, repository)
    assert breaker.state == CircuitState.OPEN
    assert ("quay.io", "unreachable") in observer.token_failures
    # A probe whose token fetch fails settles the probe (opens again), never sticks.
    with pytest.raises(UpstreamUnavailable):
        await pull_manifest(client, "team/d")
    assert not breaker.probing
    await hostile.registry.up_async()
    await hostile.token.up_async()
    assert await pull_manifest(client, "team/d") == manifest_for("team/d")
    assert breaker.state == CircuitState.CLOSED


async def test_a_probe_cancelled_in_the_token_fetch_is_released(
    hostile: HostileUpstream, make_client: ClientFactory
) -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=0)
    client = await make_client(breaker=breaker)
    assert await pull_manifest(client) == manifest_for("team/app")  # challenge known
    await hostile.registry.down_async()
    with pytest.raises(UpstreamUnavailable):
        await pull_manifest(client)  # its token is cached: straight to the registry
    assert breaker.state == CircuitState.OPEN
    await hostile.registry.up_async()
    hostile.token_mode = "hang"
    hostile.token_asked.clear()
    # The next request is the half-open probe; a new scope needs a token first.
    task = asyncio.ensure_future(pull_manifest(client, "team/slow"))
    await hostile.token_asked.wait()
    assert breaker.probing
    task.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not breaker.probing
    hostile.token_mode = "ok"
    hostile.token.hang.set()
    assert await pull_manifest(client, "team/slow") == manifest_for("team/slow")
    assert breaker.state == CircuitState.CLOSED
