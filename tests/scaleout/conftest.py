"""Fixtures the scale-out modules share: the fault proxies' loop thread and an origin
registry of each module's own (tests push fresh random content there)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fault_proxy import LoopThread
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
