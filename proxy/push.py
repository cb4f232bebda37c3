"""Push and delete: forwarding uploads, manifest PUTs and deletes to the addressed upstream.

Uploads stream in both directions (the request body goes upstream chunk by chunk, memory
stays flat), and every `Location` the upstream answers with is rewritten to point at the
gate, in the addressing form the client used, so the client keeps talking to the gate.
Policy has already decided by the time anything here runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit

from multidict import CIMultiDict

from proxy.errors import ManifestTooLarge, RangeInvalid
from proxy.manifest_checks import MAX_MANIFEST_SIZE
from proxy.ranges import parse_chunk_range
from proxy.references import Repository
from proxy.upload_tokens import UploadSealer
from proxy.upstream import Kind, UpstreamClient

# Request headers relayed to the upstream on uploads and manifest PUTs.
_FORWARDED_REQUEST_HEADERS = ("Content-Type", "Content-Length", "Content-Range")
# Response headers relayed back to the client.
_FORWARDED_RESPONSE_HEADERS = (
    "Docker-Content-Digest",
    "Docker-Upload-UUID",
    "Range",
    "OCI-Chunk-Min-Length",
    "OCI-Subject",
    "Content-Type",
)


@dataclass(slots=True)
class Forwarded:
    """An upstream answer to relay: status, headers (Location rewritten) and a small body."""

    status: int
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""


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


def _relay_headers(upstream_headers: Mapping[str, str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name in _FORWARDED_RESPONSE_HEADERS:
        if name in upstream_headers:
            headers[name] = upstream_headers[name]
    return headers


def _request_headers(incoming: Mapping[str, str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name in _FORWARDED_REQUEST_HEADERS:
        if name in incoming:
            headers[name] = incoming[name]
    return headers


class Pusher:
    """Forwards writes for the upstream clients of the gate."""

    def __init__(self, clients: dict[str, UpstreamClient], sealer: UploadSealer) -> None:
        self.clients = clients
        self.sealer = sealer

    def _rewrite_upload_location(
        self, repository: Repository, address: ClientAddress, location: str
    ) -> str:
        """Turn the upstream's upload `Location` into a sealed gate URL."""
        parts = urlsplit(location)
        upstream_path = parts.path + (f"?{parts.query}" if parts.query else "")
        token = self.sealer.seal(repository.registry, repository.path, upstream_path)
        return address.url(f"blobs/uploads/{token}")

    def _rewrite_location(
        self,
        repository: Repository,
        address: ClientAddress,
        headers: Mapping[str, str],
        out: CIMultiDict[str],
    ) -> None:
        location = headers.get("Location")
        if not location:
            return
        path = urlsplit(location).path
        if "/blobs/uploads/" in path:
            out["Location"] = self._rewrite_upload_location(repository, address, location)
        elif "/blobs/" in path:
            out["Location"] = address.url("blobs/" + path.rsplit("/", 1)[1])
        elif "/manifests/" in path:
            out["Location"] = address.url("manifests/" + path.rsplit("/", 1)[1])

    async def _forward(
        self,
        method: str,
        repository: Repository,
        address: ClientAddress,
        upstream_path: str,
        *,
        kind: Kind,
        actions: tuple[str, ...],
        query: list[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | AsyncIterable[bytes] | None = None,
    ) -> Forwarded:
        client = self.clients[repository.registry]
        response = await client.request(
            method,
            upstream_path,
            kind=kind,
            repository=repository.path,
            actions=actions,
            query=query or [],
            headers=_request_headers(headers or {}),
            data=body,
        )
        await client.raise_for_status(response, kind)
        response.release()
        out = _relay_headers(response.headers)
        self._rewrite_location(repository, address, response.headers, out)
        out["Content-Length"] = "0"
        return Forwarded(response.status, out)

    async def start_upload(
        self,
        repository: Repository,
        address: ClientAddress,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: AsyncIterable[bytes] | None,
        mount_from: Repository | None,
    ) -> Forwarded:
        """POST an upload (plain, monolithic `?digest=`, or a cross-repository mount)."""
        params: list[tuple[str, str]] = []
        if "digest" in query:
            params.append(("digest", query["digest"]))
        if "mount" in query:
            params.append(("mount", query["mount"]))
            # A mount only works within one upstream; from elsewhere it is a new session.
            if mount_from is not None and mount_from.registry == repository.registry:
                params.append(("from", mount_from.path))
        actions = ("pull", "push")
        return await self._forward(
            "POST",
            repository,
            address,
            f"/v2/{repository.path}/blobs/uploads/",
            kind="upload",
            actions=actions,
            query=params,
            headers=headers,
            body=body if "digest" in query else None,
        )

    async def continue_upload(
        self,
        method: str,
        repository: Repository,
        address: ClientAddress,
        token: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: AsyncIterable[bytes] | None,
    ) -> Forwarded:
        """PATCH, PUT, GET (status) or DELETE (cancel) an upload session."""
        sealed = self.sealer.open(token, repository.registry, repository.path)
        parts = urlsplit(sealed)
        params = parse_qsl(parts.query, keep_blank_values=True)
        if method == "PATCH" and "Content-Range" in headers:
            await self._check_chunk_order(repository, address, parts.path, params, headers)
        if method == "PUT" and "digest" in query:
            params.append(("digest", query["digest"]))
        forwarded = await self._forward(
            method,
            repository,
            address,
            parts.path,
            kind="upload",
            actions=("pull", "push"),
            query=params,
            headers=headers,
            body=body if method in ("PATCH", "PUT") else None,
        )
        if method == "GET" and forwarded.status == 204 and "Location" not in forwarded.headers:
            forwarded.headers["Location"] = address.url(f"blobs/uploads/{token}")
        return forwarded

    async def _check_chunk_order(
        self,
        repository: Repository,
        address: ClientAddress,
        upstream_path: str,
        params: list[tuple[str, str]],
        headers: Mapping[str, str],
    ) -> None:
        """416 for a chunk that does not start where the upload ends.

        Some upstreams (Distribution 2.8) append whatever chunk arrives; the upload's
        status (its `Range`) says where the next chunk must start. `0-0` means either
        nothing or one byte so far, so both starts are let through then.
        """
        start, _ = parse_chunk_range(headers["Content-Range"])
        status = await self._forward(
            "GET",
            repository,
            address,
            upstream_path,
            kind="upload",
            actions=("pull", "push"),
            query=params,
        )
        try:
            _, end = parse_chunk_range(status.headers.get("Range", ""))
        except RangeInvalid:
            return  # the upstream does not say where the upload ends: nothing to check
        allowed = (0, 1) if end == 0 else (end + 1,)
        if start not in allowed:
            raise RangeInvalid(
                f"chunk out of order: it starts at {start}, the upload's range is 0-{end}",
                headers={"Range": f"0-{end}"},
            )

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
        return await self._forward(
            "PUT",
            repository,
            address,
            f"/v2/{repository.path}/manifests/{reference}",
            kind="manifest",
            actions=("pull", "push"),
            query=[("tag", tag) for tag in tags],
            headers=headers,
            body=body,
        )

    async def delete(
        self, repository: Repository, address: ClientAddress, kind: Kind, reference: str
    ) -> Forwarded:
        """DELETE a manifest, tag or blob upstream."""
        segment = "manifests" if kind == "manifest" else "blobs"
        return await self._forward(
            "DELETE",
            repository,
            address,
            f"/v2/{repository.path}/{segment}/{reference}",
            kind=kind,
            actions=("delete",),
        )


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
