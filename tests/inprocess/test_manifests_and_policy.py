"""Manifests and decisions in process: by tag and by digest through the cache, short-name
resolution and pins, and policy refusals that never reach the upstream."""

from __future__ import annotations

import json

import pytest

from proxy.names.references import Repository
from tests.inprocess.conftest import Gate
from tests.inprocess.fake_upstream import OCI_MANIFEST

ACCEPT = {"Accept": OCI_MANIFEST}


async def test_a_manifest_by_tag_then_by_digest_is_fetched_once(gate: Gate) -> None:
    image = gate.upstream.add_image("library/app", "1", [b"layer one"])

    by_tag = await gate.client.get("/v2/docker.io/library/app/manifests/1", headers=ACCEPT)
    assert by_tag.status == 200
    assert by_tag.headers["Docker-Content-Digest"] == image.digest
    assert by_tag.headers["Content-Type"] == OCI_MANIFEST
    assert await by_tag.read() == image.manifest
    assert gate.upstream.calls == {"head_manifest": 1, "get_manifest": 1}

    by_digest = await gate.client.get(
        f"/v2/docker.io/library/app/manifests/{image.digest}", headers=ACCEPT
    )
    again = await gate.client.get("/v2/docker.io/library/app/manifests/1", headers=ACCEPT)
    head = await gate.client.head("/v2/docker.io/library/app/manifests/1", headers=ACCEPT)

    assert await by_digest.read() == image.manifest
    assert await again.read() == image.manifest
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(image.manifest))
    # The tag is fresh (storage.tag_ttl) and the manifest cached: nothing more upstream.
    assert gate.upstream.calls == {"head_manifest": 1, "get_manifest": 1}


async def test_blobs_of_a_fetched_manifest_need_no_held_check(gate: Gate) -> None:
    image = gate.upstream.add_image("library/app", "1", [b"layer one"])
    await gate.client.get("/v2/docker.io/library/app/manifests/1", headers=ACCEPT)

    layer = await gate.pull(f"/v2/docker.io/library/app/blobs/{image.layers[0]}")

    assert layer == b"layer one"
    assert gate.upstream.calls["head_blob"] == 0
    assert gate.upstream.calls["open_blob"] == 1


async def test_an_unknown_manifest_is_404(gate: Gate) -> None:
    response = await gate.client.get("/v2/docker.io/library/app/manifests/nope", headers=ACCEPT)

    assert response.status == 404
    assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"


@pytest.mark.parametrize(
    "path",
    [
        "/v2/docker.io/secret/app/manifests/1",
        "/v2/docker.io/secret/app/blobs/sha256:" + "a" * 64,
        "/v2/docker.io/secret/app/tags/list",
        "/v2/docker.io/secret/app/referrers/sha256:" + "a" * 64,
    ],
)
async def test_a_refused_pull_never_reaches_the_upstream(gate: Gate, path: str) -> None:
    gate.upstream.add_image("secret/app", "1", [b"secret layer"])

    for method in ("GET", "HEAD"):
        response = await gate.client.request(method, path)
        assert response.status == 403

    assert gate.upstream.total_calls == 0


async def test_a_refused_short_name_never_reaches_the_upstream(gate: Gate) -> None:
    gate.upstream.add_image("secret/app", "1", [b"secret layer"])

    # The one candidate is probed (it is about to be pinned), then policy refuses.
    response = await gate.client.get("/v2/secret/app/manifests/1", headers=ACCEPT)

    assert response.status == 403
    assert (await response.json())["errors"][0]["code"] == "DENIED"
    assert gate.upstream.calls == {"manifest_exists": 1}


async def test_a_short_name_resolves_pins_and_its_content_is_protected(gate: Gate) -> None:
    image = gate.upstream.add_image("library/app", "1", [b"layer one"])
    hub_app = Repository.of("docker.io", "library/app")

    first = await gate.client.get("/v2/app/manifests/1", headers=ACCEPT)
    assert await first.read() == image.manifest
    assert gate.upstream.calls["manifest_exists"] == 1
    pin = await gate.services.holder.pins.get("app")
    assert pin is not None and pin.repository == hub_app

    # Through the pin now: no probe, and the pull path keeps the pinned content cached.
    second = await gate.client.get("/v2/app/manifests/1", headers=ACCEPT)
    assert await second.read() == image.manifest
    assert gate.upstream.calls["manifest_exists"] == 1
    cache = gate.services.pull.cache
    assert hub_app in cache.pinned
    assert image.digest in cache.protected

    # A blob by the short name follows the manifest's resolution.
    layer = await gate.pull(f"/v2/app/blobs/{image.layers[0]}")
    assert layer == b"layer one"


async def test_tags_are_listed_from_the_upstream(gate: Gate) -> None:
    gate.upstream.add_image("library/app", "2", [b"two"])
    gate.upstream.add_image("library/app", "1", [b"one"])

    response = await gate.client.get("/v2/docker.io/library/app/tags/list")

    assert response.status == 200
    assert json.loads(await response.read())["tags"] == ["1", "2"]
    assert gate.upstream.calls == {"tag_page": 1}
