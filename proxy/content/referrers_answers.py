"""Referrers answers for one request: from the cache, the upstream's API, or its fallback tag.

Owns how `GET /v2/<name>/referrers/<digest>` is answered once policy has allowed the pull.
An upstream with the referrers API is asked (with the client's `artifactType`); its answer
is verified as an OCI image index (`Content-Type` and `mediaType` the index type, every
entry a descriptor with a valid digest; within 4 MiB across at most `MAX_PAGES` pages of
its `Link: rel="next"` pagination, else a 502 and nothing cached), filtered by the gate
when the upstream did not say `OCI-Filters-Applied: artifactType`, and cached like a tag:

- the answer's bytes go into the `ManifestStore` by their digest (an index grows as
  referrers are pushed, so its digest is not known in advance), and a `TagIndex` entry of
  the repository under a name no tag can have (`referrers/<subject>`, plus the hash of
  the `artifactType` when one was asked) points at it; the stores other backends
  implement (Redis, S3) hold it with no code of their own;
- fresh for `storage.tag_ttl`, then revalidated (one upstream GET per key at a time,
  shared by concurrent requests; others are served the cached answer within
  `storage.revalidate_grace`), and served stale within `storage.stale_limit` while the
  upstream fails, as a tag is.

The entry is per repository: a repository's answer is never served for another, and the
stored index is not recorded in the `RepositoryIndex`, so it is not served as a manifest
of the repository either. An upstream without the API (404 on the path) is answered from
its referrers tag schema (`proxy.content.referrers.ReferrersFallback`), uncached.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from proxy.content import referrers
from proxy.content.coalesce import Coalescer
from proxy.content.manifest_checks import MAX_MANIFEST_SIZE, bare_media_type, digest_of
from proxy.errors import (
    RegistryError,
    ServiceUnavailable,
    TooManyRequests,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.names.references import Repository, validate_digest
from proxy.observability.metrics import Metrics
from proxy.storage.cache import Cache
from proxy.storage.manifest_cache import MAX_MEDIA_TYPE, TagEntry
from proxy.upstream.api import FILTERS_APPLIED, Registry

INDEX_TYPE = referrers.INDEX_TYPE
# Upstream pages followed for one answer; the merged answer must also fit the 4 MiB a
# manifest may have (it is stored as one).
MAX_PAGES = 16
# Upstream failures after which a cached answer may be served stale (as for tags).
_STALE_OK_ERRORS = (UpstreamUnavailable, UpstreamTimeout, ServiceUnavailable, TooManyRequests)


@dataclass(frozen=True, slots=True)
class ReferrersAnswer:
    """A referrers index ready to serve, where it came from, and why it is stale (if)."""

    body: bytes
    filtered: bool  # artifactType was applied (by the upstream or the gate)
    source: str = "upstream"  # upstream, fallback, cache or stale
    stale: str | None = None

    def headers(self) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict({"Content-Type": INDEX_TYPE})
        if self.filtered:
            headers[FILTERS_APPLIED] = "artifactType"
        return headers


def cache_key(subject: str, artifact_type: str | None) -> str:
    """The `TagIndex` name of a referrers answer: never a valid tag (it has `/` and `:`),
    so it cannot collide with one; the client's `artifactType` only by its hash, so the
    name stays short whatever was asked."""
    key = f"referrers/{subject}"
    if artifact_type:
        key += f"/artifactType/{digest_of(artifact_type.encode())}"
    return key


class ReferrersService:
    """Answers referrers requests for a set of upstream clients, through the cache."""

    def __init__(
        self,
        clients: Mapping[str, Registry],
        cache: Callable[[], Cache],
        metrics: Metrics | None = None,
        *,
        revalidate_grace: float = 0.0,
    ) -> None:
        self.clients = clients
        self._cache = cache
        self.metrics = metrics
        self.revalidate_grace = revalidate_grace
        self.fallback = referrers.ReferrersFallback(clients)
        self._fetches: Coalescer[tuple[Repository, str], ReferrersAnswer] = Coalescer(
            "referrers fetch"
        )

    async def close(self) -> None:
        """Cancel the upstream fetches still running (shutdown)."""
        await self._fetches.close()

    async def forget(self, repository: Repository, subject: str) -> None:
        """Drop the cached answers for `subject` (a referrer of it was pushed through the
        gate), with or without `artifactType`, so the next request asks the upstream."""
        tags = self._cache().tags
        try:
            validate_digest(subject)
        except RegistryError:
            return  # an upstream's OCI-Subject that names no digest names no cache entry
        prefix = cache_key(subject, None)
        for name in await tags.tags(repository):
            if name == prefix or name.startswith(prefix + "/"):
                await tags.delete(repository, name)

    async def answer(
        self, repository: Repository, subject: str, artifact_type: str | None
    ) -> ReferrersAnswer:
        """The referrers of `subject` in `repository` (only those of `artifact_type`)."""
        cache = self._cache()
        key = cache_key(subject, artifact_type)
        now = time.time()
        entry = await cache.tags.get(repository, key)
        if entry is not None and entry.fresh(now, cache.tag_ttl):
            cached = await self._cached(entry, artifact_type)
            if cached is not None:
                self._count(True)
                return cached
        fetch, leader = self._fetches.start(
            (repository, key), lambda: self._fetch(repository, subject, artifact_type, key)
        )
        within_grace = cache.tag_ttl + self.revalidate_grace
        if not leader and entry is not None and entry.fresh(now, within_grace):
            # The answer being revalidated is still within the bound: no need to wait.
            cached = await self._cached(entry, artifact_type)
            if cached is not None:
                self._count(True)
                return cached
        self._count(False)
        try:
            return await asyncio.shield(fetch)
        except _STALE_OK_ERRORS as error:
            if entry is not None and entry.stale_ok(now, cache.stale_limit):
                cached = await self._cached(entry, artifact_type)
                if cached is not None:
                    if self.metrics is not None:
                        self.metrics.stale_served.labels(repository.registry, "referrers").inc()
                    return ReferrersAnswer(cached.body, cached.filtered, "stale", error.message)
            raise

    async def _cached(self, entry: TagEntry, artifact_type: str | None) -> ReferrersAnswer | None:
        stored = await self._cache().manifests.get(entry.digest)
        if stored is None or stored.media_type != INDEX_TYPE:
            return None
        return ReferrersAnswer(stored.body, bool(artifact_type), "cache")

    def _count(self, hit: bool) -> None:
        if self.metrics is not None:
            (self.metrics.cache_hits if hit else self.metrics.cache_misses).labels(
                "referrers"
            ).inc()

    async def _fetch(
        self, repository: Repository, subject: str, artifact_type: str | None, key: str
    ) -> ReferrersAnswer:
        """Ask the upstream (the coalesced task) and cache what its API answered."""
        client = self.clients[repository.registry]
        asked_at = time.time()
        async with client.manifest_deadline():
            pages = await _read_pages(client, repository, subject, artifact_type)
        if pages is None:
            # No referrers API (Distribution 2.8 answers 404 to the path).
            document = await self.fallback.read(repository, subject) or referrers.empty_index()
            manifests = document["manifests"]
            filtered_upstream = False
            cacheable = False
        else:
            manifests = [m for page in pages for m in page.manifests]
            filtered_upstream = all(page.filtered for page in pages)
            cacheable = True
        if artifact_type and not filtered_upstream:
            manifests = [m for m in manifests if m.get("artifactType") == artifact_type]
        body = referrers.encode(
            {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": _distinct(manifests)}
        )
        if len(body) > MAX_MANIFEST_SIZE:
            raise UpstreamUnavailable(
                f"the referrers answer of upstream {client.name} is over 4 MiB"
            )
        if not cacheable:
            return ReferrersAnswer(body, bool(artifact_type), "fallback")
        cache = self._cache()
        digest = digest_of(body)
        # The body first: an entry must never point at bytes the store does not hold.
        await cache.manifests.put(digest, INDEX_TYPE, body)
        await cache.tags.put(repository, key, TagEntry(digest, INDEX_TYPE, asked_at))
        return ReferrersAnswer(body, bool(artifact_type))


@dataclass(frozen=True, slots=True)
class _Page:
    manifests: list[dict[str, Any]]
    filtered: bool


async def _read_pages(
    client: Registry, repository: Repository, subject: str, artifact_type: str | None
) -> list[_Page] | None:
    """The upstream's verified pages (following `Link: rel="next"` within `MAX_PAGES` and
    4 MiB in all), or None when it has no referrers API (404 on the first page)."""
    query: list[tuple[str, str]] = [("artifactType", artifact_type)] if artifact_type else []
    pages: list[_Page] = []
    received = 0
    for _ in range(MAX_PAGES):
        # The budget bounds the whole answer, not each page.
        page = await client.referrers(repository, subject, query, MAX_MANIFEST_SIZE - received)
        if page is None:
            if pages:
                raise UpstreamUnavailable(
                    f"upstream {client.name} lost its referrers API between pages"
                )
            return None
        received += len(page.body)
        pages.append(verify_page(page.body, page.content_type, page.filters_applied, client.name))
        if page.next_query is None:
            return pages
        query = page.next_query
    raise UpstreamUnavailable(
        f"the referrers answer of upstream {client.name} has more than {MAX_PAGES} pages"
    )


def verify_page(
    body: bytes, content_type: str | None, filters_applied: list[str], upstream: str
) -> _Page:
    """One page of an upstream's referrers answer, verified as an OCI image index; a 502
    naming the upstream when it is not one."""
    declared_type = bare_media_type(content_type)
    if declared_type != INDEX_TYPE:
        raise UpstreamUnavailable(
            f"upstream {upstream} sent a referrers answer that is not an image index",
            detail={"content_type": declared_type[:MAX_MEDIA_TYPE]},
        )
    invalid = UpstreamUnavailable(
        f"upstream {upstream} sent a referrers answer that is not a valid image index"
    )
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: `[[[[...` nested deep
        raise invalid from exc
    if (
        not isinstance(document, dict)
        or document.get("schemaVersion") != 2
        or document.get("mediaType", INDEX_TYPE) != INDEX_TYPE
        or "layers" in document
        or "config" in document
    ):
        raise invalid
    listed = document.get("manifests")
    if not isinstance(listed, list) or not all(_is_descriptor(item) for item in listed):
        raise invalid
    applied = {part.strip().lower() for line in filters_applied for part in line.split(",")}
    filtered = "artifacttype" in applied
    return _Page(listed, filtered)


def _is_descriptor(item: object) -> bool:
    if not isinstance(item, dict):
        return False
    media_type, digest, size = item.get("mediaType"), item.get("digest"), item.get("size")
    if not _is_media_type(media_type) or not isinstance(digest, str):
        return False
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return False
    if "artifactType" in item and not _is_media_type(item["artifactType"]):
        return False
    if "annotations" in item and not isinstance(item["annotations"], dict):
        return False
    try:
        validate_digest(digest)
    except RegistryError:
        return False
    return True


def _is_media_type(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_MEDIA_TYPE and value.isprintable()


def _distinct(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The descriptors in order, each digest once (pages may overlap)."""
    seen: set[str] = set()
    kept = []
    for descriptor in manifests:
        digest = str(descriptor.get("digest"))
        if digest not in seen:
            seen.add(digest)
            kept.append(descriptor)
    return kept
