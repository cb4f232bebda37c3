"""Fixtures the scale-out modules share: the fault proxies' loop thread, an origin
registry of each module's own (tests push fresh random content there) and a counting
pass-through in front of it (`proxy`: reset and without a fault for each test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fault_proxy import FaultProxy, LoopThread
from tests.support.registries import DistributionRegistry


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
