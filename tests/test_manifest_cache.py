"""Manifest store (verified by digest), tag index (TTL, stale), repository index; all of
them survive a restart."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.errors import DigestInvalid, ManifestInvalid
from proxy.names.references import Repository
from proxy.storage.manifest_cache import (
    FilesystemManifestStore,
    IndexDatabase,
    SqliteRepositoryIndex,
    SqliteTagIndex,
    TagEntry,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ALPINE = Repository.of("docker.io", "alpine")
OTHER = Repository.of("quay.io", "org/app")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


BODY = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()


@pytest.fixture
async def manifests(tmp_path: Path) -> FilesystemManifestStore:
    store = FilesystemManifestStore(tmp_path)
    await store.open()
    return store


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[IndexDatabase]:
    db = await IndexDatabase.open(tmp_path / "index.sqlite3")
    yield db
    await db.close()


# -- manifests -----------------------------------------------------------------------


async def test_manifest_round_trip_and_restart(
    manifests: FilesystemManifestStore, tmp_path: Path
) -> None:
    digest = sha(BODY)
    assert await manifests.get(digest) is None
    stored = await manifests.put(digest, OCI_MANIFEST, BODY)
    assert (stored.digest, stored.media_type, stored.body) == (digest, OCI_MANIFEST, BODY)
    assert await manifests.get(digest) == stored

    reopened = FilesystemManifestStore(tmp_path)
    await reopened.open()
    assert await reopened.get(digest) == stored
    stats = await reopened.stats()
    assert stats.count == 1
    assert await reopened.delete(digest)
    assert not await reopened.delete(digest)
    assert await reopened.get(digest) is None


async def test_manifest_that_does_not_match_its_digest_is_refused(
    manifests: FilesystemManifestStore, tmp_path: Path
) -> None:
    wanted = sha(BODY)
    with pytest.raises(DigestInvalid):
        await manifests.put(wanted, OCI_MANIFEST, BODY + b" ")
    assert await manifests.get(wanted) is None
    assert list((tmp_path / "manifests" / "sha256").iterdir()) == []


async def test_sha512_manifest(manifests: FilesystemManifestStore) -> None:
    digest = "sha512:" + hashlib.sha512(BODY).hexdigest()
    await manifests.put(digest, OCI_MANIFEST, BODY)
    assert (await manifests.get(digest)) is not None


@pytest.mark.parametrize(
    ("media_type", "body"),
    [("bad\ntype", BODY), ("x" * 300, BODY), (OCI_MANIFEST, b" " * (4 * 1024 * 1024 + 1))],
    ids=["newline in media type", "long media type", "over 4 MiB"],
)
async def test_manifest_shape_limits(
    manifests: FilesystemManifestStore, media_type: str, body: bytes
) -> None:
    with pytest.raises(ManifestInvalid):
        await manifests.put(sha(body), media_type, body)


async def test_damaged_manifest_on_disk_is_never_served(
    manifests: FilesystemManifestStore, tmp_path: Path
) -> None:
    digest = sha(BODY)
    await manifests.put(digest, OCI_MANIFEST, BODY)
    path = tmp_path / "manifests" / "sha256" / digest.removeprefix("sha256:")
    path.write_bytes(path.read_bytes()[:-1] + b"!")

    assert await manifests.verify() == [digest]
    reopened = FilesystemManifestStore(tmp_path)  # nothing in memory: reads the file
    await reopened.open()
    assert await reopened.get(digest) is None
    assert not path.exists()
    assert await reopened.verify() == []


# -- tags ------------------------------------------------------------------------------


def test_tag_entry_freshness() -> None:
    entry = TagEntry(sha(BODY), OCI_MANIFEST, fetched_at=1000.0)
    assert entry.fresh(1000.0, ttl=60)
    assert entry.fresh(1059.9, ttl=60)
    assert not entry.fresh(1060.0, ttl=60)
    assert not entry.fresh(999.0, ttl=60)  # the clock went back: revalidate
    assert entry.stale_ok(1060.0, stale_limit=3600)
    assert entry.stale_ok(4600.0, stale_limit=3600)
    assert not entry.stale_ok(4600.1, stale_limit=3600)
    assert not TagEntry(sha(BODY), OCI_MANIFEST, 1000.0).fresh(1000.0, ttl=0)


async def test_tag_index_put_get_and_persistence(db: IndexDatabase, tmp_path: Path) -> None:
    tags = SqliteTagIndex(db)
    first = TagEntry(sha(b"one"), OCI_MANIFEST, 1000.0)
    second = TagEntry(sha(b"two"), OCI_MANIFEST, 2000.0)
    assert await tags.get(ALPINE, "latest") is None
    assert await tags.put(ALPINE, "latest", first) is None
    assert await tags.get(ALPINE, "latest") == first
    # Putting returns what it replaces, so a caller can tell a tag that moved.
    assert await tags.put(ALPINE, "latest", second) == first
    await tags.put(ALPINE, "3.20", first)
    await tags.put(OTHER, "latest", first)
    assert await tags.tags(ALPINE) == ["3.20", "latest"]
    await db.close()

    reopened_db = await IndexDatabase.open(tmp_path / "index.sqlite3")
    try:
        reopened = SqliteTagIndex(reopened_db)
        assert await reopened.get(ALPINE, "latest") == second
        assert await reopened.get(OTHER, "latest") == first
        assert await reopened.get(OTHER, "3.20") is None
        assert await reopened.delete(ALPINE, "latest")
        assert not await reopened.delete(ALPINE, "latest")
        assert await reopened.get(ALPINE, "latest") is None
    finally:
        await reopened_db.close()


async def test_tag_index_rejects_a_malformed_digest(db: IndexDatabase) -> None:
    with pytest.raises(DigestInvalid):
        await SqliteTagIndex(db).put(ALPINE, "latest", TagEntry("sha256:../x", "x", 1.0))


# -- repositories ----------------------------------------------------------------------


async def test_repository_index(db: IndexDatabase, tmp_path: Path) -> None:
    repos = SqliteRepositoryIndex(db, clock=lambda: 42.0)
    layer, config = sha(b"layer"), sha(b"config")
    await repos.record(ALPINE, [layer, config, layer])
    assert await repos.holds(ALPINE, layer)
    assert await repos.holds(ALPINE, config)
    # Known for one repository says nothing about another, even on the same registry.
    assert not await repos.holds(OTHER, layer)
    assert not await repos.holds(Repository.of("docker.io", "busybox"), layer)
    await repos.record(OTHER, [layer])
    assert await repos.holds(OTHER, layer)

    await db.close()
    db = await IndexDatabase.open(tmp_path / "index.sqlite3")
    fresh = SqliteRepositoryIndex(db)  # after a restart: answers from the database
    assert await fresh.holds(ALPINE, config)
    await fresh.forget(layer)
    assert not await fresh.holds(ALPINE, layer)
    assert not await fresh.holds(OTHER, layer)
    assert await fresh.holds(ALPINE, config)
    with pytest.raises(DigestInvalid):
        await fresh.record(ALPINE, ["sha256:nothex"])
    await db.close()
