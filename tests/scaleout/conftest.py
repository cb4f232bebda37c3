"""Fixtures the scale-out modules share: the fault proxies' loop thread, an origin
registry of each module's own (tests push fresh random content there), a counting
pass-through in front of it (`proxy`: reset and without a fault for each test), and
`push_replicas`: replicas in front of that pass-through that may push to the origin."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.test_cache import ORIGIN, upstream_table
from tests.support.engines import RedisServer, SeaweedS3
from tests.support.fault_proxy import FaultProxy, LoopThread
from tests.support.gate import policy_document
from tests.support.registries import DistributionRegistry
from tests.support.replicas import ReplicaSet


@pytest.fixture(scope="module")
def loops() -> Iterator[LoopThread]:
    thread = LoopThread("scaleout-fault-proxies")
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    registry = DistributionRegistry(tmp_path_factory.mktemp("origin"), name="origin")
    with registry:
        yield registry


@pytest.fixture(scope="module")
def proxy_module(origin: DistributionRegistry, loops: LoopThread) -> Iterator[FaultProxy]:
    with FaultProxy(lambda: origin.url, name="origin-proxy", loop=loops) as proxy:
        yield proxy


@pytest.fixture
def proxy(proxy_module: FaultProxy) -> Iterator[FaultProxy]:
    proxy_module.clear_fault()
    proxy_module.reset()
    yield proxy_module
    proxy_module.clear_fault()


@pytest.fixture
def push_replicas(
    tmp_path: Path, proxy: FaultProxy, redis_server: RedisServer, seaweed_s3: SeaweedS3
) -> Iterator[Callable[[int], ReplicaSet]]:
    """``push_replicas(count)``: started replicas (SeaweedFS + Redis) whose policy allows
    pushes to the origin (through `proxy`, by path prefix); stopped after the test."""
    started: list[ReplicaSet] = []

    def start(count: int) -> ReplicaSet:
        config = {"upstreams": upstream_table({ORIGIN: proxy}, 10.0)}
        replicas = ReplicaSet(
            tmp_path / f"set-{len(started)}",
            config,
            redis_server=redis_server,
            s3=seaweed_s3,
            count=count,
            policy=policy_document([ORIGIN]),
        )
        started.append(replicas)
        return replicas.start()

    yield start
    for replicas in started:
        replicas.stop()
