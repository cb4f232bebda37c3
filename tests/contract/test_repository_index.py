"""The `RepositoryIndex` contract: SQLite (embedded) and Redis (shared) promise the same."""

from __future__ import annotations

import hashlib

import pytest

from proxy.errors import DigestInvalid
from proxy.names.references import Repository
from tests.contract.conftest import RepositoryIndexes

ALPINE = Repository.of("docker.io", "alpine")
OTHER = Repository.of("quay.io", "alpine")
BUSYBOX = Repository.of("docker.io", "busybox")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_record_and_holds(repository_indexes: RepositoryIndexes) -> None:
    repos = repository_indexes()
    layer, config = sha(b"layer"), sha(b"config")
    await repos.record(ALPINE, [layer, config, layer])
    assert await repos.holds(ALPINE, layer)
    assert await repos.holds(ALPINE, config)
    # Known for one repository says nothing about another, even on the same registry.
    assert not await repos.holds(OTHER, layer)
    assert not await repos.holds(BUSYBOX, layer)
    await repos.record(OTHER, [layer])
    assert await repos.holds(OTHER, layer)
    assert sorted(await repos.digests(ALPINE)) == sorted([layer, config])
    assert await repos.digests(BUSYBOX) == []
    await repos.record(BUSYBOX, [])  # nothing to record is not an error


async def test_forget_removes_the_digest_from_every_repository(
    repository_indexes: RepositoryIndexes,
) -> None:
    layer, config = sha(b"layer"), sha(b"config")
    writer = repository_indexes()
    for repository in (ALPINE, OTHER, BUSYBOX):
        await writer.record(repository, [layer, config])
    reader = repository_indexes()  # another handle (another replica)
    assert await reader.holds(BUSYBOX, layer)
    await reader.forget(layer)
    for repository in (ALPINE, OTHER, BUSYBOX):
        assert not await reader.holds(repository, layer)
        assert await reader.holds(repository, config)
        assert await reader.digests(repository) == [config]
    # Recorded again after being forgotten: held again.
    await writer.record(OTHER, [layer])
    assert await repository_indexes().holds(OTHER, layer)
    assert not await repository_indexes().holds(ALPINE, layer)
    await reader.forget(sha(b"never recorded"))


async def test_a_malformed_digest_is_refused(repository_indexes: RepositoryIndexes) -> None:
    repos = repository_indexes()
    with pytest.raises(DigestInvalid):
        await repos.record(ALPINE, [sha(b"fine"), "sha256:nothex"])
    assert await repos.digests(ALPINE) == []
