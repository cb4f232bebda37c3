"""The cache as one unit: blob store, single-flight fills, manifests, tag and repository
indexes, opened from the storage settings and closed together.

Each part is a small protocol (`BlobStore`, `ManifestStore`, `TagIndex`,
`RepositoryIndex`, `PinStore`). This module is the one place that chooses them (the
gate and the `cache` commands both open the cache through `Cache.open`):
`storage.backend` names the content stores, `filesystem` (the embedded default) or `s3`
(blobs and manifests in an object store); with `redis:` configured the tag and
repository indexes and the pins are the shared ones in Redis, and so is the blob
accounting of an `s3` store (`RedisLedger`: the replicas sharing the bucket share its
cap); otherwise sqlite under `storage.path` and in-process accounting. A filesystem
store keeps in-process accounting even with `redis:` (each replica has its own disk).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from proxy.content.singleflight import FillCoordinator, FillObserver
from proxy.names.references import Repository
from proxy.observability.metrics import Metrics
from proxy.settings import Settings, StorageSettings
from proxy.storage.blobstore import BlobStore, EvictHook, FilesystemBlobStore
from proxy.storage.ledger import BlobLedger, MemoryLedger
from proxy.storage.manifest_cache import (
    FilesystemManifestStore,
    IndexDatabase,
    ManifestStore,
    RepositoryIndex,
    SqliteRepositoryIndex,
    SqliteTagIndex,
    TagIndex,
)
from proxy.storage.pins import FilePinStore, PinStore
from proxy.storage.redis_client import RedisState
from proxy.storage.redis_indexes import RedisRepositoryIndex, RedisTagIndex
from proxy.storage.redis_ledger import RedisLedger
from proxy.storage.redis_pins import RedisPinStore
from proxy.storage.s3 import S3BlobStore, S3ManifestStore
from proxy.storage.s3_client import open_bucket
from proxy.storage.s3_pins import S3PinStore


def pin_store(settings: Settings, shared: RedisState | None = None) -> PinStore:
    """The pin store of these settings: the file (`policy.pins_path`, else under the
    storage path); with `shared`, Redis written through to an archive: the object store
    on the `s3` backend unless `policy.pins_path` names a (shared) file, else that file."""
    path = settings.policy.pins_path
    storage = settings.storage
    archive: PinStore
    if shared is not None and path is None and storage.s3 is not None:
        archive = S3PinStore(storage.s3)
    else:
        archive = FilePinStore(path) if path else FilePinStore.under(storage.path)
    return archive if shared is None else RedisPinStore(shared, archive)


async def close_pin_store(pins: PinStore) -> None:
    """Close what `pin_store` opened beyond the Redis client (the archive's S3 client)."""
    if isinstance(pins, RedisPinStore) and isinstance(pins.archive, S3PinStore):
        await pins.archive.close()


@dataclass
class Cache:
    """The opened cache stores."""

    blobs: BlobStore
    fills: FillCoordinator
    manifests: ManifestStore
    tags: TagIndex
    repositories: RepositoryIndex
    database: IndexDatabase | None
    tag_ttl: float
    stale_limit: float
    # Blobs of pinned repositories are never evicted: a pin promises the same image.
    pinned: set[Repository] = field(default_factory=set)
    protected: set[str] = field(default_factory=set)
    # What the stores share and is closed after them (the object store's client).
    resources: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def protect(self, repository: Repository) -> None:
        """Keep every digest `repository` holds (now and later) out of eviction."""
        if repository in self.pinned:
            return
        self.pinned.add(repository)
        self.protected.update(await self.repositories.digests(repository))

    async def record(self, repository: Repository, digests: Sequence[str]) -> None:
        """Note what a repository holds (and protect it when the repository is pinned)."""
        await self.repositories.record(repository, digests)
        if repository in self.pinned:
            self.protected.update(digests)

    @classmethod
    async def open(
        cls,
        settings: StorageSettings,
        metrics: Metrics | None,
        *,
        exclusive: bool = True,
        on_fill_finished: FillObserver | None = None,
        shared: RedisState | None = None,
    ) -> Cache:
        """Open every store under `settings.path` (the indexes in Redis when `shared`)."""
        root = settings.path
        root.mkdir(parents=True, exist_ok=True)
        database: IndexDatabase | None = None
        tags: TagIndex
        repositories: RepositoryIndex
        if shared is not None:
            expire_after = settings.tag_ttl + settings.stale_limit
            tags = RedisTagIndex(shared, expire_after=expire_after)
            repositories = RedisRepositoryIndex(shared)
        else:
            database = await IndexDatabase.open(root / "index.sqlite3")
            tags, repositories = SqliteTagIndex(database), SqliteRepositoryIndex(database)

        async def evicted(digest: str, size: int) -> None:
            # An evicted blob is no longer known to be held: the next request re-checks.
            await repositories.forget(digest)
            if metrics is not None:
                metrics.cache_evictions.inc()

        protected: set[str] = set()
        resources = contextlib.AsyncExitStack()
        if isinstance(tags, RedisTagIndex):
            # Warm tags from this replica's memory while every tag write's notice arrives.
            tags.start()
            resources.push_async_callback(tags.close)
        try:
            blobs, manifests = await _content_stores(
                settings, resources, evicted, lambda: protected, exclusive=exclusive, shared=shared
            )
        except BaseException:
            await resources.aclose()
            if database is not None:
                await database.close()
            raise

        fills = FillCoordinator(blobs, on_fill_finished=on_fill_finished)
        return cls(
            blobs=blobs,
            fills=fills,
            manifests=manifests,
            tags=tags,
            repositories=repositories,
            database=database,
            tag_ttl=settings.tag_ttl,
            stale_limit=settings.stale_limit,
            protected=protected,
            resources=resources,
        )

    async def close(self) -> None:
        """Finish fills and close every store."""
        await self.fills.close()
        await self.blobs.close()
        await self.resources.aclose()
        if self.database is not None:
            await self.database.close()


async def _content_stores(
    settings: StorageSettings,
    resources: contextlib.AsyncExitStack,
    on_evict: EvictHook,
    protected: Callable[[], Collection[str]],
    *,
    exclusive: bool,
    shared: RedisState | None = None,
) -> tuple[BlobStore, ManifestStore]:
    """The blob and manifest stores `storage.backend` names, opened."""
    blobs: FilesystemBlobStore | S3BlobStore
    manifests: FilesystemManifestStore | S3ManifestStore
    if settings.backend == "s3":
        assert settings.s3 is not None  # the settings refuse s3 without it
        bucket = await resources.enter_async_context(open_bucket(settings.s3))
        ledger: BlobLedger = MemoryLedger()
        if shared is not None:
            # One bucket, one cap: the replicas sharing it account in one Redis ledger.
            ledger = RedisLedger(shared.client, key_prefix=shared.prefix)
            resources.push_async_callback(ledger.close)
        # Fills in progress are spooled locally for their readers.
        blobs = S3BlobStore(
            bucket,
            settings.path / "s3-spool",
            settings.max_size,
            on_evict=on_evict,
            protected=protected,
            ledger=ledger,
        )
        manifests = S3ManifestStore(bucket)
    else:
        blobs = FilesystemBlobStore(
            settings.path, settings.max_size, on_evict=on_evict, protected=protected
        )
        manifests = FilesystemManifestStore(settings.path)
    await blobs.open(exclusive=exclusive)
    await manifests.open()
    return blobs, manifests
