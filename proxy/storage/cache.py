"""The cache as one unit: blob store, single-flight fills, manifests, tag and repository
indexes, opened from the storage settings and closed together.

Each part is a small protocol (`BlobStore`, `ManifestStore`, `TagIndex`,
`RepositoryIndex`); the filesystem/sqlite implementations opened here are the embedded
default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.content.singleflight import FillCoordinator, FillObserver
from proxy.names.references import Repository
from proxy.observability.metrics import Metrics
from proxy.settings import StorageSettings
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


@dataclass
class Cache:
    """The opened cache stores."""

    blobs: BlobStore
    fills: FillCoordinator
    manifests: ManifestStore
    tags: TagIndex
    repositories: RepositoryIndex
    database: IndexDatabase
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
    ) -> Cache:
        """Open every store under `settings.path`."""
        root = settings.path
        root.mkdir(parents=True, exist_ok=True)
        database = await IndexDatabase.open(root / "index.sqlite3")
        repositories = SqliteRepositoryIndex(database)

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
            tags=SqliteTagIndex(database),
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
        await self.database.close()
