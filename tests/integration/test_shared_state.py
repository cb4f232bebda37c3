"""Two gate processes sharing one Redis behave as one gate for short names and tags.

Replicas A and B have their own storage folders (as separate pods would) and share only a
redis-server (a key prefix per test) and the pins archive (``policy.pins_path``: one
file, as replicas on one machine share it). Their search orders are opposite (A:
docker.io first, B: registry.corp.example first) and ``team/app:1`` and
``gate/origin:latest`` exist on both with different digests, so a replica that resolved
on its own would pick a different registry than the other: only shared pins make them
agree. The hub is reached through a counting pass-through (``FaultProxy``).

What is proved (issue 12, README "Shared state"): a pin created through A is what B
resolves, also after both restart, and ``policy pins list`` shows it through Redis;
replicas racing to pin one name agree (one ``pin_created`` in all audits); a tag A
revalidated is fresh on B (no upstream request for the tag); Redis restarted empty
mid-run: pins come back from the archive, tags are asked upstream again; Redis down:
pinned names and fully-qualified pulls are served, an unpinned short name is a clear
503, a replica starts anyway, and everything is shared again once Redis is back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_cache import wait_for
from tests.support.cli import run_cli
from tests.support.engines import RedisServer
from tests.support.fault_proxy import FaultProxy, LoopThread
from tests.support.gate import GateFactory, GateProcess, policy_document
from tests.support.metrics import scrape
from tests.support.registry_client import MANIFEST_ACCEPT
from tests.support.upstreams import Upstreams
from tests.support.wire import Reply, request

HUB, CORP, QUAY = "docker.io", "registry.corp.example", "quay.io"
ACCEPT_LINES = [("Accept", mt) for mt in MANIFEST_ACCEPT]
TEAM_APP = "/v2/team/app/manifests/1"
ORIGIN = "/v2/gate/origin/manifests/latest"


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This module's own redis-server: its tests stop and empty it."""
    server = RedisServer(tmp_path_factory.mktemp("shared-redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hub_proxy(upstreams: Upstreams) -> Iterator[FaultProxy]:
    loops = LoopThread("shared-state-proxy")
    try:
        with FaultProxy(upstreams.hub.registry.url, name="hub-proxy", loop=loops) as proxy:
            yield proxy
    finally:
        loops.close()


@pytest.fixture
def live_redis(redis: RedisServer) -> Iterator[RedisServer]:
    """The module's Redis, running (a test that stopped it has it started again)."""
    if not redis.running:
        redis.start()
    yield redis
    if not redis.running:
        redis.start()


Replicas = Callable[..., GateProcess]


@pytest.fixture
def replicas(
    gate_factory: GateFactory,
    upstreams: Upstreams,
    hub_proxy: FaultProxy,
    live_redis: RedisServer,
    tmp_path: Path,
) -> Replicas:
    """``replicas(name, search)`` -> a started replica on this test's Redis prefix and
    pins archive, permissive short names, pins by anyone."""
    prefix = f"it-{uuid.uuid4().hex[:10]}:"
    archive = tmp_path / "shared" / "pins.json"
    hub_proxy.reset()

    def make(name: str, search: tuple[str, ...]) -> GateProcess:
        upstream_table = [
            {"registry": HUB, "url": hub_proxy.url},
            {"registry": CORP, "url": upstreams.corp.url},
            {"registry": QUAY, "url": upstreams.quay.url},
        ]
        config: dict[str, Any] = {
            "upstreams": upstream_table,
            "policy": {"pin_creators": "anyone", "pins_path": str(archive)},
            "redis": {"url": live_redis.redis_url, "key_prefix": prefix},
            "upload_secret": "shared-state-test-secret-" + prefix,
            "storage": {"tag_ttl": 600},
        }
        policy = {**policy_document(search), "short_name_mode": "permissive"}
        return gate_factory(config, policy=policy, name=name)

    return make


def get(gate: GateProcess, path: str, method: str = "GET") -> Reply:
    return request(gate.url, method, path, ACCEPT_LINES, timeout=30)


def digest_of(gate: GateProcess, path: str) -> str:
    reply = get(gate, path)
    assert reply.status == 200, (path, reply.status, reply.body[:300], gate.log_tail())
    digest = reply.header("Docker-Content-Digest")
    assert digest
    return digest


def fully_qualified(registry: str, path: str) -> str:
    return path.replace("/v2/", f"/v2/{registry}/", 1)


def audit(gate: GateProcess) -> list[dict[str, Any]]:
    path = Path(gate.config["audit"]["path"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pins_cli(gate: GateProcess, *args: str) -> list[dict[str, Any]]:
    (done,) = run_cli(["policy", "pins", "--config", str(gate.config_path), *args])
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture
def digests(replicas: Replicas) -> dict[tuple[str, str], str]:
    """What each registry serves for the two short names (fully-qualified pulls)."""
    probe = replicas("probe", (HUB,))
    found = {
        (registry, path): digest_of(probe, fully_qualified(registry, path))
        for registry in (HUB, CORP)
        for path in (TEAM_APP, ORIGIN)
    }
    probe.stop()
    # Different content per registry, so a digest says which registry a pull resolved to.
    assert found[(HUB, TEAM_APP)] != found[(CORP, TEAM_APP)]
    assert found[(HUB, ORIGIN)] != found[(CORP, ORIGIN)]
    return found


def test_a_pin_made_through_one_replica_is_what_the_other_resolves(
    replicas: Replicas, digests: dict[tuple[str, str], str]
) -> None:
    a = replicas("replica-a", (HUB, CORP))
    b = replicas("replica-b", (CORP, HUB))
    assert digest_of(a, TEAM_APP) == digests[(HUB, TEAM_APP)]
    # B would pick corp by its own search order (as it does for a name nobody pinned)...
    assert digest_of(b, ORIGIN) == digests[(CORP, ORIGIN)]
    # ...but follows the pin A made, and A follows B's.
    assert digest_of(b, TEAM_APP) == digests[(HUB, TEAM_APP)]
    assert digest_of(a, ORIGIN) == digests[(CORP, ORIGIN)]
    created = [r for g in (a, b) for r in audit(g) if r["event"] == "pin_created"]
    assert sorted(r["name"] for r in created) == ["gate/origin", "team/app"]

    a.stop()
    b.stop()
    a.start()
    b.start()
    assert digest_of(b, TEAM_APP) == digests[(HUB, TEAM_APP)]
    assert digest_of(a, ORIGIN) == digests[(CORP, ORIGIN)]
    listed = {p["name"]: p["repository"] for p in pins_cli(b, "list")}
    assert listed == {"team/app": f"{HUB}/team/app", "gate/origin": f"{CORP}/gate/origin"}

    # An operator's removal through Redis reaches both: B now pins by its own order.
    (removed,) = run_cli(["policy", "pins", "--config", str(a.config_path), "remove", "team/app"])
    assert removed.returncode == 0 and "removed pin team/app" in removed.stdout, removed
    assert digest_of(b, TEAM_APP) == digests[(CORP, TEAM_APP)]
    assert digest_of(a, TEAM_APP) == digests[(CORP, TEAM_APP)]
    # And a re-pin by hand too.
    (repinned,) = run_cli(
        ["policy", "pins", "--config", str(b.config_path), "set", "team/app", f"{HUB}/team/app"]
    )
    assert repinned.returncode == 0, repinned
    assert json.loads(repinned.stdout)["repository"] == f"{HUB}/team/app"
    assert digest_of(a, TEAM_APP) == digests[(HUB, TEAM_APP)]
    assert digest_of(b, TEAM_APP) == digests[(HUB, TEAM_APP)]


def test_replicas_racing_to_pin_one_name_agree(
    replicas: Replicas, digests: dict[tuple[str, str], str]
) -> None:
    a = replicas("replica-a", (HUB, CORP))
    b = replicas("replica-b", (CORP, HUB))
    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(lambda gate: digest_of(gate, ORIGIN), [a, b] * 12))
    assert len(set(results)) == 1, results
    assert results[0] in (digests[(HUB, ORIGIN)], digests[(CORP, ORIGIN)])

    def pins_created() -> list[dict[str, Any]]:
        return [r for g in (a, b) for r in audit(g) if r["event"] == "pin_created"]

    # Every pull is audited before its answer; exactly one of them created the pin.
    assert len(pins_created()) == 1, pins_created()
    (pin,) = pins_cli(a, "list")
    registry = HUB if results[0] == digests[(HUB, ORIGIN)] else CORP
    assert pin["repository"] == f"{registry}/gate/origin"


def test_a_tag_revalidated_through_one_replica_is_fresh_on_the_other(
    replicas: Replicas, hub_proxy: FaultProxy
) -> None:
    a = replicas("replica-a", (HUB,))
    b = replicas("replica-b", (HUB,))
    tag_path = "/v2/docker.io/library/alpine/manifests/3.19"
    digest = digest_of(a, tag_path)
    assert hub_proxy.count(kind="manifest", contains="/manifests/3.19") >= 1
    hub_proxy.reset()
    assert digest_of(b, tag_path) == digest
    assert get(b, tag_path, "HEAD").status == 200
    # No request for the tag reached the upstream: B only fetched the manifest itself
    # (its storage is its own), by digest, once.
    assert hub_proxy.count(kind="manifest", contains="/manifests/3.19") == 0
    assert hub_proxy.count("GET", "manifest", contains=f"/manifests/{digest}") == 1


def test_redis_restarted_empty_mid_run(
    replicas: Replicas,
    live_redis: RedisServer,
    hub_proxy: FaultProxy,
    digests: dict[tuple[str, str], str],
) -> None:
    a = replicas("replica-a", (HUB, CORP))
    b = replicas("replica-b", (CORP, HUB))
    tag_path = "/v2/docker.io/library/busybox/manifests/1.36"
    assert digest_of(a, TEAM_APP) == digests[(HUB, TEAM_APP)]
    busybox = digest_of(a, tag_path)

    live_redis.restart()  # back at once, empty
    hub_proxy.reset()

    # The pin comes back from the archive: B does not re-resolve it by its own order.
    assert digest_of(b, TEAM_APP) == digests[(HUB, TEAM_APP)]
    # The tag is gone with Redis: asked upstream again (efficiency lost, not correctness).
    assert digest_of(b, tag_path) == busybox
    assert hub_proxy.count(kind="manifest", contains="/manifests/1.36") == 1
    # Shared again from now on: a name B pins, A follows.
    assert digest_of(b, ORIGIN) == digests[(CORP, ORIGIN)]
    assert digest_of(a, ORIGIN) == digests[(CORP, ORIGIN)]


def test_redis_down(
    replicas: Replicas, live_redis: RedisServer, digests: dict[tuple[str, str], str]
) -> None:
    a = replicas("replica-a", (HUB, CORP))
    b = replicas("replica-b", (CORP, HUB))
    assert digest_of(a, TEAM_APP) == digests[(HUB, TEAM_APP)]

    live_redis.stop()
    # Pinned (in the archive): served as pinned. Fully qualified: served (tags upstream).
    assert digest_of(b, TEAM_APP) == digests[(HUB, TEAM_APP)]
    assert digest_of(b, "/v2/docker.io/library/busybox/manifests/1.36")
    # Not pinned: refused, clearly, rather than resolved by B's own order.
    refused = get(b, ORIGIN)
    assert refused.status == 503, (refused.status, refused.body)
    (error,) = refused.json()["errors"]
    assert error["code"] == "UNAVAILABLE"
    assert "not pinned" in error["message"] and "redis" in error["message"]
    metrics = scrape(b.url)
    assert metrics.value("registry_gate_shared_state_errors_total", store="pins") >= 1
    assert metrics.value("registry_gate_shared_state_errors_total", store="tags") >= 1
    # A replica starts while Redis is down, and serves what it can.
    b.restart()
    assert digest_of(b, TEAM_APP) == digests[(HUB, TEAM_APP)]
    assert "redis is unreachable at start-up" in b.log_text()
    assert "Traceback" not in a.log_text() + b.log_text()

    live_redis.start()  # back, empty
    # Within the breaker's cooldown B may still refuse; then it pins, and A follows.
    wait_for(lambda: get(b, ORIGIN).status == 200, "B to reach redis again")
    assert digest_of(b, ORIGIN) == digests[(CORP, ORIGIN)]
    assert digest_of(a, ORIGIN) == digests[(CORP, ORIGIN)]
    assert digest_of(a, TEAM_APP) == digests[(HUB, TEAM_APP)]
