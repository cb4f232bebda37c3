"""Push and delete: forwarding uploads, manifest PUTs and deletes to the addressed upstream.

Uploads stream in both directions (the request body goes upstream chunk by chunk, memory
stays flat), and every `Location` the upstream answers with is rewritten to point at the
gate, in the addressing form the client used, so the client keeps talking to the gate.
Policy has already decided by the time anything here runs.

No upload the gate ends may leave anything upstream. Every body goes upstream as a PATCH
(a PUT's body too, and a monolithic POST's), hashed on the way into the session's running
digest (`proxy/content/upload_sessions.py`); the session is closed with a body-less PUT only when
that digest matches the client's, and cancelled (DELETE) whenever the gate ends the upload
otherwise: wrong or missing digest, a client below the minimum rate or gone mid-body, an
upstream failing mid-body, a session this process cannot verify, or policy refusing a
later request of the upload. Distribution 2.8 keeps the bytes of a session whose PUT
fails its digest check, so the gate never sends one that would.

With several replicas, a request for a session another replica owns (bytes went in
there) is handed to that replica (`proxy/content/upload_handoff.py`, which says where
authentication, policy and audit happen); a request for a session before its first byte
is continued here, whichever replica started it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit

from multidict import CIMultiDict

from proxy.auth.upload_tokens import SealedUpload, UploadOwner, UploadSealer
from proxy.content import referrers
from proxy.content.manifest_checks import MAX_MANIFEST_SIZE
from proxy.content.upload_body import ClientBody, ClientFailure, Hasher
from proxy.content.upload_handoff import (
    ClientBodyFailed,
    HopRequest,
    OwnerGone,
    UploadHandoff,
)
from proxy.content.upload_sessions import SessionKey, UploadLedger, UploadProgress
from proxy.errors import (
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestTooLarge,
    RangeInvalid,
    RegistryError,
    Unsupported,
    UploadTooSlow,
)
from proxy.http.ranges import parse_chunk_range
from proxy.names.references import Repository, is_digest, validate_digest
from proxy.observability.metrics import Metrics
from proxy.settings import UploadSettings
from proxy.storage.redis_mutex import RedisMutexes
from proxy.upstream.api import Kind, Registry, Written
from proxy.upstream.client import PassThroughError

log = logging.getLogger("registry_gate.push")
# Request headers relayed to the upstream on manifest PUTs.
_FORWARDED_REQUEST_HEADERS = ("Content-Type", "Content-Length", "Content-Range")
# On upload PATCHes only the type: the body goes as a stream (chunked), so a client that
# stops early ends it cleanly, and the gate checks the order of chunks itself.
_FORWARDED_UPLOAD_HEADERS = ("Content-Type",)
# Response headers relayed back to the client.
_FORWARDED_RESPONSE_HEADERS = (
    "Docker-Content-Digest",
    "Docker-Upload-UUID",
    "Range",
    "OCI-Chunk-Min-Length",
    "OCI-Subject",
    "Content-Type",
)
# How long shutdown waits for the cancels of uploads cut by it.
CLEANUP_DRAIN_SECONDS = 10.0


@dataclass(slots=True)
class Forwarded:
    """An upstream answer to relay: status, headers (Location rewritten) and a small body."""

    status: int
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""
    upstream_location: str = ""  # the upstream's own `Location`, never relayed


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """How the client addressed the repository, to build `Location` values it can follow."""

    name: str
    ns: str | None

    def url(self, suffix: str, query: Mapping[str, str] | None = None) -> str:
        """A gate URL under this name, keeping `ns` so containerd stays on the mirror."""
        params = dict(query or {})
        if self.ns is not None:
            params["ns"] = self.ns
        text = f"/v2/{self.name}/{suffix}"
        return f"{text}?{urlencode(params)}" if params else text


@dataclass(slots=True)
class _Session:
    """One upstream upload session: where it is, and its latest upstream query (state)."""

    repository: Repository
    address: ClientAddress
    path: str
    params: list[tuple[str, str]]

    @property
    def key(self) -> SessionKey:
        return (self.repository.registry, self.path)

    def move_to(self, upstream_location: str) -> None:
        """Follow the upstream's new `Location` (Distribution renews its state each PATCH)."""
        if upstream_location:
            parts = urlsplit(upstream_location)
            self.path = parts.path
            self.params = parse_qsl(parts.query, keep_blank_values=True)


def _relay_headers(upstream_headers: Mapping[str, str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name in _FORWARDED_RESPONSE_HEADERS:
        if name in upstream_headers:
            headers[name] = upstream_headers[name]
    return headers


def _request_headers(
    incoming: Mapping[str, str], names: tuple[str, ...] = _FORWARDED_REQUEST_HEADERS
) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name in names:
        if name in incoming:
            headers[name] = incoming[name]
    return headers


def _range(offset: int) -> str:
    """The `Range` of an upload holding `offset` bytes (`0-0` when empty, as Distribution)."""
    return f"0-{max(offset - 1, 0)}"


def _check_chunk_order(offset: int, headers: Mapping[str, str]) -> None:
    """416 for a chunk that does not start where the upload ends (the gate knows where)."""
    if "Content-Range" not in headers:
        return
    start, _ = parse_chunk_range(headers["Content-Range"].strip())
    if start != offset:
        raise RangeInvalid(
            f"chunk out of order: it starts at {start}, the upload holds {offset} bytes",
            headers={"Range": _range(offset)},
        )


def _busy(offset: int) -> RangeInvalid:
    """A second request writing to an upload while one is (their order would be a guess)."""
    return RangeInvalid(
        "another request is writing to this upload", headers={"Range": _range(offset)}
    )


class Pusher:
    """Forwards writes for the upstream clients of the gate."""

    def __init__(
        self,
        clients: Mapping[str, Registry],
        sealer: UploadSealer,
        metrics: Metrics,
        uploads: UploadSettings | None = None,
        handoff: UploadHandoff | None = None,
        mutexes: RedisMutexes | None = None,
    ) -> None:
        self.clients = clients
        # With several replicas: where requests for another replica's sessions go.
        self.handoff = handoff
        self.sealer = sealer
        self.metrics = metrics
        self.uploads = uploads or UploadSettings()
        self.ledger = UploadLedger()
        # Cancels started for requests that were themselves cancelled; awaited at shutdown.
        self._cleanups: set[asyncio.Task[None]] = set()
        # With replicas (`mutexes`), one referrers tag update per subject gate-wide.
        self.referrers_fallback = referrers.ReferrersFallback(clients, mutexes)

    def _rewrite_upload_location(
        self, repository: Repository, address: ClientAddress, location: str, offset: int
    ) -> str:
        """Turn the upstream's upload `Location` into a sealed gate URL."""
        parts = urlsplit(location)
        upstream_path = parts.path + (f"?{parts.query}" if parts.query else "")
        token = self.sealer.seal(repository.registry, repository.path, upstream_path, offset)
        return address.url(f"blobs/uploads/{token}")

    def _rewrite_location(
        self,
        repository: Repository,
        address: ClientAddress,
        headers: Mapping[str, str],
        out: CIMultiDict[str],
        offset: int,
    ) -> None:
        location = headers.get("Location")
        if not location:
            return
        path = urlsplit(location).path
        if "/blobs/uploads/" in path:
            out["Location"] = self._rewrite_upload_location(repository, address, location, offset)
        elif "/blobs/" in path:
            out["Location"] = address.url("blobs/" + path.rsplit("/", 1)[1])
        elif "/manifests/" in path:
            out["Location"] = address.url("manifests/" + path.rsplit("/", 1)[1])

    async def _forward(
        self,
        method: str,
        repository: Repository,
        address: ClientAddress,
        endpoint: str,
        *,
        kind: Kind,
        actions: tuple[str, ...],
        query: list[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | AsyncIterable[bytes] | None = None,
    ) -> Forwarded:
        """Forward a write to an endpoint of the repository (`blobs/uploads/`, ...)."""
        written = await self.clients[repository.registry].forward(
            method,
            repository,
            endpoint,
            kind=kind,
            actions=actions,
            query=query or [],
            headers=headers,
            body=body,
        )
        return self._relayed(repository, address, written, 0)

    def _relayed(
        self, repository: Repository, address: ClientAddress, written: Written, offset: int
    ) -> Forwarded:
        out = _relay_headers(written.headers)
        self._rewrite_location(repository, address, written.headers, out, offset)
        out["Content-Length"] = "0"
        return Forwarded(written.status, out, upstream_location=written.headers.get("Location", ""))

    # --- uploads -----------------------------------------------------------------------

    async def start_upload(
        self,
        repository: Repository,
        address: ClientAddress,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: AsyncIterator[bytes] | None,
        mount_from: Repository | None,
    ) -> Forwarded:
        """POST an upload (plain, monolithic `?digest=`, or a cross-repository mount).

        A monolithic POST becomes a session, a PATCH and a body-less PUT upstream, so its
        digest is checked by the gate before the upstream commits anything.
        """
        digest = query.get("digest")
        if digest is not None:
            validate_digest(digest)
        params: list[tuple[str, str]] = []
        if "mount" in query:
            params.append(("mount", query["mount"]))
            # A mount only works within one upstream; from elsewhere it is a new session.
            if mount_from is not None and mount_from.registry == repository.registry:
                params.append(("from", mount_from.path))
        forwarded = await self._forward(
            "POST",
            repository,
            address,
            "blobs/uploads/",
            kind="upload",
            actions=("pull", "push"),
            query=params,
        )
        if forwarded.status != 202 or not forwarded.upstream_location:
            return forwarded  # a mount that worked: no session
        session = self._session(repository, address, forwarded.upstream_location)
        progress = self.ledger.begin(session.key)
        if digest is None:
            return forwarded
        async with progress.lock:
            return await self._complete(session, progress, digest, body, headers)

    async def continue_upload(
        self,
        method: str,
        repository: Repository,
        address: ClientAddress,
        token: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: AsyncIterator[bytes] | None,
        *,
        hop: bool = False,
    ) -> Forwarded:
        """PATCH, PUT, GET (status) or DELETE (cancel) an upload session.

        `hop`: another replica handed this request here as the session's owner.
        """
        sealed = self.sealer.open(token, repository.registry, repository.path)
        owner = self._owner_elsewhere(sealed, hop)
        if owner is not None:
            return await self._hand_off(
                owner, method, repository, address, token, sealed, query, headers, body
            )
        session = self._session(repository, address, sealed.location)
        if method == "DELETE":
            self.ledger.forget(session.key)
            return await self._send(session, "DELETE")
        if method == "GET":
            progress = self.ledger.get(session.key)
            offset = progress.offset if progress is not None else sealed.offset
            forwarded = await self._send(session, "GET", offset=offset)
            if forwarded.status == 204 and "Location" not in forwarded.headers:
                forwarded.headers["Location"] = address.url(f"blobs/uploads/{token}")
            return forwarded
        progress = await self._verifiable(session, sealed)
        if progress.lock.locked():
            raise RangeInvalid(
                "another request is writing to this upload",
                headers={"Range": _range(sealed.offset)},
            )
        async with progress.lock:
            _check_chunk_order(progress.offset, headers)
            if method == "PATCH":
                return await self._append(session, progress, progress.hasher, body, headers)
            return await self._complete(session, progress, query.get("digest"), body, headers)

    def _owner_elsewhere(self, sealed: SealedUpload, hop: bool) -> UploadOwner | None:
        """The replica to hand this session's request to (None: it is continued here)."""
        me = self.sealer.owner
        mine = me is not None and sealed.owner is not None and sealed.owner.replica == me.replica
        if hop:
            if not mine:
                # A hop is sent only to the owner an id names: never handed on again.
                raise BlobUploadUnknown("this replica does not own that upload session")
            return None
        if mine or sealed.owner is None or self.handoff is None or sealed.offset == 0:
            # Nothing passed into the session yet: nothing to verify elsewhere.
            return None
        return sealed.owner

    async def _hand_off(
        self,
        owner: UploadOwner,
        method: str,
        repository: Repository,
        address: ClientAddress,
        token: str,
        sealed: SealedUpload,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: AsyncIterator[bytes] | None,
    ) -> Forwarded:
        """Relay the request to the replica owning the session (its hash is there)."""
        assert self.handoff is not None
        hop = HopRequest(
            repository.registry,
            repository.path,
            address.name,
            address.ns,
            query.get("digest"),
            headers.get("Content-Range"),
            headers.get("Content-Type"),
        )
        try:
            handed = await self.handoff.forward(owner, method, token, hop, body)
        except ClientBodyFailed as failed:
            if not failed.reached_owner:
                # The owner saw nothing (its session is as the id says): cancelled here.
                await self._abort(
                    self._session(repository, address, sealed.location), failed.failure
                )
            raise _client_error(failed.failure) from failed
        except OwnerGone as gone:
            session = self._session(repository, address, sealed.location)
            if method == "DELETE":
                return await self._send(session, "DELETE")
            await self._abort(session, "owner_gone")
            raise BlobUploadUnknown(
                "the gate replica that received this upload's content is gone: start the "
                "upload again",
                headers={"Connection": "close"} if body is not None else None,
            ) from gone
        handed.headers["Content-Length"] = "0"
        return Forwarded(handed.status, handed.headers)

    async def abandon(self, repository: Repository, address: ClientAddress, token: str) -> None:
        """Cancel the session of a request policy refused: the upload cannot go on."""
        try:
            sealed = self.sealer.open(token, repository.registry, repository.path)
        except BlobUploadUnknown:
            return
        await self._abort(self._session(repository, address, sealed.location), "refused")

    async def drain(self) -> None:
        """Wait (bounded) for the cancels of uploads that were cut by a cancelled request."""
        if self._cleanups:
            await asyncio.wait(set(self._cleanups), timeout=CLEANUP_DRAIN_SECONDS)

    def _session(self, repository: Repository, address: ClientAddress, location: str) -> _Session:
        parts = urlsplit(location)
        return _Session(
            repository, address, parts.path, parse_qsl(parts.query, keep_blank_values=True)
        )

    async def _verifiable(self, session: _Session, sealed: SealedUpload) -> UploadProgress:
        """The session's progress, if this process passed every byte the client sent.

        Otherwise (another replica, a restart, a client reusing an old `Location`) its
        digest cannot be checked before the upstream commits it: cancelled, and the client
        is told to start again (404 `BLOB_UPLOAD_UNKNOWN` makes clients restart a blob).
        """
        progress = self.ledger.get(session.key)
        if progress is None and sealed.offset == 0:
            progress = self.ledger.begin(session.key)
        if progress is not None and progress.offset == sealed.offset:
            return progress
        if progress is not None and progress.lock.locked():
            raise RangeInvalid(
                "another request is writing to this upload",
                headers={"Range": _range(sealed.offset)},
            )
        await self._abort(session, "unverifiable")
        raise BlobUploadUnknown(
            "this gate cannot verify the upload's content (it went through another replica "
            "or an older session id): start the upload again"
        )

    async def _send(
        self,
        session: _Session,
        method: str,
        *,
        query: list[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        body: AsyncIterable[bytes] | None = None,
        offset: int = 0,
    ) -> Forwarded:
        written = await self.clients[session.repository.registry].forward_session(
            method,
            session.repository,
            session.path,
            query=session.params + (query or []),
            headers=headers,
            body=body,
        )
        return self._relayed(session.repository, session.address, written, offset)

    async def _append(
        self,
        session: _Session,
        progress: UploadProgress,
        hasher: Hasher,
        body: AsyncIterator[bytes] | None,
        headers: Mapping[str, str],
    ) -> Forwarded:
        """PATCH the client's body into the session, hashing it; cancel on any failure."""
        stream = None
        if body is not None:
            stream = ClientBody(
                body,
                hasher,
                min_rate=self.uploads.min_rate,
                window=self.uploads.min_rate_window,
            )
        try:
            forwarded = await self._send(
                session,
                "PATCH",
                headers=_request_headers(headers, _FORWARDED_UPLOAD_HEADERS),
                body=stream,
            )
        except RegistryError as error:
            failure = stream.failure if stream is not None else None
            await self._abort(session, failure or "upstream_error")
            if failure is not None:
                raise _client_error(failure) from error
            raise
        except BaseException:
            # The request itself was cancelled (shutdown): cancel upstream in the background.
            self._abort_later(session, "client_gone")
            raise
        # The upstream's new state first: a cancel with the old one would be refused
        # (Distribution checks the offset it sealed) and keep the bytes.
        session.move_to(forwarded.upstream_location)
        if stream is not None and stream.failure is not None:
            await self._abort(session, stream.failure)
            raise _client_error(stream.failure)
        progress.offset += stream.size if stream is not None else 0
        if forwarded.upstream_location:
            forwarded.headers["Location"] = self._rewrite_upload_location(
                session.repository, session.address, forwarded.upstream_location, progress.offset
            )
        return forwarded

    async def _complete(
        self,
        session: _Session,
        progress: UploadProgress,
        digest: str | None,
        body: AsyncIterator[bytes] | None,
        headers: Mapping[str, str],
    ) -> Forwarded:
        """Close the session with the client's digest, if the gate's own hash matches it."""
        hasher = progress.hasher
        try:
            if digest is None:
                raise DigestInvalid("the final PUT of an upload needs ?digest=")
            algorithm = validate_digest(digest).split(":", 1)[0]
            if algorithm != "sha256":
                if progress.offset != 0:
                    raise DigestInvalid(
                        f"a chunked upload is verified with sha256; {algorithm} only for a "
                        "monolithic upload"
                    )
                hasher = hashlib.new(algorithm)
        except DigestInvalid:
            await self._abort(session, "invalid")
            raise
        if body is not None:
            await self._append(session, progress, hasher, body, headers)
        if f"{algorithm}:{hasher.hexdigest()}" != digest:
            await self._abort(session, "digest_mismatch")
            raise DigestInvalid(
                "the uploaded content does not match its digest", detail={"digest": digest}
            )
        try:
            forwarded = await self._send(session, "PUT", query=[("digest", digest)])
        except RegistryError:
            await self._abort(session, "upstream_error")
            raise
        self.ledger.forget(session.key)
        return forwarded

    async def _abort(self, session: _Session, reason: str) -> None:
        """The gate ends this upload: cancel the upstream session (best effort) and count."""
        self.ledger.forget(session.key)
        cancelled = "no"
        try:
            client = self.clients[session.repository.registry]
            answer = await client.forward_session(
                "DELETE", session.repository, session.path, query=session.params, check=False
            )
            # 404: the upstream already dropped it. Anything else: it may still be there.
            if answer.status < 300 or answer.status == 404:
                cancelled = "yes"
            else:
                log.warning(
                    "upstream %s kept an upload session the gate cancelled (status %d)",
                    session.repository.registry,
                    answer.status,
                )
        except RegistryError as error:
            log.warning("could not cancel an upload session upstream: %s", error.message)
        self.metrics.upload_aborts.labels(reason, cancelled).inc()

    def _abort_later(self, session: _Session, reason: str) -> None:
        task = asyncio.create_task(self._abort(session, reason), name="upload-cancel")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    # --- manifests and deletes ---------------------------------------------------------

    async def put_manifest(
        self,
        repository: Repository,
        address: ClientAddress,
        reference: str,
        headers: Mapping[str, str],
        body: bytes,
        tags: list[str],
    ) -> Forwarded:
        """PUT a manifest, bytes exactly as the client sent them."""
        if len(body) > MAX_MANIFEST_SIZE:
            raise ManifestTooLarge("manifest too large")
        forwarded = await self._forward(
            "PUT",
            repository,
            address,
            f"manifests/{reference}",
            kind="manifest",
            actions=("pull", "push"),
            query=[("tag", tag) for tag in tags],
            headers=_request_headers(headers),
            body=body,
        )
        digest = forwarded.headers.get("Docker-Content-Digest")
        media_type = headers.get("Content-Type", "")
        referrer = referrers.referrer_descriptor(body, media_type, digest) if digest else None
        if referrer is not None and "OCI-Subject" not in forwarded.headers:
            # The upstream has no referrers API: keep the referrers tag schema for it,
            # and say so with OCI-Subject, so the client does not do it a second time.
            subject, descriptor = referrer
            try:
                await self.referrers_fallback.add(repository, subject, descriptor)
            except RegistryError as error:
                # The manifest is pushed; without OCI-Subject the client keeps the
                # fallback tag itself, which is the spec's behaviour for such registries.
                log.warning("referrers tag for %s not updated: %s", subject, error.message)
            else:
                forwarded.headers["OCI-Subject"] = subject
        return forwarded

    async def delete(
        self, repository: Repository, address: ClientAddress, kind: Kind, reference: str
    ) -> Forwarded:
        """DELETE a manifest, tag or blob upstream."""
        segment = "manifests" if kind == "manifest" else "blobs"
        try:
            return await self._forward(
                "DELETE",
                repository,
                address,
                f"{segment}/{reference}",
                kind=kind,
                actions=("delete",),
            )
        except PassThroughError as error:
            if error.code != "DIGEST_INVALID" or kind != "manifest" or is_digest(reference):
                raise
            # Distribution 2.8 answers a tag DELETE with DIGEST_INVALID; the spec's word
            # for a registry that does not delete tags is 405 UNSUPPORTED.
            raise Unsupported(
                f"{repository.registry} does not support deleting tags; delete the manifest "
                "by digest"
            ) from error


async def read_manifest_body(body: AsyncIterable[bytes]) -> bytes:
    """Read a client's manifest body, refusing more than the cap with 413."""
    chunks: list[bytes] = []
    total = 0
    async for chunk in body:
        total += len(chunk)
        if total > MAX_MANIFEST_SIZE:
            raise ManifestTooLarge("manifest too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _client_error(failure: ClientFailure) -> BlobUploadInvalid:
    """What a client whose body failed is answered (if it is still there to hear it)."""
    if failure == "too_slow":
        return UploadTooSlow(
            "upload body too slow: below the gate's minimum rate; the upload was cancelled",
            headers={"Connection": "close"},
        )
    return BlobUploadInvalid("upload body ended early; the upload was cancelled")
