"""Upstream tag lists: fetched whole across the upstream's pages, within bounds, once at a time.

The gate sorts and pages tag lists itself (`proxy.content.tag_pages`), so it reads an upstream's
whole list first, following its `Link: rel="next"` pages. What an upstream sends is not
trusted to be small: the bytes read for one list (`tag_lists.max_bytes`, each page also
within `max_page_bytes`), the distinct tags kept (`max_tags`) and the pages followed
(`max_pages`) are bounded, and past a bound the request fails with a 502 naming the
upstream's registry (never its address). Concurrent requests for one repository's list
share one fetch, and at most `max_concurrent` lists are fetched at once, so the memory
tag lists take is bounded however many clients and repositories ask.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TypeGuard

from proxy.content.coalesce import Coalescer
from proxy.errors import TagInvalid, UpstreamUnavailable
from proxy.names.references import Repository, validate_tag
from proxy.settings import TagListSettings
from proxy.upstream.api import Registry

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024


class TagListFetcher:
    """Fetches repositories' tag lists from their upstreams, bounded and coalesced."""

    def __init__(self, limits: TagListSettings) -> None:
        self._limits = limits
        self._flights: Coalescer[Repository, list[str]] = Coalescer("tag list")
        # Bounds the lists held at once (each within the per-list bounds), across
        # repositories; requests beyond it wait for a slot.
        self._slots = asyncio.Semaphore(limits.max_concurrent)

    async def tags(self, client: Registry, repository: Repository) -> list[str]:
        """Every tag of `repository` (sorted, distinct), joining a fetch under way."""
        return await self._flights.run(repository, lambda: self._fetch(client, repository))

    async def close(self) -> None:
        """Stop fetches still running (shutdown)."""
        await self._flights.close()

    async def _fetch(self, client: Registry, repository: Repository) -> list[str]:
        async with self._slots:
            return await _read_list(client, repository, self._limits)


async def _read_list(
    client: Registry, repository: Repository, limits: TagListSettings
) -> list[str]:
    query: list[tuple[str, str]] = []
    tags: set[str] = set()
    body = bytearray()
    listed: list[object] = []
    received = 0
    dropped = 0
    try:
        for _page in range(limits.max_pages):
            budget = limits.max_bytes - received
            page = await client.tag_page(repository, query, min(limits.max_page_bytes, budget))
            if page.body is None:
                if budget < limits.max_page_bytes:
                    raise _too_large(client, f"{limits.max_bytes} bytes (tag_lists.max_bytes)")
                raise _too_large(
                    client, f"{limits.max_page_bytes} bytes a page (tag_lists.max_page_bytes)"
                )
            body = page.body
            next_query = page.next_query
            received += len(body)
            listed = _parse_page(client, body)
            body.clear()  # the page's bytes are not needed once parsed
            for tag in listed:
                if not _is_tag(tag):
                    dropped += 1
                    continue
                tags.add(tag)
                if len(tags) > limits.max_tags:
                    raise _too_large(client, f"{limits.max_tags} tags (tag_lists.max_tags)")
            listed.clear()
            if next_query is None:
                break
            query = next_query
        else:
            raise _too_large(client, f"{limits.max_pages} pages (tag_lists.max_pages)")
    except BaseException:
        # An error's traceback keeps this frame's locals alive as long as the error lives
        # (until every waiter has answered, or until a garbage collection when a cycle
        # holds it): it must not keep what was read, or failed lists add up in memory.
        tags.clear()
        listed.clear()
        body.clear()
        raise
    if dropped:
        log.warning(
            "upstream %s listed %d invalid tags for %s (left out)", client.name, dropped, repository
        )
    return sorted(tags)


def _parse_page(client: Registry, body: bytearray) -> list[object]:
    """The page's `tags` (a missing or null list is empty)."""
    invalid = f"upstream {client.name} sent an invalid tag list"
    try:
        document = json.loads(body)
    # RecursionError: a deeply nested body (`[[[[...`) from a hostile upstream.
    except (ValueError, RecursionError) as exc:
        raise UpstreamUnavailable(invalid) from exc
    if not isinstance(document, dict):
        del document  # not kept alive by the error's traceback
        raise UpstreamUnavailable(invalid)
    listed = document.get("tags")
    del document
    if listed is None:
        return []
    if not isinstance(listed, list):
        del listed
        raise UpstreamUnavailable(invalid)
    return listed


def _is_tag(value: object) -> TypeGuard[str]:
    if not isinstance(value, str):
        return False
    try:
        validate_tag(value)
    except TagInvalid:
        return False
    return True


def _too_large(client: Registry, bound: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(
        f"the tag list of upstream {client.name} is larger than the gate accepts: over {bound}"
    )
