"""Pull path: manifests, blobs, tag lists and referrers, from cache or from upstream.

Owns how a pull is served once the repository is known and policy has allowed it:
manifest negotiation and verification, blob streaming with `Range`, tag lists paged by
the gate, referrers with a fallback for upstreams that lack the API.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict

from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.manifest_checks import MAX_MANIFEST_SIZE, ManifestInfo, inspect_manifest
from proxy.references import Repository, is_digest, validate_digest
from proxy.upstream import UpstreamClient, read_capped

EMPTY_INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MAX_TAG_PAGES = 100
STREAM_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class ManifestResult:
    """A manifest ready to serve (body None for HEAD)."""

    info: ManifestInfo
    body: bytes | None


@dataclass(slots=True)
class BlobStream:
    """An upstream blob response being relayed: status, headers to send, body chunks."""

    status: int
    headers: CIMultiDict[str]
    chunks: AsyncIterator[bytes]


def _accept_headers(accept: Sequence[str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for line in accept:
        headers.add("Accept", line)
    return headers


class PullThrough:
    """Serves pulls for one set of upstream clients."""

    def __init__(self, clients: dict[str, UpstreamClient]) -> None:
        self.clients = clients

    def client(self, repository: Repository) -> UpstreamClient:
        """The upstream client for a (located, configured) repository."""
        return self.clients[repository.registry]

    async def manifest(
        self, repository: Repository, reference: str, accept: Sequence[str], *, head: bool
    ) -> ManifestResult:
        """Fetch a manifest (HEAD: only its digest/type/size) and verify it."""
        client = self.client(repository)
        path = f"/v2/{repository.path}/manifests/{reference}"
        headers = _accept_headers(accept)
        requested_digest = reference if is_digest(reference) else None
        if head:
            response = await client.request(
                "HEAD", path, kind="manifest", repository=repository.path, headers=headers
            )
            await client.raise_for_status(response, "manifest")
            response.release()
            digest = response.headers.get("Docker-Content-Digest")
            length = response.headers.get("Content-Length", "")
            media_type = response.headers.get("Content-Type", "")
            valid = digest is not None and length.isdigit() and _valid_digest(digest)
            if valid and digest is not None and requested_digest in (None, digest):
                info = ManifestInfo(digest, media_type.split(";", 1)[0].strip(), int(length))
                return ManifestResult(info, None)
            # Without a usable digest header the only way to answer is to GET and hash.
        response = await client.request(
            "GET", path, kind="manifest", repository=repository.path, headers=headers
        )
        await client.raise_for_status(response, "manifest")
        try:
            body = await read_capped(response, MAX_MANIFEST_SIZE)
        finally:
            response.release()
        info = inspect_manifest(
            body, response.headers.get("Content-Type"), requested_digest, client.name
        )
        return ManifestResult(info, None if head else body)

    async def blob(
        self, repository: Repository, digest: str, range_header: str | None, *, head: bool
    ) -> BlobStream:
        """Open an upstream blob (following allowed redirects) for relaying."""
        client = self.client(repository)
        headers: CIMultiDict[str] = CIMultiDict()
        if range_header:
            headers["Range"] = range_header
        response = await client.request(
            "HEAD" if head else "GET",
            f"/v2/{repository.path}/blobs/{digest}",
            kind="blob",
            repository=repository.path,
            headers=headers,
            follow_redirects=True,
        )
        await client.raise_for_status(response, "blob")
        out: CIMultiDict[str] = CIMultiDict()
        for name in ("Content-Length", "Content-Range", "Accept-Ranges"):
            if name in response.headers:
                out[name] = response.headers[name]
        out["Content-Type"] = "application/octet-stream"
        out["Docker-Content-Digest"] = digest
        return BlobStream(response.status, out, _relay(response, client.name))

    async def tags(self, repository: Repository) -> list[str]:
        """Every tag of a repository, following the upstream's own pages."""
        client = self.client(repository)
        path = f"/v2/{repository.path}/tags/list"
        query: list[tuple[str, str]] = []
        tags: list[str] = []
        for _page in range(MAX_TAG_PAGES):
            response = await client.request(
                "GET", path, kind="tags", repository=repository.path, query=query
            )
            await client.raise_for_status(response, "tags")
            try:
                body = await read_capped(response, MAX_MANIFEST_SIZE)
            finally:
                response.release()
            try:
                document = json.loads(body)
                tags.extend(str(tag) for tag in document.get("tags") or [])
            except (ValueError, AttributeError, TypeError) as exc:
                raise UpstreamUnavailable(
                    f"upstream {client.name} sent an invalid tag list"
                ) from exc
            link = response.headers.get("Link", "")
            next_query = _next_query(link)
            if next_query is None:
                break
            query = next_query
        return tags

    async def referrers(
        self, repository: Repository, digest: str, artifact_type: str | None
    ) -> tuple[bytes, CIMultiDict[str]]:
        """The referrers index; an empty index where the upstream has no referrers API."""
        client = self.client(repository)
        query = [("artifactType", artifact_type)] if artifact_type else []
        response = await client.request(
            "GET",
            f"/v2/{repository.path}/referrers/{digest}",
            kind="referrers",
            repository=repository.path,
            query=query,
            headers={"Accept": EMPTY_INDEX_TYPE},
        )
        headers: CIMultiDict[str] = CIMultiDict({"Content-Type": EMPTY_INDEX_TYPE})
        if response.status == 404:
            response.release()
            empty = {"schemaVersion": 2, "mediaType": EMPTY_INDEX_TYPE, "manifests": []}
            return json.dumps(empty).encode(), headers
        await client.raise_for_status(response, "referrers")
        try:
            body = await read_capped(response, MAX_MANIFEST_SIZE)
        finally:
            response.release()
        if "OCI-Filters-Applied" in response.headers:
            headers["OCI-Filters-Applied"] = response.headers["OCI-Filters-Applied"]
        return body, headers

    async def exists(self, repository: Repository, reference: str) -> bool:
        """Whether the upstream has a manifest (HEAD); False only on 404, else raises."""
        client = self.client(repository)
        response = await client.request(
            "HEAD",
            f"/v2/{repository.path}/manifests/{reference}",
            kind="manifest",
            repository=repository.path,
            headers=_accept_headers(
                [
                    "application/vnd.oci.image.index.v1+json",
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                ]
            ),
        )
        if response.status == 404:
            response.release()
            return False
        await client.raise_for_status(response, "manifest")
        response.release()
        return True


def _valid_digest(digest: str) -> bool:
    try:
        validate_digest(digest)
    except Exception:
        return False
    return True


def _next_query(link: str) -> list[tuple[str, str]] | None:
    if 'rel="next"' not in link or "<" not in link:
        return None
    target = link[link.index("<") + 1 : link.index(">")]
    _, _, query = target.partition("?")
    pairs: list[tuple[str, str]] = []
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key:
            pairs.append((key, value))
    return pairs or None


async def _relay(response: aiohttp.ClientResponse, upstream: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.content.iter_chunked(STREAM_CHUNK):
            yield chunk
    except TimeoutError as exc:
        raise UpstreamTimeout(f"upstream {upstream} stalled while sending a blob") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"upstream {upstream} failed while sending a blob") from exc
    finally:
        response.release()
