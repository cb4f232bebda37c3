"""Where a fill gets its bytes with Redis configured (proxy/content/replica_fills.py),
against a real redis-server; the holder's endpoint is a real aiohttp server on loopback
(tests/scaleout/test_replica_fills.py runs whole gate processes).

Held lease: upstream, renewed, released. A dead holder (its token left in Redis, its
address refusing): taken over once the lease expired. A live holder that cannot be
reached: fetched unleased after the bound. A holder answering: streamed from it, with
the signature checked. Redis down: unleased at once, and the next misses skip Redis.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from proxy.auth.replica_auth import HEADER, ReplicaSigner
from proxy.content.fill_leases import FillLeases, LeaseOwner
from proxy.content.replica_fills import ReplicaFills
from proxy.content.singleflight import UpstreamBlob
from proxy.errors import UpstreamUnavailable
from proxy.observability.metrics import Metrics
from proxy.settings import RedisSettings
from proxy.storage.redis_client import RedisState
from tests.support.engines import RedisServer
from tests.support.registries import free_port

LEASE = 0.5
SECRET = b"shared"
SOURCES = "registry_gate_replica_fill_sources_total"

# Where a lease of the default key prefix lives.
LEASE_KEY = "registry-gate:fill:"


def fresh_digest() -> str:
    return "sha256:" + os.urandom(32).hex()


class Upstream:
    """Counts opens; sends `body`."""

    def __init__(self, body: bytes = b"upstream bytes") -> None:
        self.body = body
        self.opens = 0

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[UpstreamBlob]:
        self.opens += 1

        async def chunks() -> AsyncIterator[bytes]:
            yield self.body

        yield UpstreamBlob(len(self.body), chunks())


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = RedisState.from_settings(RedisSettings(url=redis_server.redis_url)).client
    yield client
    await client.aclose()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(version="test")


@pytest.fixture
async def make_fills(metrics: Metrics) -> AsyncIterator[Callable[[Redis], Awaitable[ReplicaFills]]]:
    made: list[ReplicaFills] = []

    async def make(redis: Redis) -> ReplicaFills:
        leases = FillLeases(redis, "b", dead_url(), LEASE)
        fills = ReplicaFills(leases, ReplicaSigner(SECRET), metrics, peer_read_timeout=5)
        await fills.start()
        made.append(fills)
        return fills

    yield make
    for fills in made:
        await fills.close()


def count(metrics: Metrics, source: str) -> float:
    value = metrics.registry.get_sample_value(SOURCES, {"source": source})
    return value or 0.0


async def read(fills: ReplicaFills, digest: str, upstream: Upstream) -> bytes:
    async with fills.source(digest, upstream.open)() as blob:
        return b"".join([chunk async for chunk in blob.chunks])


async def test_a_free_lease_is_held_while_filling_and_released(
    redis: Redis, make_fills: Callable[[Redis], Awaitable[ReplicaFills]], metrics: Metrics
) -> None:
    fills, upstream, digest = await make_fills(redis), Upstream(), fresh_digest()
    async with fills.source(digest, upstream.open)() as blob:
        assert LeaseOwner.parse(await redis.get(LEASE_KEY + digest) or b"") == fills.leases.me
        assert b"".join([chunk async for chunk in blob.chunks]) == upstream.body
    assert await redis.get(LEASE_KEY + digest) is None
    assert upstream.opens == 1 and count(metrics, "upstream") == 1


async def test_a_dead_holders_lease_is_taken_over_once_expired(
    redis: Redis, make_fills: Callable[[Redis], Awaitable[ReplicaFills]], metrics: Metrics
) -> None:
    fills, upstream, digest = await make_fills(redis), Upstream(), fresh_digest()
    dead = LeaseOwner("a", dead_url(), "0")
    await redis.set(LEASE_KEY + digest, dead.token(), px=int(LEASE * 1000))
    assert await read(fills, digest, upstream) == upstream.body
    assert upstream.opens == 1
    assert (count(metrics, "upstream"), count(metrics, "unleased")) == (1, 0)


async def test_a_live_but_unreachable_holder_is_given_up_after_the_bound(
    redis: Redis, make_fills: Callable[[Redis], Awaitable[ReplicaFills]], metrics: Metrics
) -> None:
    fills, upstream, digest = await make_fills(redis), Upstream(), fresh_digest()
    holder = FillLeases(redis, "a", dead_url(), LEASE)
    async with holder.claim(digest) as claim:
        assert claim.held
        assert await read(fills, digest, upstream) == upstream.body
        # Still the holder's: the unleased fetch did not take it.
        assert await holder.holder(digest) == holder.me.token().encode()
    assert (count(metrics, "unleased"), count(metrics, "upstream")) == (1, 0)


async def test_a_holder_that_answers_is_streamed_from_signed(
    redis: Redis, make_fills: Callable[[Redis], Awaitable[ReplicaFills]], metrics: Metrics
) -> None:
    fills, upstream, digest = await make_fills(redis), Upstream(), fresh_digest()
    body = os.urandom(3 * 1024 * 1024)
    seen: list[bool] = []

    async def endpoint(request: web.Request) -> web.StreamResponse:
        seen.append(ReplicaSigner(SECRET).verify("GET", request.path, request.headers[HEADER]))
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/_replica/fills/{digest}", endpoint)
    async with TestServer(app, host="127.0.0.1") as server:
        holder = FillLeases(redis, "a", str(server.make_url("")).rstrip("/"), LEASE)
        async with holder.claim(digest) as claim:
            assert claim.held
            assert await read(fills, digest, upstream) == body
    assert seen == [True]
    assert upstream.opens == 0 and count(metrics, "peer") == 1


async def test_a_holder_cut_mid_stream_fails_the_fill(
    redis: Redis, make_fills: Callable[[Redis], Awaitable[ReplicaFills]]
) -> None:
    fills, upstream, digest = await make_fills(redis), Upstream(), fresh_digest()

    async def endpoint(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1024 * 1024
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.abort()  # what a holder killed mid-fill looks like
        return response

    app = web.Application()
    app.router.add_get("/_replica/fills/{digest}", endpoint)
    async with TestServer(app, host="127.0.0.1") as server:
        holder = FillLeases(redis, "a", str(server.make_url("")).rstrip("/"), LEASE)
        async with holder.claim(digest):
            with pytest.raises(UpstreamUnavailable):
                await read(fills, digest, upstream)
    assert upstream.opens == 0


async def test_redis_down_fetches_unleased_and_skips_redis_for_a_while(
    make_fills: Callable[[Redis], Awaitable[ReplicaFills]],
    metrics: Metrics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    down = RedisState.from_settings(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0")).client
    try:
        fills, upstream = await make_fills(down), Upstream()
        asked: list[str] = []
        original = fills.leases.claim

        def counting_claim(digest: str) -> contextlib.AbstractAsyncContextManager[object]:
            asked.append(digest)
            return original(digest)

        monkeypatch.setattr(fills.leases, "claim", counting_claim)
        assert await read(fills, fresh_digest(), upstream) == upstream.body
        assert await read(fills, fresh_digest(), upstream) == upstream.body
        assert len(asked) == 1  # the second miss did not wait for Redis again
        assert upstream.opens == 2 and count(metrics, "unleased") == 2
    finally:
        await down.aclose()


async def test_a_former_run_of_this_replica_is_not_asked(redis: Redis, metrics: Metrics) -> None:
    hits: list[str] = []

    async def endpoint(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/_replica/fills/{digest}", endpoint)
    upstream, digest = Upstream(), fresh_digest()
    async with TestServer(app, host="127.0.0.1") as server:
        url = str(server.make_url("")).rstrip("/")
        fills = ReplicaFills(
            FillLeases(redis, "b", url, LEASE), ReplicaSigner(SECRET), metrics, peer_read_timeout=5
        )
        await fills.start()
        try:
            # Killed and restarted at the same address within the lease: its old token.
            former = LeaseOwner("b", url, "former-run")
            await redis.set(LEASE_KEY + digest, former.token(), px=int(LEASE * 1000))
            assert await read(fills, digest, upstream) == upstream.body
        finally:
            await fills.close()
    assert hits == []
    assert upstream.opens == 1 and count(metrics, "upstream") == 1
