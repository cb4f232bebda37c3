"""Upstream rate-limit budgets (Docker Hub's `ratelimit-remaining`) shared by replicas.

Every replica pulls on the same upstream account, so the budget left is one number for the
whole gate; each replica only sees the header on its own upstream responses. Each replica
writes the last value it saw, with the time, into one Redis hash (`<prefix>ratelimit`,
field = upstream); a scrape of any replica's `/metrics` reads the hash and reports, per
upstream, the value seen last by any replica. Writes are batched off the request path
(one task at a time per process); losing Redis only leaves each replica reporting what
it saw itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from functools import partial

from redis.typing import EncodableT, FieldT

from proxy.observability.metrics import Metrics, parse_ratelimit
from proxy.storage.redis_client import RedisState, SharedStateUnavailable

log = logging.getLogger(__name__)

STORE = "ratelimit"  # the shared_state_errors label


class SharedRateLimits:
    """The upstream clients' observer: metrics as before, plus the shared budget."""

    def __init__(self, shared: RedisState, metrics: Metrics, upstreams: frozenset[str]) -> None:
        self._shared = shared
        self._upstreams = upstreams
        self._metrics = metrics
        self._key = shared.key(STORE)
        self._pending: dict[str, tuple[int, float]] = {}
        self._writer: asyncio.Task[None] | None = None

    def observe_upstream(
        self, upstream: str, method: str, status: int | None, seconds: float
    ) -> None:
        self._metrics.observe_upstream(upstream, method, status, seconds)

    def observe_token_failure(self, upstream: str, reason: str) -> None:
        self._metrics.observe_token_failure(upstream, reason)

    def observe_ratelimit(self, upstream: str, remaining_header: str | None) -> None:
        self._metrics.observe_ratelimit(upstream, remaining_header)
        parsed = parse_ratelimit(remaining_header)
        if parsed is None:
            return
        self._pending[upstream] = (parsed.value, time.time())
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            fields: dict[FieldT, EncodableT] = {
                upstream: json.dumps({"remaining": value, "at": at})
                for upstream, (value, at) in batch.items()
            }
            try:
                await self._shared.call(
                    STORE, partial(self._shared.client.hset, self._key, mapping=fields)
                )
            except SharedStateUnavailable as exc:
                log.debug("rate-limit budget not shared: %s", exc)
                return

    async def refresh(self) -> None:
        """Set the gauges to the budget any replica saw last (before a scrape renders)."""
        try:
            entries = await self._shared.call(STORE, lambda: self._shared.client.hgetall(self._key))
        except SharedStateUnavailable:
            return  # each replica reports what it saw itself
        gauge = self._metrics.upstream_ratelimit_remaining
        for raw_upstream, raw in entries.items():
            try:
                entry = json.loads(raw)
                remaining = int(entry["remaining"])
            except (ValueError, TypeError, KeyError):
                continue  # not ours to trust: skip, never fail a scrape
            upstream = raw_upstream.decode() if isinstance(raw_upstream, bytes) else raw_upstream
            if upstream in self._upstreams:  # labels only ever name configured upstreams
                gauge.labels(upstream).set(remaining)

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
