"""Pull path: manifests, blobs, tag lists and referrers, from cache or from upstream.

Owns how a pull is served once the repository is known and policy has allowed it:
manifest negotiation and verification, blobs (one call per request: whether the
repository holds the digest, whether it is cached, which capability of the store sends it,
or the fill), `Range`, tag lists paged by the gate, referrers with a fallback for
upstreams that lack the API, and what the cache forgets after a delete.

Small upstream exchanges are coalesced (`proxy.content.coalesce`): one revalidation per
(upstream, repository, tag) at a time, one manifest GET per digest, one repository
check per blob. While a tag's revalidation runs, other requests for it are served the
cached answer if it expired less than `storage.revalidate_grace` seconds ago, and wait
for that revalidation otherwise, so an expiring tag under load costs one upstream HEAD.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache

from proxy.content.coalesce import Coalescer
from proxy.content.manifest_checks import (
    MAX_MANIFEST_SIZE,
    ManifestInfo,
    digest_of,
    inspect_manifest,
)
from proxy.content.referrers_answers import ReferrersAnswer, ReferrersService
from proxy.content.replica_fills import ReplicaFills
from proxy.content.singleflight import RelayedBlob, StreamedBlob, UpstreamBlob
from proxy.errors import (
    RegistryError,
    ServiceUnavailable,
    TooManyRequests,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.http.ranges import content_range as content_range_header
from proxy.http.ranges import parse_range
from proxy.names.references import Repository, is_digest, validate_digest
from proxy.observability.metrics import Metrics
from proxy.settings import TagListSettings
from proxy.storage.blobstore import BlobRedirects, LocalBlobFiles
from proxy.storage.cache import Cache
from proxy.storage.manifest_cache import TagEntry
from proxy.upstream.api import Registry
from proxy.upstream.tag_lists import TagListFetcher

# What a resolution probe accepts: any image manifest or index.
PROBE_ACCEPT = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
STREAM_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class BlobSize:
    """A blob HEAD's answer."""

    size: int


@dataclass(frozen=True, slots=True)
class BlobFile:
    """A cached blob in a local file (a store with `LocalBlobFiles`), to send with
    sendfile: the whole blob or the `selected` inclusive range, with `lease` entered
    while it is sent."""

    path: Path
    size: int
    selected: tuple[int, int] | None
    lease: AbstractAsyncContextManager[None]


@dataclass(frozen=True, slots=True)
class BlobRedirect:
    """A cached blob the client fetches from the store's own URL (307)."""

    url: str


@dataclass(frozen=True, slots=True)
class BlobStream:
    """Blob bytes to stream: from the store's reader, a fill, or an uncached relay.

    Iterating `chunks` raises a RegistryError when the fill fails: the response already
    started must then end short, not complete.
    """

    chunks: StreamedBlob | RelayedBlob
    status: int
    content_range: str | None
    length: int | None
    source: str  # "cache" or "upstream", for the served-bytes metric


BlobBody = BlobSize | BlobFile | BlobRedirect | BlobStream


@dataclass(frozen=True, slots=True)
class ManifestResult:
    """A manifest ready to serve (body None for HEAD) and where it came from."""

    info: ManifestInfo
    body: bytes | None
    source: str = "upstream"
    stale: str | None = None  # why a stale tag was served (upstream failure), if it was


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
        clients: Mapping[str, Registry],
        cache: Cache | None = None,
        metrics: Metrics | None = None,
        *,
        tag_lists: TagListSettings | None = None,
        revalidate_grace: float = 0.0,
        replicas: ReplicaFills | None = None,
    ) -> None:
        self.clients = clients
        # With Redis: fills are single-flight across replicas too (one upstream fetch).
        self.replicas = replicas
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
        self.referrers_answers = ReferrersService(
            clients, lambda: self.cache, metrics, revalidate_grace=revalidate_grace
        )

    async def close(self) -> None:
        """Cancel the upstream exchanges still running for requests (shutdown): before
        the upstream clients and the cache close under them."""
        for flights in (self._revalidations, self._manifest_fetches, self._held_checks):
            await flights.close()
        await self.referrers_answers.close()
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

    def client(self, repository: Repository) -> Registry:
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
            if cached is None and await self.cache.manifests.get(reference) is not None:
                # Stored (by another repository, or another replica sharing the store)
                # but not known to be held here: a HEAD upstream confirms it, no GET.
                await self._fetch_manifest(repository, reference, accept, head=True)
                cached = await self._cached_manifest(repository, reference, accept, held=True)
            if cached is not None:
                self._count("manifest", True)
                return cached if not head else ManifestResult(cached.info, None, "cache")
            self._count("manifest", False)
            if head:
                return await self._fetch_manifest(repository, reference, accept, head=True)
            return await self._fetch_and_store(repository, reference, accept)
        return await self._manifest_by_tag(repository, reference, accept, head=head)

    async def _cached_manifest(
        self, repository: Repository, digest: str, accept: Sequence[str], *, held: bool = False
    ) -> ManifestResult | None:
        """The stored manifest, served for this repository only when it is known to hold
        it; `held`: its upstream has just said so (then recorded, with what it references,
        as a GET of it would have)."""
        if not held and not await self.cache.repositories.holds(repository, digest):
            return None
        cached = await self.cache.manifests.get(digest)
        if cached is None or not accepts(cached.media_type, accept):
            return None
        info = self._inspected.get(digest)
        if info is None:
            # The store verified the bytes against the digest; parsing them once is enough.
            info = inspect_manifest(cached.body, cached.media_type, digest, "cache")
            self._inspected[digest] = info
        if held and not await self.cache.repositories.holds(repository, digest):
            await self.cache.record(repository, (digest, *info.blobs, *info.children))
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
            if accepts(entry.media_type, accept):
                # Fresh (another replica asked upstream lately) but not in this replica's
                # manifest store: the tag needs no revalidation, only its manifest.
                self._count("tag", True)
                return await self._fetch_and_store(repository, entry.digest, accept, head=head)
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
        # Upstream has just said this repository's tag is `digest`: a stored copy (from
        # another repository or replica) serves without a GET.
        cached = await self._cached_manifest(repository, digest, accept, held=True)
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
        client: Registry,
        repository: Repository,
        reference: str,
        accept: Sequence[str],
        *,
        head: bool,
    ) -> ManifestResult:
        requested_digest = reference if is_digest(reference) else None
        if head:
            response_headers = await client.head_manifest(repository, reference, accept)
            digest = response_headers.get("Docker-Content-Digest")
            length = response_headers.get("Content-Length", "")
            media_type = response_headers.get("Content-Type", "")
            valid = digest is not None and length.isdigit() and _valid_digest(digest)
            if valid and digest is not None and requested_digest in (None, digest):
                info = ManifestInfo(digest, media_type.split(";", 1)[0].strip(), int(length))
                return ManifestResult(info, None)
            # Without a usable digest header the only way to answer is to GET and hash.
        response_headers, body = await client.get_manifest(
            repository, reference, accept, MAX_MANIFEST_SIZE
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

    @asynccontextmanager
    async def blob(
        self, repository: Repository, digest: str, range_header: str | None, *, head: bool
    ) -> AsyncIterator[BlobBody]:
        """A blob for `repository` (policy has allowed it), as a body to send.

        The one call of the blob handler. HEAD: its size (from cache when held, else an
        upstream HEAD). GET: once the repository is known to hold the digest, a cached
        copy is redirected to (a store with `BlobRedirects`), sent from its local file (a
        store with `LocalBlobFiles`), or streamed from the store's reader; a miss joins
        or starts the single-flight fill. `Range` is parsed here (RangeInvalid: 416). The
        body is valid while the context is open.
        """
        if head:
            yield BlobSize(await self.blob_size(repository, digest))
            return
        await self.ensure_held(repository, digest)
        blobs = self.cache.blobs
        if isinstance(blobs, BlobRedirects):
            url = await blobs.redirect_url(digest)
            if url is not None:
                self._count("blob", True)
                if self.metrics is not None:
                    self.metrics.blob_redirects.inc()
                yield BlobRedirect(url)
                return
        if isinstance(blobs, LocalBlobFiles):
            path = await blobs.local_path(digest)
            size = None if path is None else await blobs.stat(digest)
            self._count("blob", size is not None)
            if path is not None and size is not None:
                # The blob is leased while it is sent, so eviction cannot unlink a file
                # still being read (its bytes would stay on disk, uncounted).
                selected = parse_range(range_header, size)
                yield BlobFile(path, size, selected, blobs.lease(digest))
                return
        async with self._blob_stream(repository, digest) as blob:
            if not isinstance(blobs, LocalBlobFiles):
                self._count("blob", blob.cached)
            status, content_range = 200, None
            if blob.size is not None:
                selected = parse_range(range_header, blob.size)
                if selected is not None:
                    first, last = selected
                    blob.narrow(first, last - first + 1)
                    status, content_range = 206, content_range_header(first, last, blob.size)
            source = "cache" if blob.cached else "upstream"
            yield BlobStream(blob, status, content_range, blob.length, source)

    async def blob_size(self, repository: Repository, digest: str) -> int:
        """A blob HEAD: the size from cache when held, else an upstream HEAD (no GET)."""
        if await self.cache.repositories.holds(repository, digest):
            size = await self.cache.blobs.stat(digest)
            if size is not None:
                self._count("blob", True)
                return size
        length = await self.client(repository).head_blob(repository, digest)
        if length is None:
            raise UpstreamUnavailable(f"upstream {repository.registry} sent no blob length")
        await self.cache.record(repository, (digest,))
        return length

    async def blob_exists(self, repository: Repository, digest: str) -> bool:
        """Whether `repository` has the blob (held, else an upstream HEAD): a resolution
        probe; False only on 404."""
        try:
            await self.blob_size(repository, digest)
        except RegistryError as error:
            if error.status == 404:
                return False
            raise
        return True

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
        await self.client(repository).head_blob(repository, digest)
        await self.cache.record(repository, (digest,))

    @asynccontextmanager
    async def _blob_stream(
        self, repository: Repository, digest: str
    ) -> AsyncIterator[StreamedBlob | RelayedBlob]:
        """The blob from the store's reader when cached, else from the single-flight fill
        (joined or started), or relayed uncached when the cache has no room for it."""
        upstream = repository.registry

        @asynccontextmanager
        async def open_upstream() -> AsyncIterator[UpstreamBlob]:
            inflight = self.metrics.inflight_fills.labels(upstream) if self.metrics else None
            if inflight is not None:
                inflight.inc()
            try:
                async with self.client(repository).open_blob(repository, digest) as download:
                    yield UpstreamBlob(download.size, download.chunks)
            finally:
                if inflight is not None:
                    inflight.dec()

        source = self.replicas.source(digest, open_upstream) if self.replicas else None
        async with self.cache.fills.stream(
            digest, open_upstream, upstream=upstream, fill_source=source
        ) as blob:
            yield blob
        await self.cache.record(repository, (digest,))

    async def protect(self, repository: Repository) -> None:
        """Keep what a pinned `repository` holds out of eviction (a pin promises the same
        image); told by the decision layer whenever a resolution is pinned."""
        await self.cache.protect(repository)

    async def forget(self, repository: Repository, reference: str) -> None:
        """After a delete went through, stop serving the reference for this repository
        from cache: a deleted tag, and a deleted digest (with the tags cached as pointing
        at it)."""
        cache = self.cache
        if not is_digest(reference):
            await cache.tags.delete(repository, reference)
            return
        # Forgotten for every repository: the others are confirmed upstream again when asked.
        await cache.repositories.forget(reference)
        for tag in await cache.tags.tags(repository):
            entry = await cache.tags.get(repository, tag)
            if entry is not None and entry.digest == reference:
                await cache.tags.delete(repository, tag)

    async def tags(self, repository: Repository) -> list[str]:
        """Every tag of a repository (sorted), following the upstream's own pages, within
        the `tag_lists` bounds; concurrent requests share one fetch."""
        return await self._tag_lists.tags(self.client(repository), repository)

    async def referrers(
        self, repository: Repository, digest: str, artifact_type: str | None
    ) -> ReferrersAnswer:
        """The referrers index of `digest` (`proxy.content.referrers_answers`): cached
        from the upstream's API, or built from its referrers tag schema."""
        return await self.referrers_answers.answer(repository, digest, artifact_type)

    async def repository_exists(self, repository: Repository) -> bool:
        """Whether the upstream knows the repository (its tag list); False only on 404."""
        return await self.client(repository).repository_exists(repository)

    async def manifest_exists(self, repository: Repository, reference: str) -> bool:
        """Whether the upstream has a manifest (HEAD); False only on 404, else raises."""
        client = self.client(repository)
        async with client.manifest_deadline():
            return await client.manifest_exists(repository, reference, PROBE_ACCEPT)


def _valid_digest(digest: str) -> bool:
    try:
        validate_digest(digest)
    except Exception:
        return False
    return True
