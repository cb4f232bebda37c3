"""The in-process tier: the real app (`proxy/app.py`) under aiohttp's test client, with
in-memory counting upstreams injected at the composition root (no upstream sockets).

Each test gets a fresh gate over its own cache directory, policy file and audit log.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.app import build_app, build_services
from proxy.services import Services
from proxy.settings import (
    AuditSettings,
    PolicySettings,
    Settings,
    StorageSettings,
    UpstreamSettings,
)
from proxy.storage.blobstore import BlobStore
from tests.inprocess.fake_upstream import FakeRegistry

HUB = "docker.io"
# Never dialled: the fake replaces the HTTP client built from this entry.
UNUSED_URL = "http://127.0.0.1:9"
POLICY = {
    "search": [HUB],
    "short_name_mode": "permissive",
    "default": "allow",
    "rules": [
        {"name": "no-secrets", "match": "docker.io/secret/**", "actions": ["pull"], "allow": False}
    ],
}

GateClient = TestClient[web.Request, web.Application]
# The gate keys its per-request values with strings; aiohttp warns about that, and the
# suite's `filterwarnings = error` would turn the warning into a 500 inside the app (a
# real gate process only logs it).
APP_WARNINGS = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")

AiohttpClient = Callable[..., Awaitable[GateClient]]


@dataclass
class Gate:
    """A running in-process gate: its test client, its services and its upstream."""

    client: GateClient
    services: Services
    upstream: FakeRegistry

    def use_blob_store(self, wrap: Callable[[BlobStore], BlobStore]) -> None:
        """Put a store with other capabilities in front of the cache's blobs."""
        cache = self.services.pull.cache
        cache.blobs = wrap(cache.blobs)

    async def pull(self, path: str) -> bytes:
        """GET `path` whole, and wait for the fills it started to be published (a client
        has every byte once the content verified, a moment before the blob is cached)."""
        response = await self.client.get(path)
        assert response.status == 200, await response.text()
        body = await response.read()
        await self.services.pull.cache.fills.drain()
        return body

    def metric(self, name: str, **labels: str) -> float:
        value = self.services.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(APP_WARNINGS)


@pytest.fixture
def upstream() -> FakeRegistry:
    return FakeRegistry(HUB)


@pytest.fixture
async def gate(tmp_path: Path, upstream: FakeRegistry, aiohttp_client: AiohttpClient) -> Gate:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    settings = Settings(
        upstreams=[UpstreamSettings(registry=HUB, url=UNUSED_URL)],
        storage=StorageSettings(path=tmp_path / "cache"),
        policy=PolicySettings(files=[policy], watch=False, pin_creators="anyone"),
        audit=AuditSettings(path=tmp_path / "audit.log"),
    )
    services = build_services(settings, upstreams={HUB: upstream})
    client = await aiohttp_client(build_app(settings, services))
    return Gate(client, services, upstream)
