"""One client per upstream registry: pooled connections, timeouts, auth, status mapping.

`UpstreamClient` implements the OCI-terms `Registry` protocol (`proxy.upstream.api`): it
is the one place that builds `/v2/` URLs and maps upstream failures (`map_failure`).

The client performs the Bearer token dance itself (parse the challenge, fetch a token
from the realm with the needed scope and the upstream's credentials, cache it until
shortly before expiry), answers Basic challenges, follows blob redirects only to hosts
the upstream may send the gate to (without its `Authorization`), and is the only place
that maps upstream statuses and failures onto the gate's OCI errors (`map_failure`).

Credentials go to two places only: `Authorization` to the upstream's own host and port,
and the Basic password to a realm `EgressPolicy.check_realm` approved. Only issued
tokens are remembered; a failed dance forgets the challenge, so the next request asks
the upstream again. Every request, its token fetch included, runs inside one circuit
breaker attempt, which settles however it ends. Client-facing messages name the
upstream's registry name; hosts and URLs go to the log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from cachetools import TLRUCache
from multidict import CIMultiDict
from yarl import URL

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
from proxy.names.references import Repository
from proxy.settings import UpstreamSettings
from proxy.upstream.api import (
    FILTERS_APPLIED,
    BlobDownload,
    Kind,
    ReferrersPage,
    TagPage,
    Written,
)
from proxy.upstream.challenge import Challenge, bearer_challenge, parse_challenges, repository_scope
from proxy.upstream.circuit import Attempt, CircuitBreaker, CircuitOpen
from proxy.upstream.egress import EgressPolicy, EgressRefused

MAX_TOKEN_RESPONSE = 1024 * 1024
MAX_ERROR_BODY = 64 * 1024
MAX_REDIRECTS = 10
BLOB_CHUNK = 1024 * 1024
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
log = logging.getLogger(__name__)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# A token is refreshed this long before it expires, so no request carries a dying token.
TOKEN_EXPIRY_MARGIN = 15.0

_NOT_FOUND: dict[Kind, type[RegistryError]] = {
    "manifest": ManifestUnknown,
    "blob": BlobUnknown,
    "tags": NameUnknown,
    "upload": BlobUploadUnknown,
    "referrers": NameUnknown,
    "ping": NameUnknown,
}
# Upstream OCI error codes passed through to the client on a 4xx (push validation etc.),
# each with the spec's message: the upstream's own message and detail may name hosts,
# paths or internals, so they go to the log, not to the client.
_PASS_THROUGH_CODES: dict[str, str] = {
    "BLOB_UNKNOWN": "blob unknown to registry",
    "BLOB_UPLOAD_INVALID": "blob upload invalid",
    "BLOB_UPLOAD_UNKNOWN": "blob upload unknown to registry",
    "DIGEST_INVALID": "provided digest did not match uploaded content",
    "MANIFEST_BLOB_UNKNOWN": "manifest references a manifest or blob unknown to registry",
    "MANIFEST_INVALID": "manifest invalid",
    "MANIFEST_UNKNOWN": "manifest unknown to registry",
    "NAME_INVALID": "invalid repository name",
    "NAME_UNKNOWN": "repository name not known to registry",
    "SIZE_INVALID": "provided length did not match content length",
    "TAG_INVALID": "manifest tag did not match URI",
    "UNSUPPORTED": "the operation is unsupported",
    "RANGE_INVALID": "invalid content range",
}


class UpstreamObserver(Protocol):
    """Receives what the upstream client sees, for metrics."""

    def observe_upstream(
        self, upstream: str, method: str, status: int | None, seconds: float
    ) -> None:
        """One upstream exchange finished (status None: no response)."""

    def observe_ratelimit(self, upstream: str, remaining_header: str | None) -> None:
        """The upstream sent Docker Hub's `ratelimit-remaining` header."""

    def observe_token_failure(self, upstream: str, reason: str) -> None:
        """A token fetch from the upstream's token service failed (`reason` is bounded)."""


class PassThroughError(RegistryError):
    """An upstream 4xx with a standard OCI code, relayed to the client as the upstream said."""

    def __init__(self, code: str, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message, detail=detail)
        self.code = code
        self.status = status


class TokenFailure(Exception):
    """A token fetch failed: the client's error, a bounded reason for the metric, and what
    it says about the upstream's health (True: it answered, False: it is failing, None:
    nothing, e.g. a realm the gate refused to contact)."""

    def __init__(self, reason: str, healthy: bool | None, error: RegistryError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.healthy = healthy
        self.error = error


@dataclass(slots=True)
class _ScopeLock:
    """Serialises token fetches for one scope; `users` counts holders and waiters."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    expires_at: float


def _token_ttu(_key: str, token: _Token, now: float) -> float:
    return token.expires_at


def map_failure(
    upstream: str, status: int, kind: Kind, headers: Mapping[str, str], body: bytes
) -> RegistryError:
    """The one table mapping an upstream answer that is not a success to an OCI error."""
    if status == 404:
        return _NOT_FOUND[kind](f"not found on upstream {upstream}")
    if status in (401, 403):
        return Denied(f"upstream {upstream} refused access")
    if status == 429:
        retry_after = headers.get("Retry-After", "60")
        return TooManyRequests(
            f"upstream {upstream} is rate-limiting the gate; retry later",
            headers={"Retry-After": retry_after},
        )
    if status == 416:
        return PassThroughError("RANGE_INVALID", 416, f"upstream {upstream}: range invalid")
    if 400 <= status < 500:
        code, message = _oci_error(body)
        if code is not None and code in _PASS_THROUGH_CODES:
            log.info("upstream %s answered %d %s: %.500s", upstream, status, code, message)
            standard = _PASS_THROUGH_CODES[code]
            return PassThroughError(code, status, f"upstream {upstream}: {standard}")
        return UpstreamUnavailable(f"upstream {upstream} answered {status}")
    if status == 504:
        return UpstreamTimeout(f"upstream {upstream} timed out (504)")
    return UpstreamUnavailable(f"upstream {upstream} failed with status {status}")


def _oci_error(body: bytes) -> tuple[str | None, str]:
    try:
        document = json.loads(body)
        first = document["errors"][0]
        return str(first["code"]), str(first.get("message", ""))[:500]
    # RecursionError: a deeply nested body (`[[[[...`) from a hostile upstream.
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        return None, ""


def _ssl_context(settings: UpstreamSettings) -> ssl.SSLContext | bool:
    if settings.insecure:
        return False
    if settings.ca_file is not None:
        return ssl.create_default_context(cafile=str(settings.ca_file))
    return True


class UpstreamClient:
    """Talks to one upstream registry on behalf of the gate."""

    def __init__(
        self,
        settings: UpstreamSettings,
        observer: UpstreamObserver | None = None,
        *,
        user_agent: str = "registry-gate",
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.registry
        self.base = URL(settings.url)
        self.egress = EgressPolicy(
            settings.registry,
            settings.url,
            redirect_hosts=settings.allowed_redirect_hosts,
            realm_hosts=settings.allowed_realm_hosts,
        )
        self._observer = observer
        self._user_agent = user_agent
        self._password = settings.password()
        self._tokens: TLRUCache[str, _Token] = TLRUCache(maxsize=4096, ttu=_token_ttu)
        self._token_locks: dict[str, _ScopeLock] = {}
        self._challenge: Challenge | None = None
        self._session: aiohttp.ClientSession | None = None
        self.breaker = breaker or CircuitBreaker()

    async def start(self) -> None:
        """Open the connection pool."""
        timeouts = self.settings.timeouts
        connector = aiohttp.TCPConnector(
            limit=64, ssl=_ssl_context(self.settings), ttl_dns_cache=60
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=timeouts.connect, sock_read=timeouts.read
            ),
            auto_decompress=False,
            trust_env=False,
            # No cookies: a cookie an upstream or a redirect target sets is a credential
            # the gate would otherwise hand to whatever host its domain matches.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Larger socket reads for blob bodies (fewer, bigger chunks per fill).
            read_bufsize=1024 * 1024,
            headers={"User-Agent": self._user_agent},
        )

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled HTTP session (started)."""
        if self._session is None:
            raise RuntimeError(f"upstream client {self.name} used before start()")
        return self._session

    def _basic(self) -> str | None:
        if self.settings.username is None:
            return None
        raw = f"{self.settings.username}:{self._password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    # --- the token dance -------------------------------------------------------------

    async def _authorization(self, scope: str | None, refresh: bool = False) -> str | None:
        """The `Authorization` for a request to the upstream itself (never another host)."""
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic()
        if challenge.scheme != "bearer" or scope is None:
            return None
        cached = self._tokens.get(scope)
        if cached is not None and not refresh:
            return f"Bearer {cached.value}"
        slot = self._token_locks.get(scope)
        if slot is None:
            slot = self._token_locks[scope] = _ScopeLock()
        slot.users += 1
        try:
            async with slot.lock:
                cached = self._tokens.get(scope)
                if cached is not None and not refresh:
                    return f"Bearer {cached.value}"
                token = await self._fetch_token(challenge, scope)
                self._tokens[scope] = token
                return f"Bearer {token.value}"
        except TokenFailure:
            # Nothing of a failed dance outlives this request: the next one asks the
            # upstream for its challenge again instead of reusing one that failed.
            if self._challenge is challenge:
                self._challenge = None
            raise
        finally:
            # A lock per scope lives only while someone holds or waits for it, so client
            # requests for ever new repository names do not grow this map.
            slot.users -= 1
            if slot.users == 0:
                del self._token_locks[scope]

    async def _fetch_token(self, challenge: Challenge, scope: str) -> _Token:
        realm = challenge.realm
        if not realm:
            raise TokenFailure(
                "realm_refused",
                None,
                UpstreamUnavailable(f"upstream {self.name} sent a Bearer challenge without realm"),
            )
        try:
            await self.egress.check_realm(realm)
        except EgressRefused as exc:
            # The host goes to the log only (as the cause): a client learns which
            # upstream, not where it pointed.
            raise TokenFailure(
                "realm_refused",
                None,
                UpstreamUnavailable(
                    f"upstream {self.name} sent a token realm the gate will not use"
                ),
            ) from exc
        query: dict[str, str] = {"scope": scope}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        headers = {"Accept": "application/json"}
        basic = self._basic()
        if basic is not None:
            # Only ever to a realm check_realm approved for this upstream's credentials.
            headers["Authorization"] = basic
            query["account"] = self.settings.username or ""
        started = time.monotonic()
        service = f"token service of upstream {self.name}"
        try:
            async with self.session.get(
                realm, params=query, headers=headers, allow_redirects=False
            ) as response:
                self._observe("GET", response.status, started)
                if response.status in (401, 403):
                    raise TokenFailure(
                        "credentials_refused",
                        True,
                        Denied(f"{service} refused the credentials"),
                    )
                if response.status != 200:
                    raise TokenFailure(
                        "error_status",
                        response.status < 500,
                        UpstreamUnavailable(f"{service} answered {response.status}"),
                    )
                body = await _read_capped(response, MAX_TOKEN_RESPONSE, self.name)
        except TimeoutError as exc:
            # Before ClientError: aiohttp's read timeouts are both.
            self._observe("GET", None, started)
            raise TokenFailure("timeout", False, UpstreamTimeout(f"{service} timed out")) from exc
        except aiohttp.ClientError as exc:
            self._observe("GET", None, started)
            raise TokenFailure(
                "unreachable", False, UpstreamUnavailable(f"{service} failed")
            ) from exc
        except UpstreamTimeout as exc:
            raise TokenFailure("timeout", False, UpstreamTimeout(f"{service} timed out")) from exc
        except UpstreamUnavailable as exc:
            raise TokenFailure(
                "invalid_response", False, UpstreamUnavailable(f"{service} failed")
            ) from exc
        try:
            document = json.loads(body)
            value = str(document.get("token") or document["access_token"])
            expires_in = max(60.0, float(document.get("expires_in", 60)))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise TokenFailure(
                "invalid_response",
                False,
                UpstreamUnavailable(f"{service} sent an invalid response"),
            ) from exc
        return _Token(value, time.monotonic() + expires_in - TOKEN_EXPIRY_MARGIN)

    def _learn_challenge(self, headers: Mapping[str, str]) -> bool:
        """Remember the upstream's challenge; True when the response carried one."""
        header = headers.get("WWW-Authenticate", "")
        challenge = bearer_challenge(header)
        if challenge is None:
            challenges = parse_challenges(header)
            challenge = challenges[0] if challenges else None
        if challenge is None:
            return False
        self._challenge = challenge
        return True

    async def ensure_challenge(self) -> None:
        """Learn the upstream's challenge up front (before a body that cannot be replayed)."""
        if self._challenge is not None:
            return
        async with await self.request("GET", "/v2/", kind="ping") as response:
            if response.status == 401:
                self._learn_challenge(response.headers)

    # --- requests --------------------------------------------------------------------

    def _observe(self, method: str, status: int | None, started: float) -> None:
        if self._observer is not None:
            self._observer.observe_upstream(self.name, method, status, time.monotonic() - started)

    def _note_ratelimit(self, headers: Mapping[str, str]) -> None:
        value = headers.get("ratelimit-remaining")
        if value and self._observer is not None:
            self._observer.observe_ratelimit(self.name, value)

    async def request(
        self,
        method: str,
        path: str,
        *,
        kind: Kind,
        repository: str | None = None,
        actions: tuple[str, ...] = ("pull",),
        query: Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | CIMultiDict[str] | None = None,
        data: bytes | AsyncIterable[bytes] | None = None,
        follow_redirects: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send one request, authenticating as needed; the caller releases the response.

        The response is returned whatever its status; `raise_for_status` maps failures.
        Connection failures and timeouts raise the gate's upstream errors here.
        """
        scope = repository_scope(repository, actions) if repository else None
        url = self.base.with_path(path, encoded=True).with_query(list(query))
        replayable = data is None or isinstance(data, bytes)
        if not replayable and self._challenge is None:
            await self.ensure_challenge()
        response = await self._send(method, url, scope, headers, data)
        # One retry with a fresh token: the first try may have had none, or one whose
        # scope or lifetime no longer fits.
        if response.status == 401 and replayable and self._learn_challenge(response.headers):
            response.release()
            response = await self._send(method, url, scope, headers, data, refresh=True)
        if follow_redirects and response.status in _REDIRECTS:
            response = await self._follow(method, response, headers)
        return response

    async def _send(
        self,
        method: str,
        url: URL,
        scope: str | None,
        headers: Mapping[str, str] | CIMultiDict[str] | None,
        data: bytes | AsyncIterable[bytes] | None,
        *,
        refresh: bool = False,
    ) -> aiohttp.ClientResponse:
        outgoing: CIMultiDict[str] = CIMultiDict(headers or {})
        outgoing.setdefault("Accept-Encoding", "identity")
        try:
            with self.breaker.attempt() as attempt:
                return await self._send_attempt(
                    attempt, method, url, scope, outgoing, data, refresh=refresh
                )
        except CircuitOpen:
            raise UpstreamUnavailable(
                f"upstream {self.name} is failing; requests are paused (circuit open)"
            ) from None

    async def _send_attempt(
        self,
        attempt: Attempt,
        method: str,
        url: URL,
        scope: str | None,
        outgoing: CIMultiDict[str],
        data: bytes | AsyncIterable[bytes] | None,
        *,
        refresh: bool,
    ) -> aiohttp.ClientResponse:
        """One request under the breaker: every outcome, the token dance's too, settles
        `attempt` (an exception left unsettled counts as a failure)."""
        try:
            authorization = await self._authorization(scope, refresh=refresh)
        except TokenFailure as failure:
            self._token_failed(failure, attempt)
            raise failure.error from failure.__cause__
        if authorization is not None:
            outgoing["Authorization"] = authorization
        started = time.monotonic()
        try:
            response = await self.session.request(
                method, url, headers=outgoing, data=data, allow_redirects=False
            )
        except TimeoutError as exc:
            attempt.failure()
            self._observe(method, None, started)
            raise UpstreamTimeout(f"upstream {self.name} timed out") from exc
        except aiohttp.ClientError as exc:
            attempt.failure()
            self._observe(method, None, started)
            raise UpstreamUnavailable(f"upstream {self.name} is unreachable") from exc
        if response.status >= 500:
            attempt.failure()
        elif response.status == 401:
            # A challenge is half an exchange: the token fetch that follows decides, so a
            # registry that answers while its token service is down still opens the
            # circuit (a 401 counted as success would reset the count every time).
            attempt.release()
        else:
            attempt.success()
        self._observe(method, response.status, started)
        self._note_ratelimit(response.headers)
        return response

    def _token_failed(self, failure: TokenFailure, attempt: Attempt) -> None:
        """Count a failed token fetch, and let it tell the breaker what it says."""
        if failure.healthy is None:
            attempt.release()
        elif failure.healthy:
            attempt.success()
        else:
            attempt.failure()
        # The cause (a connection error naming the realm's host) goes to the log only.
        log.warning(
            "upstream %s: token fetch failed (%s): %s: %r",
            self.name,
            failure.reason,
            failure.error.message,
            failure.__cause__,
        )
        if self._observer is not None:
            self._observer.observe_token_failure(self.name, failure.reason)

    async def _follow(
        self,
        method: str,
        response: aiohttp.ClientResponse,
        headers: Mapping[str, str] | CIMultiDict[str] | None,
    ) -> aiohttp.ClientResponse:
        """Follow redirects to allowed hosts; `Authorization` never crosses hosts."""
        for _hop in range(MAX_REDIRECTS):
            location = response.headers.get("Location")
            origin = response.url
            response.release()
            if not location:
                raise UpstreamUnavailable(f"upstream {self.name} redirected without Location")
            target = origin.join(URL(location))
            try:
                await self.egress.check_redirect(str(target))
            except EgressRefused as exc:
                log.warning("upstream %s: redirect refused: %s", self.name, exc)
                raise UpstreamUnavailable(
                    f"upstream {self.name} redirected to a host the gate will not use"
                ) from exc
            outgoing: CIMultiDict[str] = CIMultiDict(headers or {})
            outgoing.setdefault("Accept-Encoding", "identity")
            if target.host == self.base.host and target.port == self.base.port:
                scope_auth = response.request_info.headers.get("Authorization")
                if scope_auth:
                    outgoing["Authorization"] = scope_auth
            started = time.monotonic()
            try:
                response = await self.session.request(
                    method, target, headers=outgoing, allow_redirects=False
                )
            except TimeoutError as exc:
                self._observe(method, None, started)
                raise UpstreamTimeout(f"redirect target of upstream {self.name} timed out") from exc
            except aiohttp.ClientError as exc:
                self._observe(method, None, started)
                raise UpstreamUnavailable(
                    f"redirect target of upstream {self.name} is unreachable"
                ) from exc
            self._observe(method, response.status, started)
            if response.status not in _REDIRECTS:
                return response
        response.release()
        raise UpstreamUnavailable(
            f"upstream {self.name} redirected more than {MAX_REDIRECTS} times"
        )

    @contextlib.asynccontextmanager
    async def manifest_deadline(self) -> AsyncIterator[None]:
        """`timeouts.total_manifest`: the most one manifest fetch may take, token fetch,
        retries, redirects and body included (the per-read timeout alone lets an upstream
        that drips bytes hold a pull forever). Past it: UpstreamTimeout, counted by the
        circuit breaker like any timeout."""
        seconds = self.settings.timeouts.total_manifest
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError as exc:
            self.breaker.record_failure()
            raise UpstreamTimeout(
                f"upstream {self.name} did not deliver a manifest within {seconds:g} s"
            ) from exc

    async def probe(
        self,
        method: str,
        path: str,
        *,
        kind: Kind,
        repository: str,
        query: Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | CIMultiDict[str] | None = None,
    ) -> bool:
        """Whether the upstream has what `path` names: False on 404, raises on failures."""
        response = await self.request(
            method, path, kind=kind, repository=repository, query=query, headers=headers
        )
        if response.status == 404:
            response.release()
            return False
        await self.raise_for_status(response, kind)
        response.release()
        return True

    async def get_body(
        self,
        path: str,
        *,
        kind: Kind,
        repository: str,
        limit: int,
        query: Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | CIMultiDict[str] | None = None,
    ) -> tuple[Mapping[str, str], bytes]:
        """GET a small document (manifest, tag list): its headers and its capped body."""
        response = await self.request(
            "GET", path, kind=kind, repository=repository, query=query, headers=headers
        )
        await self.raise_for_status(response, kind)
        try:
            return response.headers, await read_capped(response, limit, self.name)
        finally:
            response.release()

    async def raise_for_status(self, response: aiohttp.ClientResponse, kind: Kind) -> None:
        """Raise the mapped OCI error (and release) unless the response is a success."""
        if response.status < 400:
            return
        try:
            body = await _read_capped(response, MAX_ERROR_BODY, self.name, truncate=True)
        except RegistryError:
            body = b""
        finally:
            response.release()
        raise map_failure(self.name, response.status, kind, response.headers, body)

    # --- the registry API in OCI terms (proxy.upstream.api.Registry) --------------------

    async def head_manifest(
        self, repository: Repository, reference: str, accept: Sequence[str]
    ) -> Mapping[str, str]:
        response = await self.request(
            "HEAD",
            _v2(repository, "manifests", reference),
            kind="manifest",
            repository=repository.path,
            headers=_accept_headers(accept),
        )
        await self.raise_for_status(response, "manifest")
        response.release()
        return response.headers

    async def get_manifest(
        self, repository: Repository, reference: str, accept: Sequence[str], limit: int
    ) -> tuple[Mapping[str, str], bytes]:
        return await self.get_body(
            _v2(repository, "manifests", reference),
            kind="manifest",
            repository=repository.path,
            limit=limit,
            headers=_accept_headers(accept),
        )

    async def manifest_exists(
        self, repository: Repository, reference: str, accept: Sequence[str]
    ) -> bool:
        return await self.probe(
            "HEAD",
            _v2(repository, "manifests", reference),
            kind="manifest",
            repository=repository.path,
            headers=_accept_headers(accept),
        )

    async def _blob_response(
        self, repository: Repository, digest: str, method: str
    ) -> aiohttp.ClientResponse:
        response = await self.request(
            method,
            _v2(repository, "blobs", digest),
            kind="blob",
            repository=repository.path,
            follow_redirects=True,
        )
        await self.raise_for_status(response, "blob")
        return response

    async def head_blob(self, repository: Repository, digest: str) -> int | None:
        response = await self._blob_response(repository, digest, "HEAD")
        response.release()
        length = response.headers.get("Content-Length", "")
        return int(length) if length.isdigit() else None

    @contextlib.asynccontextmanager
    async def open_blob(self, repository: Repository, digest: str) -> AsyncIterator[BlobDownload]:
        response = await self._blob_response(repository, digest, "GET")
        try:
            yield BlobDownload(response.content_length, self._relay(response))
        finally:
            response.release()

    async def _relay(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_chunked(BLOB_CHUNK):
                yield chunk
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {self.name} stalled while sending a blob") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream {self.name} failed while sending a blob") from exc
        finally:
            response.release()

    async def repository_exists(self, repository: Repository) -> bool:
        return await self.probe(
            "GET",
            _v2(repository, "tags", "list"),
            kind="tags",
            repository=repository.path,
            query=[("n", "1")],
        )

    async def tag_page(
        self, repository: Repository, query: Sequence[tuple[str, str]], cap: int
    ) -> TagPage:
        response = await self.request(
            "GET",
            _v2(repository, "tags", "list"),
            kind="tags",
            repository=repository.path,
            query=query,
        )
        await self.raise_for_status(response, "tags")
        try:
            body = await self._read_page(response, cap)
            return TagPage(body, None if body is None else self._next_query(response))
        finally:
            response.release()

    async def _read_page(self, response: aiohttp.ClientResponse, cap: int) -> bytearray | None:
        """The page's body, or None as soon as it is known to exceed `cap` bytes."""
        if response.content_length is not None and response.content_length > cap:
            return None
        body = bytearray()
        try:
            async for chunk in response.content.iter_chunked(64 * 1024):
                if len(body) + len(chunk) > cap:
                    return None
                body += chunk
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {self.name} stalled while sending a tag list") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(
                f"upstream {self.name} failed while sending a tag list"
            ) from exc
        return body

    def _next_query(self, response: aiohttp.ClientResponse) -> list[tuple[str, str]] | None:
        """The query of the upstream's next page (tag lists, referrers), if it announced
        one; only its query is used, always against the same path of the upstream itself:
        a `Link` cannot send the gate (and its credentials) elsewhere."""
        try:
            link = response.links.get("next")
        except ValueError as exc:
            raise UpstreamUnavailable(f"upstream {self.name} sent an invalid Link header") from exc
        target = None if link is None else link.get("url")
        if not isinstance(target, URL):
            return None
        pairs = [(key, value) for key, value in target.query.items()]
        return pairs or None

    async def referrers(
        self,
        repository: Repository,
        digest: str,
        query: Sequence[tuple[str, str]],
        budget: int,
    ) -> ReferrersPage | None:
        response = await self.request(
            "GET",
            _v2(repository, "referrers", digest),
            kind="referrers",
            repository=repository.path,
            query=list(query),
            headers={"Accept": INDEX_TYPE},
        )
        if response.status == 404:
            # No referrers API (Distribution 2.8 answers 404 to the path).
            response.release()
            return None
        await self.raise_for_status(response, "referrers")
        try:
            body = await _read_capped(response, budget, self.name)
            return ReferrersPage(
                body,
                response.headers.get("Content-Type"),
                response.headers.getall(FILTERS_APPLIED, []),
                self._next_query(response),
            )
        finally:
            response.release()

    async def forward(
        self,
        method: str,
        repository: Repository,
        endpoint: str,
        *,
        kind: Kind,
        actions: tuple[str, ...],
        query: Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        body: bytes | AsyncIterable[bytes] | None = None,
    ) -> Written:
        return await self._write(
            method,
            _v2(repository, endpoint),
            kind=kind,
            repository=repository,
            actions=actions,
            query=query,
            headers=headers,
            body=body,
        )

    async def forward_session(
        self,
        method: str,
        repository: Repository,
        session_path: str,
        *,
        query: Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        body: bytes | AsyncIterable[bytes] | None = None,
        check: bool = True,
    ) -> Written:
        return await self._write(
            method,
            session_path,
            kind="upload",
            repository=repository,
            actions=("pull", "push"),
            query=query,
            headers=headers,
            body=body,
            check=check,
        )

    async def _write(
        self,
        method: str,
        path: str,
        *,
        kind: Kind,
        repository: Repository,
        actions: tuple[str, ...],
        query: Iterable[tuple[str, str]],
        headers: Mapping[str, str] | None,
        body: bytes | AsyncIterable[bytes] | None,
        check: bool = True,
    ) -> Written:
        response = await self.request(
            method,
            path,
            kind=kind,
            repository=repository.path,
            actions=actions,
            query=query,
            headers=CIMultiDict(headers or {}),
            data=body,
        )
        if check:
            await self.raise_for_status(response, kind)
        response.release()
        return Written(response.status, response.headers)


def _v2(repository: Repository, *segments: str) -> str:
    """The upstream path of an endpoint of `repository` (names and references are
    validated before they get here: no segment can escape the repository)."""
    return "/".join((f"/v2/{repository.path}", *segments))


def _accept_headers(accept: Sequence[str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for line in accept:
        headers.add("Accept", line)
    return headers


async def _read_capped(
    response: aiohttp.ClientResponse, limit: int, upstream: str, *, truncate: bool = False
) -> bytes:
    """Read a body up to `limit` bytes; over the cap is an upstream failure (or cut).
    Failures name the upstream by its registry name, never by its address."""
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in response.content.iter_chunked(64 * 1024):
            total += len(chunk)
            if total > limit:
                if truncate:
                    chunks.append(chunk[: limit - (total - len(chunk))])
                    break
                raise UpstreamUnavailable(f"upstream {upstream} sent more than {limit} bytes")
            chunks.append(chunk)
    except TimeoutError as exc:
        raise UpstreamTimeout(f"upstream {upstream} stalled while sending a body") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(
            f"upstream {upstream}: connection failed while sending a body"
        ) from exc
    return b"".join(chunks)


async def read_capped(response: aiohttp.ClientResponse, limit: int, upstream: str) -> bytes:
    """Read a whole body, failing with 502 past `limit` bytes (manifests, JSON)."""
    return await _read_capped(response, limit, upstream)
