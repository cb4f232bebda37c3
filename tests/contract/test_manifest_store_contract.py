"""What every `ManifestStore` promises (filesystem and S3 alike): stored only when the
bytes hash to the digest, the media type kept, damage never served, a restart sees it."""

from __future__ import annotations

import hashlib
import json

import pytest

from proxy.errors import DigestInvalid, ManifestInvalid
from tests.contract.backends import Backend

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BODY = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_round_trip_and_reopen(backend: Backend) -> None:
    store = await backend.manifests()
    digest = sha(BODY)
    assert await store.get(digest) is None
    stored = await store.put(digest, OCI_MANIFEST, BODY)
    assert (stored.digest, stored.media_type, stored.body) == (digest, OCI_MANIFEST, BODY)
    assert await store.get(digest) == stored

    again = await backend.manifests()  # nothing in memory: reads what was stored
    assert await again.get(digest) == stored
    stats = await again.stats()
    assert (stats.count, stats.bytes >= len(BODY)) == (1, True)


async def test_sha512_and_an_unusual_media_type(backend: Backend) -> None:
    store = await backend.manifests()
    digest = "sha512:" + hashlib.sha512(BODY).hexdigest()
    media_type = "application/vnd.example+json; charset=utf-8; é=1"
    await store.put(digest, media_type, BODY)
    again = await backend.manifests()
    found = await again.get(digest)
    assert found is not None
    assert (found.media_type, found.body) == (media_type, BODY)


async def test_a_body_that_does_not_match_is_refused(backend: Backend) -> None:
    store = await backend.manifests()
    digest = sha(BODY)
    with pytest.raises(DigestInvalid):
        await store.put(digest, OCI_MANIFEST, BODY + b" ")
    with pytest.raises(ManifestInvalid):
        await store.put(digest, "bad\ntype", BODY)
    assert await store.get(digest) is None
    assert (await store.stats()).count == 0


async def test_damage_is_never_served(backend: Backend) -> None:
    store = await backend.manifests()
    digest = sha(BODY)
    await store.put(digest, OCI_MANIFEST, BODY)
    await backend.corrupt_manifest(digest)

    assert await store.verify() == [digest]
    again = await backend.manifests()
    assert await again.get(digest) is None  # and removed
    assert await again.verify() == []
    assert (await again.stats()).count == 0


async def test_verify_remove_and_delete(backend: Backend) -> None:
    store = await backend.manifests()
    good_body = BODY + b"\n"
    good, bad = sha(good_body), sha(BODY)
    await store.put(good, OCI_MANIFEST, good_body)
    await store.put(bad, OCI_MANIFEST, BODY)
    await backend.corrupt_manifest(bad)
    assert await store.verify(remove=True) == [bad]
    assert (await store.stats()).count == 1
    assert await store.delete(good) is True
    assert await store.delete(good) is False
    assert await store.get(good) is None
    assert (await store.stats()).count == 0
