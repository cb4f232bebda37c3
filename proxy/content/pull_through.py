"""Pull path: manifests, blobs, tag lists and referrers, from cache or from upstream.

Owns how a pull is served once the repository is known and policy has allowed it:
manifest negotiation and verification, blob streaming with `Range`, tag lists paged by
the gate, referrers with a fallback for upstreams that lack the API.

Small upstream exchanges are coalesced (`proxy.content.coalesce`): one revalidation per
(upstream, repository, tag) at a time, one manifest GET per digest, one repository
check per blob. While a tag's revalidation runs, other requests for it are served the
cached answer if it expired less than `storage.revalidate_grace` seconds ago, and wait
for that revalidation otherwise, so an expiring tag under load costs one upstream HEAD.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from cachetools import LRUCache
from multidict import CIMultiDict

from proxy.content import referrers
from proxy.content.coalesce import Coalescer
from proxy.content.manifest_checks import (
    MAX_MANIFEST_SIZE,
    ManifestInfo,
    digest_of,
    inspect_manifest,
)
from proxy.content.singleflight import RelayedBlob, StreamedBlob, UpstreamBlob
from proxy.errors import (
    ServiceUnavailable,
    TooManyRequests,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.names.references import Repository, is_digest, validate_digest
from proxy.observability.metrics import Metrics
from proxy.settings import TagListSettings
from proxy.storage.cache import Cache
from proxy.storage.manifest_cache import TagEntry
from proxy.upstream.client import UpstreamClient, read_capped
from proxy.upstream.tag_lists import TagListFetcher

EMPTY_INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
# What a resolution probe accepts: any image manifest or index.
PROBE_ACCEPT = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
STREAM_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ManifestResult:
    """A manifest ready to serve (body None for HEAD) and where it came from."""

    info: ManifestInfo
    body: bytes | None
    source: str = "upstream"
    stale: str | None = None  # why a stale tag was served (upstream failure), if it was


def _accept_headers(accept: Sequence[str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for line in accept:
        headers.add("Accept", line)
    return headers


def accepts(media_type: str, accept: Sequence[str]) -> bool:
    """Whether a client's Accept lines admit a manifest media type."""
    offered = {item.split(";", 1)[0].strip().lower() for line in accept for item in line.split(",")}
    offered.discard("")
    return not offered or "*/*" in offered or media_type in offered


# Upstream failures after which a cached tag may be served stale (a rate limit too: the
# cached answer is better than none while Docker Hub refuses).
_STALE_OK_ERRORS = (UpstreamUnavailable, UpstreamTimeout, ServiceUnavailable, TooManyRequests)


class PullThrough:
    """Serves pulls for one set of upstream clients, through the cache."""

    def __init__(
        self,
        clients: dict[str, UpstreamClient],
        cache: Cache | None = None,
        metrics: Metrics | None = None,
        *,
        tag_lists: TagListSettings | None = None,
        revalidate_grace: float = 0.0,
    ) -> None:
        self.clients = clients
        self._cache = cache
        self.metrics = metrics
        self.revalidate_grace = revalidate_grace
        self._inspected: LRUCache[str, ManifestInfo] = LRUCache(maxsize=4096)
        self._tag_lists = TagListFetcher(tag_lists or TagListSettings())
        self._revalidations: Coalescer[tuple[Repository, str], ManifestResult] = Coalescer(
            "tag revalidation"
        )
        self._manifest_fetches: Coalescer[
            tuple[Repository, str, tuple[str, ...]], ManifestResult
        ] = Coalescer("manifest fetch")
        self._held_checks: Coalescer[tuple[Repository, str], None] = Coalescer("repository check")
        self.referrers_fallback = referrers.ReferrersFallback(clients)

    async def close(self) -> None:
        """Cancel the upstream exchanges still running for requests (shutdown): before
        the upstream clients and the cache close under them."""
        for flights in (self._revalidations, self._manifest_fetches, self._held_checks):
            await flights.close()
        await self._tag_lists.close()

    @property
    def cache(self) -> Cache:
        """The cache (opened by the app's start-up, before the first request)."""
        if self._cache is None:
            raise ServiceUnavailable("the cache is not open")
        return self._cache

    @cache.setter
    def cache(self, cache: Cache) -> None:
        self._cache = cache

    @property
    def open_cache(self) -> Cache | None:
        """The cache if it is open (for scrapes that may come before start-up)."""
        return self._cache

    def client(self, repository: Repository) -> UpstreamClient:
        """The upstream client for a (located, configured) repository."""
        return self.clients[repository.registry]

    def _count(self, kind: str, hit: bool) -> None:
        if self.metrics is not None:
            metrics = self.metrics
            metrics.bound(metrics.cache_hits if hit else metrics.cache_misses, kind).inc()

    def fill_finished(self, digest: str, upstream: str, outcome: str, received: int) -> None:
        """Fill observer: count failed fills against the registry the request addressed
        (also when its upstream never answered)."""
        if self.metrics is None or outcome == "ok":
            return
        if outcome == "digest_mismatch":
            self.metrics.digest_mismatches.labels(upstream).inc()
        self.metrics.fill_failures.labels(upstream, outcome).inc()

    # --- manifests ---------------------------------------------------------------------

    async def manifest(
        self, repository: Repository, reference: str, accept: Sequence[str], *, head: bool
    ) -> ManifestResult:
        """A manifest by tag or digest: from cache when fresh, else upstream (and cached)."""
        result = await self._manifest(repository, reference, accept, head=head)
        if result.stale is not None and self.metrics is not None:
            self.metrics.stale_served.labels(repository.registry, "tag").inc()
        return result

    async def _manifest(
        self, repository: Repository, reference: str, accept: Sequence[str], *, head: bool
    ) -> ManifestResult:
        if is_digest(reference):
            cached = await self._cached_manifest(repository, reference, accept)
            if cached is not None:
                self._count("manifest", True)
                return cached if not head else ManifestResult(cached.info, None, "cache")
            self._count("manifest", False)
            if head:
                return await self._fetch_manifest(repository, reference, accept, head=True)
            return await self._fetch_and_store(repository, reference, accept)
        return await self._manifest_by_tag(repository, reference, accept, head=head)

    async def _cached_manifest(
        self, repository: Repository, digest: str, accept: Sequence[str]
    ) -> ManifestResult | None:
        # Served for this repository only when it is known to hold the manifest.
        if not await self.cache.repositories.holds(repository, digest):
            return None
        cached = await self.cache.manifests.get(digest)
        if cached is None or not accepts(cached.media_type, accept):
            return None
        info = self._inspected.get(digest)
        if info is None:
            # The store verified the bytes against the digest; parsing them once is enough.
            info = inspect_manifest(cached.body, cached.media_type, digest, "cache")
            self._inspected[digest] = info
        return ManifestResult(info, cached.body, "cache")

    async def _manifest_by_tag(
        self, repository: Repository, tag: str, accept: Sequence[str], *, head: bool
    ) -> ManifestResult:
        now = time.time()
        entry = await self.cache.tags.get(repository, tag)
        if entry is not None and entry.fresh(now, self.cache.tag_ttl):
            cached = await self._cached_manifest(repository, entry.digest, accept)
            if cached is not None:
                self._count("tag", True)
                return cached if not head else ManifestResult(cached.info, None, "cache")
        # One revalidation per tag at a time, whoever asks: the first request starts it,
        # the others join it (a client that leaves does not cancel it for them).
        revalidation, leader = self._revalidations.start(
            (repository, tag), lambda: self._revalidate(repository, tag, accept, entry)
        )
        if not leader:
            within_grace = self.cache.tag_ttl + self.revalidate_grace
            if entry is not None and entry.fresh(now, within_grace):
                # The answer being revalidated is still within the bound: no need to wait.
                cached = await self._cached_manifest(repository, entry.digest, accept)
                if cached is not None:
                    self._count_follower(repository, "served_cached")
                    self._count("tag", True)
                    return cached if not head else ManifestResult(cached.info, None, "cache")
            self._count_follower(repository, "waited")
        self._count("tag", False)
        try:
            probe = await asyncio.shield(revalidation)
        except _STALE_OK_ERRORS as error:
            if entry is not None and entry.stale_ok(now, self.cache.stale_limit):
                cached = await self._cached_manifest(repository, entry.digest, accept)
                if cached is not None:
                    return ManifestResult(
                        cached.info, None if head else cached.body, "stale", error.message
                    )
            raise
        digest = probe.info.digest
        cached = await self._cached_manifest(repository, digest, accept)
        if cached is not None:
            return cached if not head else ManifestResult(cached.info, None, "cache")
        if head and probe.body is None:
            return probe
        return await self._fetch_and_store(repository, digest, accept, head=head)

    async def _revalidate(
        self, repository: Repository, tag: str, accept: Sequence[str], previous: TagEntry | None
    ) -> ManifestResult:
        """Ask upstream what `tag` points at now and record it (the coalesced task)."""
        asked_at = time.time()
        try:
            # HEAD: it does not count against Docker Hub's pull limit, and a digest
            # already cached needs no GET at all.
            probe = await self._fetch_manifest(repository, tag, accept, head=True)
        except Exception:
            self._count_revalidation(repository, "failed")
            raise
        info = probe.info
        await self.cache.tags.put(repository, tag, TagEntry(info.digest, info.media_type, asked_at))
        if previous is None:
            self._count_revalidation(repository, "new")
        else:
            self._count_revalidation(
                repository, "unchanged" if previous.digest == info.digest else "moved"
            )
        return probe

    def _count_revalidation(self, repository: Repository, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.tag_revalidations.labels(repository.registry, outcome).inc()

    def _count_follower(self, repository: Repository, how: str) -> None:
        if self.metrics is not None:
            self.metrics.tag_revalidation_followers.labels(repository.registry, how).inc()

    async def _fetch_and_store(
        self, repository: Repository, digest: str, accept: Sequence[str], *, head: bool = False
    ) -> ManifestResult:
        # Concurrent misses of one manifest (a tag that just moved, a cold pull) make one
        # GET; the Accept lines are part of the key, as they may change the answer.
        result = await self._manifest_fetches.run(
            (repository, digest, tuple(accept)),
            lambda: self._fetch_and_store_once(repository, digest, accept),
        )
        return ManifestResult(result.info, None if head else result.body)

    async def _fetch_and_store_once(
        self, repository: Repository, digest: str, accept: Sequence[str]
    ) -> ManifestResult:
        result = await self._fetch_manifest(repository, digest, accept, head=False)
        assert result.body is not None
        await self.cache.manifests.put(result.info.digest, result.info.media_type, result.body)
        await self.cache.record(
            repository, (result.info.digest, *result.info.blobs, *result.info.children)
        )
        return result

    async def _fetch_manifest(
        self, repository: Repository, reference: str, accept: Sequence[str], *, head: bool
    ) -> ManifestResult:
        """Fetch a manifest (HEAD: only its digest/type/size) and verify it, within the
        upstream's `timeouts.total_manifest`."""
        client = self.client(repository)
        async with client.manifest_deadline():
            return await self._fetch_manifest_now(client, repository, reference, accept, head=head)

    async def _fetch_manifest_now(
        self,
        client: UpstreamClient,
        repository: Repository,
        reference: str,
        accept: Sequence[str],
        *,
        head: bool,
    ) -> ManifestResult:
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
        response_headers, body = await client.get_body(
            path,
            kind="manifest",
            repository=repository.path,
            limit=MAX_MANIFEST_SIZE,
            headers=headers,
        )
        if requested_digest is not None and self.metrics is not None:
            algorithm = requested_digest.split(":", 1)[0]
            if digest_of(body, algorithm) != requested_digest:
                # Counted like a blob's; inspect_manifest refuses it (502, not cached).
                self.metrics.digest_mismatches.labels(client.name).inc()
        info = inspect_manifest(
            body, response_headers.get("Content-Type"), requested_digest, client.name
        )
        return ManifestResult(info, None if head else body)

    async def blob_size(self, repository: Repository, digest: str) -> int:
        """A blob HEAD: the size from cache when held, else an upstream HEAD (no GET)."""
        if await self.cache.repositories.holds(repository, digest):
            size = await self.cache.blobs.stat(digest)
            if size is not None:
                self._count("blob", True)
                return size
        response = await self._upstream_blob(repository, digest, "HEAD")
        response.release()
        length = response.headers.get("Content-Length", "")
        if not length.isdigit():
            raise UpstreamUnavailable(f"upstream {repository.registry} sent no blob length")
        await self.cache.record(repository, (digest,))
        return int(length)

    async def ensure_held(self, repository: Repository, digest: str) -> None:
        """Make sure `repository` holds `digest` before a cached copy is served for it.

        Known from a manifest fetched for it, or confirmed by a HEAD to its upstream, so a
        blob cached (or being filled) through another repository cannot leak across
        repositories or upstreams.
        """
        if await self.cache.repositories.holds(repository, digest):
            return
        # Also when not cached yet: a fill started for another repository may be running,
        # and joining it must not skip this repository's own upstream check. Concurrent
        # requests share one check (a cold burst makes one HEAD, as it makes one GET).
        await self._held_checks.run(
            (repository, digest), lambda: self._confirm_held(repository, digest)
        )

    async def _confirm_held(self, repository: Repository, digest: str) -> None:
        response = await self._upstream_blob(repository, digest, "HEAD")
        response.release()
        await self.cache.record(repository, (digest,))

    async def cached_blob(self, repository: Repository, digest: str) -> Path | None:
        """The local file of a cached blob this repository holds (zero-copy serving)."""
        if not await self.cache.repositories.holds(repository, digest):
            return None
        path = await self.cache.blobs.path_for(digest)
        self._count("blob", path is not None)
        return path

    def file_response(
        self,
        digest: str,
        path: Path,
        headers: dict[str, str],
        selected: tuple[int, int] | None = None,
    ) -> web.FileResponse:
        """The response sending a cached blob's file (the whole blob, or the `selected`
        inclusive range); the blob is leased while it is sent, so eviction cannot unlink
        a file still being read (its bytes would stay on disk, uncounted, until the send
        ended)."""
        lease = self.cache.blobs.lease(digest)
        return _CachedBlobResponse(lease, path, selected, headers)

    @asynccontextmanager
    async def blob_stream(
        self, repository: Repository, digest: str
    ) -> AsyncIterator[StreamedBlob | RelayedBlob]:
        """The blob from the single-flight fill (joined or started), for a cache miss; or
        relayed uncached when the cache has no room for it."""
        upstream = repository.registry

        @asynccontextmanager
        async def open_upstream() -> AsyncIterator[UpstreamBlob]:
            inflight = self.metrics.inflight_fills.labels(upstream) if self.metrics else None
            if inflight is not None:
                inflight.inc()
            try:
                response = await self._upstream_blob(repository, digest, "GET")
                try:
                    yield UpstreamBlob(response.content_length, _relay(response, upstream))
                finally:
                    response.release()
            finally:
                if inflight is not None:
                    inflight.dec()

        async with self.cache.fills.stream(digest, open_upstream, upstream=upstream) as blob:
            yield blob
        await self.cache.record(repository, (digest,))

    async def _upstream_blob(
        self, repository: Repository, digest: str, method: str
    ) -> aiohttp.ClientResponse:
        client = self.client(repository)
        response = await client.request(
            method,
            f"/v2/{repository.path}/blobs/{digest}",
            kind="blob",
            repository=repository.path,
            follow_redirects=True,
        )
        await client.raise_for_status(response, "blob")
        return response

    async def tags(self, repository: Repository) -> list[str]:
        """Every tag of a repository (sorted), following the upstream's own pages, within
        the `tag_lists` bounds; concurrent requests share one fetch."""
        return await self._tag_lists.tags(self.client(repository), repository)

    async def referrers(
        self, repository: Repository, digest: str, artifact_type: str | None
    ) -> tuple[bytes, CIMultiDict[str]]:
        """The referrers index: the upstream's API, or else its referrers tag schema (an
        index under the tag `<alg>-<hex>`), or else an empty index; filtered by
        `artifactType` here when the upstream did not filter."""
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
            # No referrers API (Distribution 2.8 answers 404 to the path).
            response.release()
            document = await self.referrers_fallback.read(repository, digest)
            filtered = False
        else:
            await client.raise_for_status(response, "referrers")
            try:
                body = await read_capped(response, MAX_MANIFEST_SIZE, client.name)
            finally:
                response.release()
            try:
                document = referrers.parse_index(body)
            except (ValueError, RecursionError) as exc:
                raise UpstreamUnavailable(
                    f"upstream {client.name} sent a referrers answer that is not an index"
                ) from exc
            filtered = referrers.FILTERS_APPLIED in response.headers
        document = document or referrers.empty_index()
        # The answer is always an OCI index of this repository's referrers, whatever the
        # fallback tag's own annotations said.
        document = {
            "schemaVersion": 2,
            "mediaType": EMPTY_INDEX_TYPE,
            "manifests": document["manifests"],
        }
        if artifact_type:
            if not filtered:
                document = referrers.filter_by_artifact_type(document, artifact_type)
            headers[referrers.FILTERS_APPLIED] = "artifactType"
        return referrers.encode(document), headers

    async def repository_exists(self, repository: Repository) -> bool:
        """Whether the upstream knows the repository (its tag list); False only on 404."""
        return await self.client(repository).probe(
            "GET",
            f"/v2/{repository.path}/tags/list",
            kind="tags",
            repository=repository.path,
            query=[("n", "1")],
        )

    async def exists(self, repository: Repository, reference: str) -> bool:
        """Whether the upstream has a manifest (HEAD); False only on 404, else raises."""
        client = self.client(repository)
        async with client.manifest_deadline():
            return await client.probe(
                "HEAD",
                f"/v2/{repository.path}/manifests/{reference}",
                kind="manifest",
                repository=repository.path,
                headers=_accept_headers(PROBE_ACCEPT),
            )


def _valid_digest(digest: str) -> bool:
    try:
        validate_digest(digest)
    except Exception:
        return False
    return True


class _CachedBlobResponse(web.FileResponse):
    """A cached blob sent with sendfile, leased while it is sent (aiohttp sends the whole
    file within `prepare`), for exactly the range the gate chose.

    aiohttp's FileResponse reads `Range` itself and disagrees with the gate on what to
    ignore (`bytes=-`, multi-range, spaces, 5,000-digit numbers): it answers those with a
    bodiless 416 where the gate serves the whole blob, as on a cache miss. So it is shown
    a request whose `Range` is the gate's own reading. `If-Range` goes too: a blob is
    content-addressed, so every validator for it still holds.
    """

    def __init__(
        self,
        lease: AbstractAsyncContextManager[None],
        path: Path,
        selected: tuple[int, int] | None,
        headers: dict[str, str],
    ) -> None:
        super().__init__(path, headers=headers)
        self._lease = lease
        self._selected = selected

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        headers = request.headers.copy()
        headers.popall("Range", None)
        headers.popall("If-Range", None)
        if self._selected is not None:
            headers["Range"] = "bytes={}-{}".format(*self._selected)
        async with self._lease:
            return await super().prepare(request.clone(headers=headers))


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
