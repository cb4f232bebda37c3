"""OCI 1.1 referrers on every upstream: the referrers API where the upstream has it, the
referrers tag schema (an image index under the tag `<alg>-<hex>`) where it does not.

Owns the index documents (building the answer from a fallback index, `artifactType`
filtering, adding a referrer's descriptor) and the upstream side of the fallback: reading
the fallback tag and, after a manifest with a `subject` was pushed to an upstream without
the API, writing the descriptor into it. Concurrent pushes of referrers to one subject
are serialised per subject, so none is lost: inside a process by a lock, across the
replicas of a gate (`redis:`) by a lock in Redis (the upstream offers no conditional PUT).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any
from weakref import WeakValueDictionary

from proxy.content.manifest_checks import MAX_MANIFEST_SIZE
from proxy.errors import ManifestUnknown, RegistryError, UpstreamUnavailable
from proxy.names.references import Repository, validate_digest
from proxy.storage.redis_mutex import RedisMutexes
from proxy.upstream.api import Registry

INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
IMAGE_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
# The spec limits the fallback tag to 128 characters (the tag grammar's length).
MAX_TAG = 128


def fallback_tag(digest: str) -> str:
    """The referrers tag schema's tag for a subject: `sha256:ab..` -> `sha256-ab..`."""
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}-{encoded}"[:MAX_TAG]


def empty_index() -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": []}


def encode(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def parse_index(body: bytes) -> dict[str, Any]:
    """An index document (`manifests` a list of objects), or ValueError."""
    document = json.loads(body)
    if not isinstance(document, dict) or not isinstance(document.get("manifests", []), list):
        raise ValueError("not an image index")
    document.setdefault("manifests", [])
    document["manifests"] = [m for m in document["manifests"] if isinstance(m, dict)]
    return document


def filter_by_artifact_type(document: dict[str, Any], artifact_type: str) -> dict[str, Any]:
    """The index with only the descriptors of `artifact_type`."""
    kept = [m for m in document["manifests"] if m.get("artifactType") == artifact_type]
    return {**document, "manifests": kept}


def referrer_descriptor(
    body: bytes, media_type: str, digest: str
) -> tuple[str, dict[str, Any]] | None:
    """(subject digest, descriptor for the referrers index) of a pushed manifest that
    has a `subject`; None for one that has none (or is not a JSON object)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    subject = document.get("subject")
    if not isinstance(subject, dict) or not isinstance(subject.get("digest"), str):
        return None
    try:
        # The subject names an upstream tag path: only a well-formed digest may.
        validate_digest(subject["digest"])
    except RegistryError:
        return None
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        media_type = declared
    descriptor: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(body)}
    artifact_type = document.get("artifactType")
    if not isinstance(artifact_type, str):
        # An image manifest without artifactType: its config's media type (spec 1.1).
        config = document.get("config")
        artifact_type = config.get("mediaType") if isinstance(config, dict) else None
    if isinstance(artifact_type, str):
        descriptor["artifactType"] = artifact_type
    annotations = document.get("annotations")
    if isinstance(annotations, dict):
        descriptor["annotations"] = annotations
    return subject["digest"], descriptor


def with_descriptor(document: dict[str, Any], descriptor: Mapping[str, Any]) -> dict[str, Any]:
    """The index with `descriptor` in it (replacing an entry of the same digest)."""
    kept = [m for m in document["manifests"] if m.get("digest") != descriptor["digest"]]
    return {**document, "manifests": [*kept, dict(descriptor)]}


class ReferrersFallback:
    """Reads and maintains the referrers tag schema on upstreams without the API."""

    def __init__(
        self, clients: Mapping[str, Registry], mutexes: RedisMutexes | None = None
    ) -> None:
        self.clients = clients
        # One lock per (registry, repository, subject): the read-modify-write of a
        # fallback index must not interleave, or one referrer is lost. `mutexes`: the
        # same across the replicas sharing Redis (taken inside the local lock, so a
        # process queues for Redis once per subject at a time).
        self._locks: WeakValueDictionary[tuple[str, str, str], asyncio.Lock] = WeakValueDictionary()
        self._mutexes = mutexes

    async def read(self, repository: Repository, subject: str) -> dict[str, Any] | None:
        """The fallback index of `subject`, or None when the tag does not exist."""
        client = self.clients[repository.registry]
        try:
            _, body = await client.get_manifest(
                repository, fallback_tag(subject), [INDEX_TYPE], MAX_MANIFEST_SIZE
            )
        except ManifestUnknown:
            return None
        try:
            return parse_index(body)
        except (ValueError, RecursionError) as exc:
            raise UpstreamUnavailable(
                f"upstream {client.name} holds a referrers tag that is not an image index"
            ) from exc

    async def add(
        self, repository: Repository, subject: str, descriptor: Mapping[str, Any]
    ) -> None:
        """Put `descriptor` into the fallback index of `subject` (created if missing)."""
        key = (repository.registry, repository.path, subject)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            if self._mutexes is None:
                await self._update(repository, subject, descriptor)
                return
            # SharedStateUnavailable (Redis down, or the lock held too long) is a
            # RegistryError: the caller leaves the tag to the client.
            async with self._mutexes.hold(f"referrers:{'/'.join(key)}"):
                await self._update(repository, subject, descriptor)

    async def _update(
        self, repository: Repository, subject: str, descriptor: Mapping[str, Any]
    ) -> None:
        current = await self.read(repository, subject) or empty_index()
        updated = encode(with_descriptor(current, descriptor))
        client = self.clients[repository.registry]
        await client.forward(
            "PUT",
            repository,
            f"manifests/{fallback_tag(subject)}",
            kind="manifest",
            actions=("pull", "push"),
            headers={"Content-Type": INDEX_TYPE},
            body=updated,
        )
