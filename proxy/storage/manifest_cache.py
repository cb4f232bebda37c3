"""What the gate remembers about manifests, tags and repositories between requests.

Owns three small protocols, each with its embedded implementation under the storage path
(`proxy.storage.redis_indexes` implements the two indexes in Redis for several replicas):

- `ManifestStore`: manifests by digest (immutable), stored only if the bytes hash to the
  digest and checked again whenever read from disk (`<root>/manifests/<alg>/<hex>`,
  holding the media type on the first line, then the body).
- `TagIndex`: (repository, tag) -> digest, media type and when upstream last said so;
  the caller decides freshness (TTL) and how long it may serve stale.
- `RepositoryIndex`: which digests a repository is known to hold (referenced by a
  manifest fetched for it, or confirmed by its upstream), so a blob cached for one
  repository is not served through another (design §6, security.md 10).

The two indexes share one SQLite file (`<root>/index.sqlite3`) driven from one worker
thread; recent answers are kept in memory so a warm tag lookup does no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from cachetools import LRUCache

from proxy.content.manifest_checks import MAX_MANIFEST_SIZE, digest_of
from proxy.errors import DigestInvalid, ManifestInvalid
from proxy.names.references import Repository, validate_digest
from proxy.storage.durable_files import write_atomically

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_MEDIA_TYPE = 255
MANIFEST_MEMORY = 32 * 1024 * 1024
TAG_MEMORY_ENTRIES = 65536
DIGEST_MEMORY_ENTRIES = 65536
_ALGORITHMS = ("sha256", "sha512")


# -- manifests -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CachedManifest:
    """A verified manifest: its digest, media type and exact bytes."""

    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class ManifestStats:
    """What the manifest cache holds now."""

    count: int
    bytes: int


class ManifestStore(Protocol):
    """Manifests by digest."""

    async def get(self, digest: str) -> CachedManifest | None:
        """The cached manifest, or None."""
        ...

    async def put(self, digest: str, media_type: str, body: bytes) -> CachedManifest:
        """Store a manifest; DigestInvalid if `body` does not hash to `digest`."""
        ...

    async def delete(self, digest: str) -> bool:
        """Remove a manifest; whether it existed."""
        ...

    async def verify(self, *, remove: bool = False) -> list[str]:
        """Re-hash every stored manifest; the bad ones (removed when `remove`)."""
        ...

    async def stats(self) -> ManifestStats:
        """Counts for `cache stats`."""
        ...


class FilesystemManifestStore:
    """`ManifestStore` on a local directory, with the recently used ones in memory."""

    def __init__(self, root: Path, *, memory_bytes: int = MANIFEST_MEMORY) -> None:
        self._dir = root / "manifests"
        self._tmp = self._dir / ".tmp"
        self._memory: LRUCache[str, CachedManifest] = LRUCache(
            maxsize=memory_bytes, getsizeof=lambda m: len(m.body) + len(m.media_type)
        )

    async def open(self) -> None:
        """Create the layout; drop temp files a crash left behind."""
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True)
        for algorithm in _ALGORITHMS:
            (self._dir / algorithm).mkdir(exist_ok=True)
        for leftover in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

    def _path(self, digest: str) -> Path:
        algorithm, _, hexpart = validate_digest(digest).partition(":")
        return self._dir / algorithm / hexpart

    async def get(self, digest: str) -> CachedManifest | None:
        manifest = self._memory.get(digest)
        if manifest is not None:
            return manifest
        path = self._path(digest)
        manifest = await asyncio.to_thread(_read_manifest, path, digest)
        if manifest is not None:
            self._memory[digest] = manifest
        return manifest

    async def put(self, digest: str, media_type: str, body: bytes) -> CachedManifest:
        manifest = _checked(digest, media_type, body)
        path = self._path(digest)
        await asyncio.to_thread(_write_manifest, self._tmp, path, manifest)
        self._memory[digest] = manifest
        return manifest

    async def delete(self, digest: str) -> bool:
        self._memory.pop(digest, None)
        try:
            await asyncio.to_thread(self._path(digest).unlink)
        except FileNotFoundError:
            return False
        return True

    async def verify(self, *, remove: bool = False) -> list[str]:
        bad: list[str] = []
        for digest, path in await asyncio.to_thread(self._scan):
            if await asyncio.to_thread(_read_manifest, path, digest, remove=False) is None:
                bad.append(digest)
                if remove:
                    await self.delete(digest)
        return bad

    async def stats(self) -> ManifestStats:
        def count() -> ManifestStats:
            sizes = [path.stat().st_size for _, path in self._scan()]
            return ManifestStats(len(sizes), sum(sizes))

        return await asyncio.to_thread(count)

    def _scan(self) -> list[tuple[str, Path]]:
        return [
            (f"{algorithm}:{path.name}", path)
            for algorithm in _ALGORITHMS
            for path in sorted((self._dir / algorithm).iterdir())
        ]


def _checked(digest: str, media_type: str, body: bytes) -> CachedManifest:
    algorithm = validate_digest(digest).partition(":")[0]
    if len(body) > MAX_MANIFEST_SIZE:
        raise ManifestInvalid("manifest over 4 MiB", detail={"digest": digest})
    if len(media_type) > MAX_MEDIA_TYPE or not media_type.isprintable():
        raise ManifestInvalid("invalid manifest media type", detail={"digest": digest})
    actual = digest_of(body, algorithm)
    if actual != digest:
        raise DigestInvalid(
            "manifest does not match its digest", detail={"digest": digest, "received": actual}
        )
    return CachedManifest(digest, media_type, body)


def _write_manifest(tmp: Path, path: Path, manifest: CachedManifest) -> None:
    write_atomically(path, manifest.media_type.encode() + b"\n" + manifest.body, temp_dir=tmp)


def _read_manifest(path: Path, digest: str, *, remove: bool = True) -> CachedManifest | None:
    """The manifest stored at `path` if it is intact; a damaged one is removed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    header, newline, body = data.partition(b"\n")
    try:
        if not newline:
            raise ManifestInvalid("no media type line")
        return _checked(digest, header.decode(), body)
    except (UnicodeDecodeError, ManifestInvalid, DigestInvalid) as exc:
        log.error("cached manifest %s is damaged (%s)", digest, exc)
        if remove:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return None


# -- the index database ------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tags (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    tag TEXT NOT NULL,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    fetched_at REAL NOT NULL,
    PRIMARY KEY (registry, repository, tag)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS repository_digests (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (registry, repository, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS repository_digests_by_digest ON repository_digests (digest);
"""


class IndexDatabase:
    """The SQLite file behind the embedded indexes, used from one worker thread.

    One thread means statements run in the order they were submitted (a write is never
    overtaken by an older read) and the connection never crosses threads.
    """

    def __init__(self, executor: ThreadPoolExecutor, connection: sqlite3.Connection) -> None:
        self._executor = executor
        self._connection = connection
        self._closed = False

    @classmethod
    async def open(cls, path: Path) -> IndexDatabase:
        """Open (creating) the database file."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-db")

        def connect() -> sqlite3.Connection:
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(path)
            # WAL with synchronous=NORMAL: a crash of the gate loses nothing committed;
            # a power cut may lose the last moments, which only costs upstream requests.
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(_SCHEMA)
            return connection

        try:
            connection = await asyncio.get_running_loop().run_in_executor(executor, connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, connection)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` with the connection on the database thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, fn, self._connection
        )

    async def close(self) -> None:
        """Close the connection after everything submitted before (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await self.run(lambda connection: connection.close())
        self._executor.shutdown(wait=False)


# -- tags ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TagEntry:
    """What upstream said a tag pointed at, and when (wall-clock seconds)."""

    digest: str
    media_type: str
    fetched_at: float

    def age(self, now: float) -> float:
        """Seconds since upstream said so."""
        return now - self.fetched_at

    def fresh(self, now: float, ttl: float) -> bool:
        """Whether it may be served without asking upstream (a clock that went back
        counts as stale: better one HEAD too many than a tag frozen for the skew)."""
        return 0 <= self.age(now) < ttl

    def stale_ok(self, now: float, stale_limit: float) -> bool:
        """Whether it may still be served while upstream cannot be asked."""
        return 0 <= self.age(now) <= stale_limit


class TagIndex(Protocol):
    """(repository, tag) -> digest, with the time upstream last confirmed it."""

    async def get(self, repository: Repository, tag: str) -> TagEntry | None:
        """The entry, fresh or not, or None."""
        ...

    async def put(self, repository: Repository, tag: str, entry: TagEntry) -> TagEntry | None:
        """Record (or refresh) an entry; the previous one, to notice a tag that moved."""
        ...

    async def delete(self, repository: Repository, tag: str) -> bool:
        """Forget an entry; whether it existed."""
        ...

    async def tags(self, repository: Repository) -> list[str]:
        """The names known for a repository, sorted: its tags, and the entries of cached
        referrers answers (`referrers/<digest>...`, never a valid tag; filter them out
        before listing tags to a client)."""
        ...


class SqliteTagIndex:
    """`TagIndex` in the index database, recent entries in memory."""

    def __init__(self, db: IndexDatabase, *, memory_entries: int = TAG_MEMORY_ENTRIES) -> None:
        self._db = db
        self._memory: LRUCache[tuple[str, str, str], TagEntry] = LRUCache(memory_entries)
        # Bumped by every write: a read that started before a write must not put its
        # older answer into memory.
        self._generation = 0

    async def get(self, repository: Repository, tag: str) -> TagEntry | None:
        key = (repository.registry, repository.path, tag)
        entry = self._memory.get(key)
        if entry is not None:
            return entry
        generation = self._generation

        def select(connection: sqlite3.Connection) -> TagEntry | None:
            row = connection.execute(
                "SELECT digest, media_type, fetched_at FROM tags"
                " WHERE registry = ? AND repository = ? AND tag = ?",
                key,
            ).fetchone()
            return None if row is None else TagEntry(*row)

        entry = await self._db.run(select)
        if entry is not None and generation == self._generation:
            self._memory[key] = entry
        return entry

    async def put(self, repository: Repository, tag: str, entry: TagEntry) -> TagEntry | None:
        validate_digest(entry.digest)
        previous = await self.get(repository, tag)
        key = (repository.registry, repository.path, tag)
        self._generation += 1
        self._memory[key] = entry

        def upsert(connection: sqlite3.Connection) -> None:
            with connection:
                connection.execute(
                    "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?)",
                    (*key, entry.digest, entry.media_type, entry.fetched_at),
                )

        await self._db.run(upsert)
        return previous

    async def delete(self, repository: Repository, tag: str) -> bool:
        key = (repository.registry, repository.path, tag)
        self._generation += 1
        self._memory.pop(key, None)

        def remove(connection: sqlite3.Connection) -> bool:
            with connection:
                cursor = connection.execute(
                    "DELETE FROM tags WHERE registry = ? AND repository = ? AND tag = ?", key
                )
            return cursor.rowcount > 0

        return await self._db.run(remove)

    async def tags(self, repository: Repository) -> list[str]:
        def select(connection: sqlite3.Connection) -> list[str]:
            rows = connection.execute(
                "SELECT tag FROM tags WHERE registry = ? AND repository = ? ORDER BY tag",
                (repository.registry, repository.path),
            )
            return [tag for (tag,) in rows]

        return await self._db.run(select)


# -- repositories ------------------------------------------------------------------------


class RepositoryIndex(Protocol):
    """Which digests (blobs and manifests) each repository is known to hold."""

    async def record(self, repository: Repository, digests: Iterable[str]) -> None:
        """Note that `repository` holds `digests` (a manifest fetched for it referenced
        them, or its upstream answered for them)."""
        ...

    async def holds(self, repository: Repository, digest: str) -> bool:
        """Whether `repository` is known to hold `digest`."""
        ...

    async def forget(self, digest: str) -> None:
        """Drop what is known about `digest` (its blob left the cache), so any
        repository must be confirmed upstream again."""
        ...

    async def digests(self, repository: Repository) -> list[str]:
        """Every digest `repository` is known to hold."""
        ...


class SqliteRepositoryIndex:
    """`RepositoryIndex` in the index database, recent answers in memory."""

    def __init__(
        self,
        db: IndexDatabase,
        *,
        memory_entries: int = DIGEST_MEMORY_ENTRIES,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._db = db
        # digest -> repositories known to hold it (only the yes answers seen lately).
        self._memory: LRUCache[str, frozenset[Repository]] = LRUCache(memory_entries)
        self._generation = 0
        self._clock = clock or time.time

    def _remember(self, repository: Repository, digest: str) -> None:
        known = self._memory.get(digest, frozenset())
        if repository not in known:
            self._memory[digest] = known | {repository}

    async def record(self, repository: Repository, digests: Iterable[str]) -> None:
        wanted = sorted({validate_digest(digest) for digest in digests})
        if not wanted:
            return
        for digest in wanted:
            self._remember(repository, digest)
        now = self._clock()
        rows = [(repository.registry, repository.path, digest, now) for digest in wanted]

        def insert(connection: sqlite3.Connection) -> None:
            with connection:
                connection.executemany(
                    "INSERT OR REPLACE INTO repository_digests VALUES (?, ?, ?, ?)", rows
                )

        await self._db.run(insert)

    async def holds(self, repository: Repository, digest: str) -> bool:
        if repository in self._memory.get(digest, frozenset()):
            return True
        generation = self._generation

        def select(connection: sqlite3.Connection) -> bool:
            row = connection.execute(
                "SELECT 1 FROM repository_digests"
                " WHERE registry = ? AND repository = ? AND digest = ?",
                (repository.registry, repository.path, digest),
            ).fetchone()
            return row is not None

        found = await self._db.run(select)
        if found and generation == self._generation:
            self._remember(repository, digest)
        return found

    async def digests(self, repository: Repository) -> list[str]:
        def select(connection: sqlite3.Connection) -> list[str]:
            rows = connection.execute(
                "SELECT digest FROM repository_digests WHERE registry = ? AND repository = ?",
                (repository.registry, repository.path),
            ).fetchall()
            return [str(row[0]) for row in rows]

        return await self._db.run(select)

    async def forget(self, digest: str) -> None:
        self._generation += 1
        self._memory.pop(digest, None)

        def remove(connection: sqlite3.Connection) -> None:
            with connection:
                connection.execute("DELETE FROM repository_digests WHERE digest = ?", (digest,))

        await self._db.run(remove)
