"""Smoke tests for the real-upstream fixtures themselves (no gate involved).

If these fail, every gate test built on ``upstreams``/``token_upstream`` would fail for
reasons that have nothing to do with the gate; they also pin down the fixture contract
(summary bytes == what the registry serves) other tests rely on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message

import pytest

from tests.support.images import (
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    ORIGIN_LABEL,
    PushedRef,
)
from tests.support.registries import RegistryFactory
from tests.support.registry_client import MANIFEST_ACCEPT
from tests.support.upstreams import MANY_TAGS, TokenUpstream, Upstreams


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    """GET ``url``; headers come back as a Message, whose lookups ignore case (Go's
    net/http sends ``Www-Authenticate``)."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


def fetch_manifest(host: str, repo: str, ref: str) -> tuple[int, Message, bytes]:
    return fetch(f"http://{host}/v2/{repo}/manifests/{ref}", {"Accept": ", ".join(MANIFEST_ACCEPT)})


def config_labels(host: str, pushed: PushedRef, arch: str = "amd64") -> dict[str, str]:
    manifest = pushed.manifest.child(arch) if pushed.manifest.is_index else pushed.manifest
    assert manifest.config is not None
    status, _, body = fetch(f"http://{host}/v2/{pushed.repo}/blobs/{manifest.config.digest}")
    assert status == 200
    labels: dict[str, str] = json.loads(body)["config"]["Labels"]
    return labels


def test_every_registry_answers_v2(upstreams: Upstreams) -> None:
    for seeded in upstreams.all():
        status, headers, _ = fetch(f"{seeded.url}/v2/")
        assert status == 200, seeded.role
        assert headers.get("Docker-Distribution-Api-Version") == "registry/2.0"


def test_seeded_manifests_are_byte_identical_to_summary(upstreams: Upstreams) -> None:
    checked = 0
    for seeded in upstreams.all():
        for pushed in seeded.images.refs.values():
            for ref in (pushed.tag, pushed.digest):
                status, headers, body = fetch_manifest(seeded.host, pushed.repo, ref)
                assert status == 200, (seeded.role, pushed.repo, ref)
                assert body == pushed.raw
                assert headers["Docker-Content-Digest"] == pushed.digest
                assert headers["Content-Type"] == pushed.media_type
            for child in pushed.manifest.children:
                _, _, body = fetch_manifest(seeded.host, pushed.repo, child.digest)
                assert body == child.raw
            for blob in pushed.manifest.all_blobs():
                data = seeded.images.blob_bytes(blob.digest)
                assert len(data) == blob.size
                assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest
            checked += 1
    assert checked >= 20


def test_summary_media_types(upstreams: Upstreams) -> None:
    hub = upstreams.hub
    assert hub["library/alpine:3.19"].media_type == MT_OCI_INDEX
    assert hub["library/alpine:latest"].raw == hub["library/alpine:3.19"].raw
    assert hub["library/alpine:3.19-v2s2"].media_type == MT_DOCKER_LIST
    assert hub["library/busybox:1.36"].media_type == MT_OCI_MANIFEST
    assert hub["library/busybox:1.36-v2s2"].media_type == MT_DOCKER_MANIFEST
    platforms = [c.platform for c in hub["library/alpine:3.19"].manifest.children]
    assert platforms == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    assert len(hub["library/busybox:1.36"].manifest.layers) == 2
    # Identical content on two upstreams has identical digests.
    assert upstreams.quay["library/busybox:1.36"].raw == hub["library/busybox:1.36"].raw


def test_tags_list_has_all_many_tags(upstreams: Upstreams) -> None:
    tags = upstreams.hub.client().tags("gate/many")
    assert sorted(tags) == [f"t{i:03d}" for i in range(MANY_TAGS)]
    assert upstreams.hub.images.tags("gate/many") == sorted(tags)


def test_origin_differs_per_registry(upstreams: Upstreams) -> None:
    digests = set()
    for seeded in upstreams.all():
        pushed = seeded["gate/origin:latest"]
        digests.add(pushed.digest)
        assert config_labels(seeded.host, pushed)[ORIGIN_LABEL] == seeded.role
    assert len(digests) == 3


def test_short_name_repos_differ_between_hub_and_corp(upstreams: Upstreams) -> None:
    hub, corp = upstreams.hub, upstreams.corp
    for repo_tag in ("library/alpine:3.19", "team/app:1"):
        assert hub[repo_tag].digest != corp[repo_tag].digest
        assert config_labels(hub.host, hub[repo_tag])[ORIGIN_LABEL] == "hub"
        assert config_labels(corp.host, corp[repo_tag])[ORIGIN_LABEL] == "corp"
    assert "library/alpine:3.19" not in upstreams.quay.images


def test_token_registry_demands_a_bearer_token(token_upstream: TokenUpstream) -> None:
    issuer = token_upstream.token_issuer
    pushed = token_upstream["team/private:1"]
    status, headers, _ = fetch_manifest(token_upstream.host, pushed.repo, pushed.tag)
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="{issuer.realm}"' in challenge
    assert 'scope="repository:team/private:pull"' in challenge

    before = issuer.request_count
    query = urllib.parse.urlencode(
        {"service": issuer.service, "scope": "repository:team/private:pull"}
    )
    # Anonymous callers are refused outright by this issuer.
    status, _, _ = fetch(f"{issuer.realm}?{query}")
    assert status == 401
    basic = base64.b64encode(b"gate:gate-secret").decode()
    status, _, body = fetch(f"{issuer.realm}?{query}", {"Authorization": f"Basic {basic}"})
    assert status == 200
    doc = json.loads(body)
    assert doc["token"] == doc["access_token"]
    assert doc["expires_in"] > 0
    assert issuer.request_count == before + 2
    assert issuer.last_user == "gate"
    assert issuer.last_scopes == ("repository:team/private:pull",)

    status, _, raw = fetch_manifest(token_upstream.host, pushed.repo, pushed.tag)
    assert status == 401
    status, _, raw = fetch(
        f"http://{token_upstream.host}/v2/{pushed.repo}/manifests/{pushed.tag}",
        {"Accept": ", ".join(MANIFEST_ACCEPT), "Authorization": f"Bearer {doc['token']}"},
    )
    assert status == 200
    assert raw == pushed.raw
    # The token was scoped to pull on team/private only.
    status, _, _ = fetch(
        f"http://{token_upstream.host}/v2/team/other/tags/list",
        {"Authorization": f"Bearer {doc['token']}"},
    )
    assert status == 401


def test_registry_factory_gives_an_empty_registry(registry_factory: RegistryFactory) -> None:
    reg = registry_factory(name="empty")
    status, _, body = fetch(f"{reg.url}/v2/_catalog")
    assert status == 200
    assert json.loads(body) == {"repositories": []}
    reg.stop()
    assert not reg.running


@pytest.mark.parametrize("role", ["hub", "quay", "corp"])
def test_summary_host_matches_registry(upstreams: Upstreams, role: str) -> None:
    seeded = upstreams.by_role(role)
    assert seeded.images.host == seeded.host == f"127.0.0.1:{seeded.registry.port}"
    assert upstreams.by_host(seeded.host) is seeded
