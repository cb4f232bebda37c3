"""The `TagIndex` contract: SQLite (embedded) and Redis (shared) promise the same."""

from __future__ import annotations

import hashlib

import pytest

from proxy.errors import DigestInvalid
from proxy.names.references import Repository
from proxy.storage.manifest_cache import TagEntry
from tests.contract.conftest import TagIndexes

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ALPINE = Repository.of("docker.io", "alpine")
OTHER = Repository.of("quay.io", "alpine")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_put_get_returns_the_previous_entry(tag_indexes: TagIndexes) -> None:
    tags = tag_indexes()
    first = TagEntry(sha(b"one"), OCI_MANIFEST, 1000.0)
    second = TagEntry(sha(b"two"), "application/vnd.docker.distribution.manifest.v2+json", 2000.5)
    assert await tags.get(ALPINE, "latest") is None
    assert await tags.put(ALPINE, "latest", first) is None
    assert await tags.get(ALPINE, "latest") == first
    # Putting returns what it replaces, so a caller can tell a tag that moved.
    assert await tags.put(ALPINE, "latest", second) == first
    assert await tags.get(ALPINE, "latest") == second


async def test_entries_are_per_registry_repository_and_tag(tag_indexes: TagIndexes) -> None:
    tags = tag_indexes()
    entry = TagEntry(sha(b"one"), OCI_MANIFEST, 1000.0)
    await tags.put(ALPINE, "3.20", entry)
    await tags.put(OTHER, "latest", entry)
    assert await tags.get(ALPINE, "latest") is None
    assert await tags.get(OTHER, "3.20") is None
    assert await tags.get(Repository.of("docker.io", "alpine/x"), "3.20") is None
    await tags.put(ALPINE, "latest", entry)
    assert await tags.tags(ALPINE) == ["3.20", "latest"]
    assert await tags.tags(OTHER) == ["latest"]
    assert await tags.tags(Repository.of("docker.io", "nothing")) == []


async def test_another_handle_sees_the_entries(tag_indexes: TagIndexes) -> None:
    entry = TagEntry(sha(b"one"), OCI_MANIFEST, 1234.25)
    await tag_indexes().put(ALPINE, "latest", entry)
    other = tag_indexes()
    assert await other.get(ALPINE, "latest") == entry
    assert await other.delete(ALPINE, "latest")
    assert not await other.delete(ALPINE, "latest")
    assert await other.get(ALPINE, "latest") is None
    assert await tag_indexes().get(ALPINE, "latest") is None


async def test_a_malformed_digest_is_refused(tag_indexes: TagIndexes) -> None:
    tags = tag_indexes()
    with pytest.raises(DigestInvalid):
        await tags.put(ALPINE, "latest", TagEntry("sha256:../x", "x", 1.0))
    assert await tags.get(ALPINE, "latest") is None
