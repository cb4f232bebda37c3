"""proxy/storage/redis_ratelimits.py: the upstream rate-limit budget replicas share.

Two replicas (two `SharedRateLimits`, each with its own `Metrics`) on one real
redis-server: what one saw in a `ratelimit-remaining` header is what the other's scrape
reports; only configured upstreams become labels; a damaged entry or a Redis that is down
never fails a scrape.
"""

from __future__ import annotations

import uuid

from proxy.observability.metrics import Metrics
from proxy.settings import RedisSettings
from proxy.storage.redis_client import RedisState
from proxy.storage.redis_ratelimits import SharedRateLimits
from tests.support.engines import RedisServer
from tests.support.registries import free_port

UPSTREAMS = frozenset({"docker.io", "quay.io"})


def remaining(metrics: Metrics, upstream: str) -> float | None:
    return metrics.registry.get_sample_value(
        "registry_gate_upstream_ratelimit_remaining", {"upstream": upstream}
    )


def replica(url: str, prefix: str) -> tuple[SharedRateLimits, Metrics, RedisState]:
    metrics = Metrics(process_collectors=False)
    shared = RedisState.from_settings(RedisSettings(url=url, key_prefix=prefix))
    return SharedRateLimits(shared, metrics, UPSTREAMS), metrics, shared


async def test_a_budget_one_replica_saw_is_what_every_replica_reports(
    redis_server: RedisServer,
) -> None:
    prefix = f"rl-{uuid.uuid4().hex[:8]}:"
    a, a_metrics, a_shared = replica(redis_server.redis_url, prefix)
    b, b_metrics, b_shared = replica(redis_server.redis_url, prefix)
    try:
        a.observe_ratelimit("docker.io", "76;w=21600")
        await a.close()  # the batched write is done
        assert remaining(a_metrics, "docker.io") == 76
        assert remaining(b_metrics, "docker.io") is None
        await b.refresh()
        assert remaining(b_metrics, "docker.io") == 76

        # B sees a lower budget later: both report it after a scrape.
        b.observe_ratelimit("docker.io", "41;w=21600")
        await b.close()
        await a.refresh()
        assert remaining(a_metrics, "docker.io") == 41

        # Entries that are not a configured upstream, or not ours, are skipped.
        key = a_shared.key("ratelimit")
        await a_shared.client.hset(key, mapping={"evil.example": '{"remaining": 1, "at": 0}'})
        await a_shared.client.hset(key, mapping={"quay.io": "not json"})
        await b.refresh()
        assert remaining(b_metrics, "evil.example") is None
        assert remaining(b_metrics, "quay.io") is None
        assert remaining(b_metrics, "docker.io") == 41
    finally:
        await a_shared.close()
        await b_shared.close()


async def test_redis_down_leaves_each_replica_its_own_view() -> None:
    limits, metrics, shared = replica(f"redis://127.0.0.1:{free_port()}/0", "rl:")
    try:
        limits.observe_ratelimit("docker.io", "9")
        await limits.close()
        await limits.refresh()
        assert remaining(metrics, "docker.io") == 9
    finally:
        await shared.close()


def test_malformed_headers_share_nothing() -> None:
    metrics = Metrics(process_collectors=False)
    shared = RedisState.from_settings(RedisSettings(url="redis://127.0.0.1:1/0"))
    limits = SharedRateLimits(shared, metrics, UPSTREAMS)
    limits.observe_ratelimit("docker.io", "lots")  # no event loop needed: nothing to write
    assert remaining(metrics, "docker.io") is None
