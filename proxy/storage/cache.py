"""The cache as one unit: blob store, single-flight fills, manifests, tag and repository
indexes, opened from the storage settings and closed together.

Each part is a small protocol (`BlobStore`, `ManifestStore`, `TagIndex`,
`RepositoryIndex`, `PinStore`); the filesystem/sqlite implementations opened here are the
embedded default, and with `redis:` configured the tag and repository indexes and the
pins are the shared ones in Redis (this module is the one place that chooses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.content.singleflight import FillCoordinator, FillObserver
from proxy.names.references import Repository
from proxy.observability.metrics import Metrics
from proxy.settings import Settings, StorageSettings
from proxy.storage.blobstore import BlobStore, FilesystemBlobStore
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
from proxy.storage.redis_pins import RedisPinStore


def pin_store(settings: Settings, shared: RedisState | None = None) -> PinStore:
    """The pin store of these settings: the file (`policy.pins_path`, else under the
    storage path), or Redis written through to that file when `shared` is given."""
    path = settings.policy.pins_path
    archive = FilePinStore(path) if path else FilePinStore.under(settings.storage.path)
    return archive if shared is None else RedisPinStore(shared, archive)


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
        blobs = FilesystemBlobStore(
            root, settings.max_size, on_evict=evicted, protected=lambda: protected
        )
        await blobs.open(exclusive=exclusive)
        manifests = FilesystemManifestStore(root)
        await manifests.open()

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
        )

    async def close(self) -> None:
        """Finish fills and close every store."""
        await self.fills.close()
        await self.blobs.close()
        if self.database is not None:
            await self.database.close()
