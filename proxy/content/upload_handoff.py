"""Upload requests handed to the replica that owns their session (several replicas).

Owns the hop between replicas for a blob upload: the request one replica sends another
(`PATCH|PUT|GET|DELETE /_replica/uploads/<upload id>?<what the owner needs>`), how it
is signed, streamed and bounded, and how the owner's answer comes back.

Why a hop at all: the gate closes a session upstream only once its own SHA-256 of every
byte passed into it matches the client's digest, and that running hash lives in the
process that passed the bytes (`proxy/content/upload_sessions.py`; `hashlib` state cannot
be exported). So each upload id names its owner (`proxy/auth/upload_tokens.py`), and a
replica receiving a request for a session another replica owns, once bytes went in,
relays it to the owner. Before any byte (the id's offset is 0) there is nothing to
verify yet: the receiving replica continues the session itself and names itself owner
in the ids it hands out from then on (so a session survives the death of the replica
that started it, until its first byte).

Where authentication, policy and audit happen: on the receiving replica, once. It is
the one holding the client's connection, credentials and address: its middleware
authenticates the request, its gatekeeper decides policy (and cancels the session if a
refusal ends the upload), and its middleware audits a refused write, exactly as for a
request it handles itself. The owner runs only the session step (the push module's
`continue_upload`), trusting the hop because it is signed with the replica key
(`proxy.auth.replica_auth`, derived from `upload_secret`): the signature covers the
method, the path (the upload id) and the whole query, which carries everything the owner
acts on (repository, the client's name and `ns` for `Location`, `digest`, the chunk's
`Content-Range` and `Content-Type`); only the body is not signed, and the body is what
the owner hashes and checks against the client's digest anyway. The endpoint lives
outside `/v2/`, so the owner's middleware neither authenticates a client nor audits the
hop (its access log has a line for it, with the relaying request's id as the client
request id). Doing it on the owner instead would mean passing the client's credentials
between replicas and deciding twice (with two policy snapshots, possibly different
during a reload).

What flows: the client's body is streamed (never held: memory stays flat however large
a PATCH), still held to `uploads.min_rate` here, as the owner holds the hop to it too;
a client that fails mid-body breaks the hop's body, so the owner sees a cut body and
cancels the session upstream, as it would for its own client (and when the client failed
before its first byte, the request never left: the relaying replica cancels it). The
owner's answer is small (upload answers have no content beyond an OCI error document;
it is read up to 64 KiB) and relayed with its status, the OCI headers and its
`Location`, which the owner built in the client's addressing form (the gate's own,
never a peer URL).

The owner marks every answer it gives as owner (`X-Gate-Upload-Owner`). An answer
without the mark (a replica draining or restarted on that address, one that refuses
the signature, a 500) or no answer (connect refused or slower than 3 s, the answer
later than the bound below, the connection cut) means the owner is gone with its
hash: the receiving replica cancels the session upstream and answers 404
`BLOB_UPLOAD_UNKNOWN`, which makes clients push that blob again (a DELETE is then done
here). The wait for the answer after the body is bounded by three upstream exchanges
(the owner's last PATCH, its PUT, a cancel).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.auth.replica_auth import ReplicaSigner, peer_session
from proxy.auth.upload_tokens import UploadOwner
from proxy.content.upload_body import ClientBody, ClientFailure
from proxy.errors import BlobUploadUnknown, RegistryError
from proxy.observability.logging_setup import current_request_id
from proxy.observability.metrics import Metrics
from proxy.settings import Settings, UploadSettings
from proxy.upstream.client import PassThroughError

log = logging.getLogger(__name__)

HOP_PATH = "/_replica/uploads/{token}"
# The owner's mark on every answer it gives as the session's owner (value: its replica id).
OWNER_HEADER = "X-Gate-Upload-Owner"
HOP_CONNECT_TIMEOUT = 3.0
# Upload answers carry at most an OCI error document.
MAX_ANSWER = 64 * 1024
# What of the owner's answer reaches the client (beside status, body and Location).
_RELAYED = (
    "Docker-Content-Digest",
    "Docker-Upload-UUID",
    "Range",
    "OCI-Chunk-Min-Length",
    "Retry-After",
)
_QUERY_KEYS = frozenset({"registry", "repository", "name", "ns", "digest", "range", "type"})


class OwnerGone(Exception):
    """The owner of a session did not answer as its owner: its running hash is lost."""


class ClientBodyFailed(Exception):
    """The client's body failed while it was relayed (too slow, or the client went);
    `reached_owner`: whether any of it was sent (else the owner never saw the request,
    and its session is as the upload id says)."""

    def __init__(self, failure: ClientFailure, reached_owner: bool) -> None:
        super().__init__(failure)
        self.failure = failure
        self.reached_owner = reached_owner


@dataclass(frozen=True, slots=True)
class HopRequest:
    """What the owner needs besides the upload id and the body (all of it signed)."""

    registry: str
    repository: str
    name: str  # how the client addressed the repository (for `Location`)
    ns: str | None = None
    digest: str | None = None
    content_range: str | None = None
    content_type: str | None = None

    def query(self) -> str:
        pairs = [("registry", self.registry), ("repository", self.repository)]
        pairs.append(("name", self.name))
        optional = (
            ("ns", self.ns),
            ("digest", self.digest),
            ("range", self.content_range),
            ("type", self.content_type),
        )
        pairs += [(key, value) for key, value in optional if value is not None]
        return urlencode(pairs)

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> HopRequest:
        """The hop's fields from its (verified) query; BLOB_UPLOAD_UNKNOWN if malformed."""
        if not {"registry", "repository", "name"} <= query.keys() or query.keys() - _QUERY_KEYS:
            raise BlobUploadUnknown("malformed replica upload request")
        return cls(
            query["registry"],
            query["repository"],
            query["name"],
            query.get("ns"),
            query.get("digest"),
            query.get("range"),
            query.get("type"),
        )

    def headers(self) -> dict[str, str]:
        """The client's request headers the session step reads."""
        headers = {}
        if self.content_range is not None:
            headers["Content-Range"] = self.content_range
        if self.content_type is not None:
            headers["Content-Type"] = self.content_type
        return headers


@dataclass(slots=True)
class Handed:
    """The owner's successful answer: status, the headers to relay, `Location` included."""

    status: int
    headers: CIMultiDict[str]


class _NoHash:
    """The relaying replica counts and paces the body; the owner hashes it."""

    def update(self, data: bytes, /) -> None:
        return None


class _RelayedBody:
    """The client's body for the hop: paced like any upload body; a failure of the client
    raises, which cuts the hop's body instead of ending it (the owner must not take a
    cut body for a whole one)."""

    def __init__(self, source: AsyncIterator[bytes], uploads: UploadSettings) -> None:
        self._body = ClientBody(
            source, _NoHash(), min_rate=uploads.min_rate, window=uploads.min_rate_window
        )
        self.complete = False
        # The request goes out with its first chunk: before that, the owner saw nothing.
        self.started = False

    @property
    def failure(self) -> ClientFailure | None:
        return self._body.failure

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            self.started = True
            yield chunk
        if self._body.failure is not None:
            raise ClientBodyFailed(self._body.failure, self.started)
        self.complete = True


class UploadHandoff:
    """Sends upload requests to the replica owning their session, and relays its answer."""

    def __init__(
        self,
        signer: ReplicaSigner,
        metrics: Metrics | None,
        uploads: UploadSettings,
        *,
        read_timeout: float,
    ) -> None:
        self.signer = signer
        self._metrics = metrics
        self._uploads = uploads
        # No total: a large body at the minimum rate takes as long as it takes (the rate
        # rule bounds it); the answer after the body is bounded by `read_timeout`.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=HOP_CONNECT_TIMEOUT, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None) -> UploadHandoff | None:
        """The service for `settings` (None without `redis`: one process owns every id)."""
        if settings.redis is None:
            return None
        assert settings.upload_secret is not None  # required with redis (settings)
        exchange = max(u.timeouts.connect + u.timeouts.read for u in settings.upstreams)
        signer = ReplicaSigner(settings.upload_secret.encode())
        return cls(signer, metrics, settings.uploads, read_timeout=3 * exchange)

    async def start(self) -> None:
        self._session = peer_session(self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.upload_forwards.labels(outcome).inc()

    async def forward(
        self,
        owner: UploadOwner,
        method: str,
        token: str,
        hop: HopRequest,
        body: AsyncIterator[bytes] | None,
    ) -> Handed:
        """Send the request to `owner` and return its answer.

        Raises the owner's error as the client's (`RegistryError`), `ClientBodyFailed`
        when the client's body failed, `OwnerGone` when the owner did not answer as owner.
        """
        assert self._session is not None, "UploadHandoff.start() was not called"
        target = f"{HOP_PATH.format(token=token)}?{hop.query()}"
        headers = self.signer.sign(method, target)
        request_id = current_request_id()
        if request_id is not None:
            headers["X-Request-Id"] = request_id
        relay = _RelayedBody(body, self._uploads) if body is not None else None
        try:
            async with self._session.request(
                method,
                URL(owner.url + target, encoded=True),
                headers=headers,
                data=relay,
                allow_redirects=False,
            ) as response:
                if response.headers.get(OWNER_HEADER) != owner.replica:
                    raise OwnerGone(f"answered {response.status} without owning the upload")
                status, answer = response.status, response.headers
                content = await _bounded(response)
        except OwnerGone as exc:
            self._gone(owner, exc)
            raise
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if relay is not None and relay.failure is not None:
                self.count("client_failed")
                raise ClientBodyFailed(relay.failure, relay.started) from exc
            gone = OwnerGone(repr(exc))
            self._gone(owner, gone)
            raise gone from exc
        self.count("relayed")
        relayed: CIMultiDict[str] = CIMultiDict()
        for name in _RELAYED:
            if name in answer:
                relayed[name] = answer[name]
        location = answer.get("Location")
        if location is not None and location.startswith("/v2/"):
            relayed["Location"] = location
        if status >= 400:
            error = _error(status, content)
            error.headers.update(relayed)
            if relay is not None and not relay.complete:
                # The client's body was not read to its end: this connection is done.
                error.headers["Connection"] = "close"
            raise error
        return Handed(status, relayed)

    def _gone(self, owner: UploadOwner, error: OwnerGone) -> None:
        self.count("owner_gone")
        log.warning(
            "the replica %s owning an upload session did not answer as its owner: %s",
            owner.replica,
            error,
        )


async def _bounded(response: aiohttp.ClientResponse) -> bytes:
    data = bytearray()
    async for chunk in response.content.iter_any():
        data += chunk
        if len(data) > MAX_ANSWER:
            raise OwnerGone("its answer was larger than an upload answer can be")
    return bytes(data)


def _error(status: int, content: bytes) -> RegistryError:
    """The owner's OCI error as the client's: its code, message and detail, its status."""
    code, message, detail = "UNKNOWN", f"the upload failed ({status})", None
    try:
        document: Any = json.loads(content)
        first = document["errors"][0]
        code, message = str(first["code"])[:64], str(first["message"])[:1024]
        detail = first.get("detail")
    except (ValueError, TypeError, KeyError, IndexError):
        pass
    return PassThroughError(code, status, message, detail)
