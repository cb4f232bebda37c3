"""Backends for the store contract suites: every implementation of a store protocol runs
the same tests (tests/contract/test_*.py).

A backend here is a factory of store objects over one shared backing: the SQLite file,
the pins file, or one Redis key prefix (unique per test, so tests share the session's
``redis_server`` without seeing each other). Two objects from one backend are two views
of the same state: two handles on one database, or two replicas on one Redis.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from proxy.settings import RedisSettings
from proxy.storage.manifest_cache import (
    IndexDatabase,
    RepositoryIndex,
    SqliteRepositoryIndex,
    SqliteTagIndex,
    TagIndex,
)
from proxy.storage.pins import FilePinStore, MemoryPinStore, PinStore
from proxy.storage.redis_client import BREAKER_FAILURES, RedisState
from proxy.storage.redis_indexes import RedisRepositoryIndex, RedisTagIndex
from proxy.storage.redis_pins import RedisPinStore
from proxy.storage.s3_client import open_bucket
from proxy.storage.s3_pins import S3PinStore
from proxy.upstream.circuit import CircuitBreaker
from tests.contract.backends import (
    CONTRACT_BUCKET,
    Backend,
    S3Backend,
    backend_named,
    ensure_bucket,
    s3_environment,
    s3_settings,
)
from tests.support.engines import RedisServer, SeaweedS3


def redis_state(
    url: str,
    prefix: str,
    *,
    cooldown: float = 0.0,
    on_error: Callable[[str], None] | None = None,
) -> RedisState:
    """A client as the gate opens one (short timeouts, one retry) on a test's prefix; its
    breaker opens as the gate's does, but tries again at once by default (``cooldown``),
    so a test sees a restarted Redis without waiting."""
    return RedisState.from_settings(
        RedisSettings(url=url, key_prefix=prefix),
        breaker=CircuitBreaker(BREAKER_FAILURES, cooldown),
        on_error=on_error,
    )


def unique_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def states(redis_server: RedisServer) -> AsyncIterator[Callable[[], RedisState]]:
    """``states()`` -> another client (replica) on this test's own key prefix."""
    prefix = unique_prefix()
    opened: list[RedisState] = []

    def make() -> RedisState:
        state = redis_state(redis_server.redis_url, prefix)
        opened.append(state)
        return state

    yield make
    for state in opened:
        await state.close()


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[IndexDatabase]:
    db = await IndexDatabase.open(tmp_path / "index.sqlite3")
    yield db
    await db.close()


TagIndexes = Callable[[], TagIndex]
RepositoryIndexes = Callable[[], RepositoryIndex]
PinStores = Callable[[], PinStore]


@pytest.fixture(params=["sqlite", "redis"])
def tag_indexes(request: pytest.FixtureRequest, tmp_path: Path) -> TagIndexes:
    """``tag_indexes()`` -> another TagIndex on this test's one backing."""
    if request.param == "sqlite":
        db: IndexDatabase = request.getfixturevalue("database")
        return lambda: SqliteTagIndex(db)
    make: Callable[[], RedisState] = request.getfixturevalue("states")
    return lambda: RedisTagIndex(make())


@pytest.fixture(params=["sqlite", "redis"])
def repository_indexes(request: pytest.FixtureRequest) -> RepositoryIndexes:
    """``repository_indexes()`` -> another RepositoryIndex on this test's one backing."""
    if request.param == "sqlite":
        db: IndexDatabase = request.getfixturevalue("database")
        return lambda: SqliteRepositoryIndex(db)
    make: Callable[[], RedisState] = request.getfixturevalue("states")
    return lambda: RedisRepositoryIndex(make())


@pytest.fixture
async def s3_pin_archives(
    seaweed_s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[], S3PinStore]]:
    """``s3_pin_archives()`` -> another S3PinStore on this test's own bucket prefix."""
    for name, value in s3_environment().items():
        monkeypatch.setenv(name, value)
    settings = s3_settings(
        seaweed_s3.endpoint, CONTRACT_BUCKET, prefix=f"pins-{uuid.uuid4().hex[:12]}/"
    )
    async with open_bucket(settings, check=False) as bucket:
        await ensure_bucket(bucket)
    opened: list[S3PinStore] = []

    def make() -> S3PinStore:
        opened.append(S3PinStore(settings))
        return opened[-1]

    yield make
    for store in opened:
        await store.close()


@pytest.fixture(params=["memory", "file", "s3", "redis", "redis+s3"])
def pin_stores(request: pytest.FixtureRequest, tmp_path: Path) -> PinStores:
    """``pin_stores()`` -> another PinStore on this test's one backing (Redis: written
    through to one archive, the pins file or a prefix of the object store)."""
    if request.param == "memory":
        memory = MemoryPinStore()
        return lambda: memory
    path = tmp_path / "pins.json"
    archive: Callable[[], PinStore] = lambda: FilePinStore(path)  # noqa: E731
    if request.param.endswith("s3"):
        archive = request.getfixturevalue("s3_pin_archives")
    if not request.param.startswith("redis"):
        return archive
    make: Callable[[], RedisState] = request.getfixturevalue("states")
    return lambda: RedisPinStore(make(), archive())


# -- content stores (blob and manifest): filesystem and S3 --------------------------------


CONTENT_BACKENDS = ["filesystem", "s3"]
# The blob store also with its accounting shared in Redis (the manifest store has none).
BLOB_BACKENDS = [*CONTENT_BACKENDS, "s3-redis"]


@pytest.fixture(params=CONTENT_BACKENDS)
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Backend]:
    # SeaweedFS starts only when an s3 case runs.
    async with backend_named(
        request.param, tmp_path, lambda: request.getfixturevalue("seaweed_s3"), monkeypatch
    ) as opened:
        yield opened


@pytest.fixture
async def s3_backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[S3Backend]:
    """The S3 backend alone, for what only an object store has (multipart uploads)."""
    async with backend_named(
        "s3", tmp_path, lambda: request.getfixturevalue("seaweed_s3"), monkeypatch
    ) as opened:
        assert isinstance(opened, S3Backend)
        yield opened


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that restart, stop or reconfigure it
    (the session's ``redis_server`` is shared)."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
