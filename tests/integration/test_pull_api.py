"""The pull API of the gate against real Distribution upstreams, endpoint by endpoint.

Every assertion compares what the gate serves with what the upstream itself serves
(``SeededRegistry.images``: byte-exact manifests, blob bytes from the layout), in each
addressing mode: ``?ns=`` (echoed in ``OCI-Namespace``), path prefix, and short names
resolved by the policy file's ``search`` list. Which upstream served a pull is proven by
the ``gate.origin`` config label (hub, quay and corp hold different images under the
same names). Errors must be OCI JSON, decided before anything is sent upstream, and
never carry a credential or a traceback.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.gate import (
    PRIVATE_PASSWORD_ENV,
    PRIVATE_REGISTRY,
    GateProcess,
    policy_document,
    standard_upstreams,
)
from tests.support.images import (
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    ORIGIN_LABEL,
    PushedRef,
)
from tests.support.registries import free_port
from tests.support.registry_client import MANIFEST_ACCEPT
from tests.support.upstreams import (
    MANY_TAGS,
    TOKEN_PASSWORD,
    TOKEN_USER,
    TokenUpstream,
    Upstreams,
)
from tests.support.wire import HeaderLines, Reply, raw_request, request

# One Accept line per media type, as containers/image and the Docker daemon send them.
ACCEPT_LINES: list[tuple[str, str]] = [("Accept", mt) for mt in MANIFEST_ACCEPT]
OCI_INDEX = "library/alpine:3.19"
OCI_MANIFEST = "library/busybox:1.36"
DOCKER_MANIFEST = "library/busybox:1.36-v2s2"
DOCKER_LIST = "library/alpine:3.19-v2s2"
MANIFEST_KINDS = [
    (OCI_INDEX, MT_OCI_INDEX),
    (OCI_MANIFEST, MT_OCI_MANIFEST),
    (DOCKER_MANIFEST, MT_DOCKER_MANIFEST),
    (DOCKER_LIST, MT_DOCKER_LIST),
]
# Words that only a Python traceback or a leaked secret would put in a response body.
# "eyJ" starts every JWT (base64 of '{"').
LEAK_MARKERS = ("Traceback", 'File "', TOKEN_PASSWORD, "eyJ", "Basic ")


def get(gate: GateProcess, path: str, headers: HeaderLines = (), method: str = "GET") -> Reply:
    return request(gate.url, method, path, headers)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_oci_error(reply: Reply, status: int, *codes: str) -> None:
    """``reply`` is the OCI error JSON with ``status`` and one of ``codes``."""
    assert reply.status == status, reply
    assert (reply.header("Content-Type") or "").startswith("application/json"), reply.headers
    document = reply.json()
    assert isinstance(document["errors"], list) and document["errors"], document
    for entry in document["errors"]:
        assert {"code", "message"} <= set(entry), entry
    if codes:
        assert reply.error_codes[0] in codes, reply
    assert_no_leak(reply)


def assert_no_leak(reply: Reply) -> None:
    text = reply.body.decode(errors="replace")
    for marker in LEAK_MARKERS:
        assert marker not in text, f"{marker!r} in a response body: {text[:500]}"


def repo_tag(ref: str) -> tuple[str, str]:
    repo, _, tag = ref.rpartition(":")
    return repo, tag


def path_for(mode: str, registry: str, repo: str, kind: str, ref: str) -> str:
    """The request path for ``repo`` on ``registry`` in an addressing mode."""
    if mode == "prefix":
        return f"/v2/{registry}/{repo}/{kind}/{ref}"
    if mode == "ns":
        return f"/v2/{repo}/{kind}/{ref}?ns={registry}"
    assert mode == "short"
    return f"/v2/{repo}/{kind}/{ref}"


def origin_of(gate: GateProcess, mode: str, registry: str, repo: str, ref: str) -> str:
    """The ``gate.origin`` label of ``repo:ref`` pulled through the gate (amd64 child of
    an index), fetching manifest, child and config in the same addressing mode."""
    reply = get(gate, path_for(mode, registry, repo, "manifests", ref), ACCEPT_LINES)
    assert reply.status == 200, reply
    document = reply.json()
    if "manifests" in document:
        child = next(m for m in document["manifests"] if m["platform"]["architecture"] == "amd64")
        reply = get(
            gate, path_for(mode, registry, repo, "manifests", child["digest"]), ACCEPT_LINES
        )
        assert reply.status == 200, reply
        document = reply.json()
    config = get(gate, path_for(mode, registry, repo, "blobs", document["config"]["digest"]))
    assert config.status == 200, config
    assert sha256(config.body) == document["config"]["digest"]
    return str(json.loads(config.body)["config"]["Labels"][ORIGIN_LABEL])


# -- /v2/ ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_v2_root_answers_with_the_api_version(gate: GateProcess, method: str) -> None:
    reply = get(gate, "/v2/", method=method)
    assert reply.status == 200
    assert reply.header("Docker-Distribution-API-Version") == "registry/2.0"


# -- manifests -------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize(("ref", "media_type"), MANIFEST_KINDS)
def test_manifest_get_is_byte_identical(
    gate: GateProcess, upstreams: Upstreams, ref: str, media_type: str, by: str
) -> None:
    pushed = upstreams.hub[ref]
    assert pushed.media_type == media_type
    reference = pushed.tag if by == "tag" else pushed.digest
    reply = get(gate, f"/v2/docker.io/{pushed.repo}/manifests/{reference}", ACCEPT_LINES)
    assert reply.status == 200, reply
    assert reply.body == pushed.raw
    assert reply.header("Content-Type") == media_type
    assert reply.header("Docker-Content-Digest") == pushed.digest
    assert reply.header("Content-Length") == str(len(pushed.raw))


@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize(("ref", "media_type"), MANIFEST_KINDS)
def test_manifest_head_has_headers_and_no_body(
    gate: GateProcess, upstreams: Upstreams, ref: str, media_type: str, by: str
) -> None:
    pushed = upstreams.hub[ref]
    reference = pushed.tag if by == "tag" else pushed.digest
    # A raw socket read to EOF: any byte after the headers would be a body.
    reply = raw_request(
        "127.0.0.1",
        gate.port,
        "HEAD",
        f"/v2/docker.io/{pushed.repo}/manifests/{reference}",
        ACCEPT_LINES,
    )
    assert reply.status == 200, reply
    assert reply.body == b""
    assert reply.header("Content-Length") == str(len(pushed.raw))
    assert reply.header("Content-Type") == media_type
    assert reply.header("Docker-Content-Digest") == pushed.digest


@pytest.mark.parametrize("ref", [OCI_INDEX, DOCKER_LIST])
def test_index_children_by_digest(gate: GateProcess, upstreams: Upstreams, ref: str) -> None:
    pushed = upstreams.hub[ref]
    assert len(pushed.manifest.children) == 2
    for child in pushed.manifest.children:
        reply = get(gate, f"/v2/docker.io/{pushed.repo}/manifests/{child.digest}", ACCEPT_LINES)
        assert reply.status == 200, reply
        assert reply.body == child.raw
        assert reply.header("Content-Type") == child.media_type
        assert reply.header("Docker-Content-Digest") == child.digest


def test_every_accept_line_is_forwarded(gate: GateProcess, upstreams: Upstreams) -> None:
    """Distribution returns an OCI index only when the OCI index type is accepted; the
    gate must forward all the separate Accept lines, not just the first."""
    pushed = upstreams.hub[OCI_INDEX]
    path = f"/v2/docker.io/{pushed.repo}/manifests/{pushed.tag}"
    without_index = [
        ("Accept", MT_OCI_MANIFEST),
        ("Accept", MT_DOCKER_MANIFEST),
        ("Accept", MT_DOCKER_LIST),
    ]
    reply = get(gate, path, without_index)
    assert reply.status == 404, reply
    assert reply.error_codes == ["MANIFEST_UNKNOWN"]
    assert reply.header("Content-Type") != MT_OCI_INDEX

    # The OCI index type on the last of several lines.
    reply = get(gate, path, [*without_index, ("Accept", MT_OCI_INDEX)])
    assert reply.status == 200, reply
    assert reply.header("Content-Type") == MT_OCI_INDEX
    assert reply.body == pushed.raw

    # One comma-separated line works as well.
    reply = get(gate, path, [("Accept", f"{MT_OCI_MANIFEST}, {MT_OCI_INDEX}")])
    assert reply.status == 200, reply
    assert reply.body == pushed.raw

    # Now that the index has been served (and perhaps cached), a client that does not
    # accept it still must not get it.
    for method in ("GET", "HEAD"):
        reply = get(gate, path, without_index, method=method)
        assert reply.status == 404, (method, reply)
        assert reply.header("Content-Type") != MT_OCI_INDEX


def test_unknown_manifest_is_manifest_unknown(gate: GateProcess) -> None:
    for ref in ("no-such-tag", "sha256:" + "0" * 64):
        reply = get(gate, f"/v2/docker.io/library/alpine/manifests/{ref}", ACCEPT_LINES)
        assert_oci_error(reply, 404, "MANIFEST_UNKNOWN")
    reply = get(gate, "/v2/docker.io/no/such-repo/manifests/1", ACCEPT_LINES)
    assert_oci_error(reply, 404, "MANIFEST_UNKNOWN", "NAME_UNKNOWN")


# -- blobs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer(upstreams: Upstreams) -> tuple[PushedRef, str, bytes]:
    """A busybox layer: (pushed ref, digest, bytes), at least a few hundred bytes."""
    pushed = upstreams.hub[OCI_MANIFEST]
    blob = max(pushed.manifest.layers, key=lambda b: b.size)
    data = upstreams.hub.images.blob_bytes(blob.digest)
    assert len(data) == blob.size > 64
    return pushed, blob.digest, data


@pytest.mark.parametrize("ref", [OCI_MANIFEST, DOCKER_MANIFEST])
def test_blob_get_and_head_are_byte_identical(
    gate: GateProcess, upstreams: Upstreams, ref: str
) -> None:
    pushed = upstreams.hub[ref]
    assert pushed.manifest.config is not None and len(pushed.manifest.layers) == 2
    for blob in pushed.manifest.blobs:
        path = f"/v2/docker.io/{pushed.repo}/blobs/{blob.digest}"
        reply = get(gate, path)
        assert reply.status == 200, reply
        assert reply.body == upstreams.hub.images.blob_bytes(blob.digest)
        assert reply.header("Docker-Content-Digest") == blob.digest
        assert reply.header("Content-Length") == str(blob.size)
        head = raw_request("127.0.0.1", gate.port, "HEAD", path)
        assert head.status == 200, head
        assert head.body == b""
        assert head.header("Content-Length") == str(blob.size)
        assert head.header("Docker-Content-Digest") == blob.digest


@pytest.mark.parametrize(
    ("spec", "first", "last"),
    [("bytes=10-20", 10, 20), ("bytes=10-", 10, None), ("bytes=-5", -5, None)],
)
def test_blob_range(
    gate: GateProcess,
    layer: tuple[PushedRef, str, bytes],
    spec: str,
    first: int,
    last: int | None,
) -> None:
    pushed, digest, data = layer
    size = len(data)
    reply = get(gate, f"/v2/docker.io/{pushed.repo}/blobs/{digest}", [("Range", spec)])
    assert reply.status == 206, reply
    start = first if first >= 0 else size + first
    end = last if last is not None else size - 1
    assert reply.body == data[start : end + 1]
    assert reply.header("Content-Range") == f"bytes {start}-{end}/{size}"
    assert reply.header("Content-Length") == str(end - start + 1)


def test_blob_range_unsatisfiable_is_416(
    gate: GateProcess, layer: tuple[PushedRef, str, bytes]
) -> None:
    pushed, digest, data = layer
    reply = get(
        gate,
        f"/v2/docker.io/{pushed.repo}/blobs/{digest}",
        [("Range", f"bytes={len(data) + 100}-{len(data) + 200}")],
    )
    # Read with a Content-Length: a body shorter than announced would time out here
    # (Distribution 2.8's own 416 keeps the blob's Content-Length with a short body).
    assert reply.status == 416, reply
    assert int(reply.header("Content-Length") or -1) == len(reply.body)
    assert data not in reply.body


def test_blob_range_unsatisfiable_names_the_size(
    gate: GateProcess, layer: tuple[PushedRef, str, bytes]
) -> None:
    """RFC 9110 §15.5.17: a 416 SHOULD carry ``Content-Range: bytes */<size>`` (the
    upstream sends it; clients use it to learn the size)."""
    pushed, digest, data = layer
    reply = get(
        gate,
        f"/v2/docker.io/{pushed.repo}/blobs/{digest}",
        [("Range", f"bytes={len(data) + 100}-")],
    )
    assert reply.status == 416, reply
    assert reply.header("Content-Range") == f"bytes */{len(data)}"


def test_unknown_blob_is_blob_unknown(gate: GateProcess) -> None:
    reply = get(gate, "/v2/docker.io/library/busybox/blobs/sha256:" + "1" * 64)
    assert_oci_error(reply, 404, "BLOB_UNKNOWN")


# -- tags ----------------------------------------------------------------------------------


ALL_TAGS = [f"t{i:03d}" for i in range(MANY_TAGS)]


def follow_tag_pages(gate: GateProcess, path: str) -> tuple[list[str], list[str]]:
    """Every tag reachable from ``path`` by following ``Link``; and the links seen."""
    tags: list[str] = []
    links: list[str] = []
    for _ in range(MANY_TAGS + 2):
        reply = get(gate, path)
        assert reply.status == 200, reply
        tags += reply.json()["tags"]
        link = reply.header("Link")
        if link is None:
            return tags, links
        links.append(link)
        assert link.endswith('; rel="next"'), link
        target = link[link.index("<") + 1 : link.index(">")]
        if target.startswith("http"):
            assert target.startswith(gate.url + "/v2/"), f"Link leaves the gate: {link}"
            target = target.removeprefix(gate.url)
        assert target.startswith("/v2/"), f"Link does not point at the gate: {link}"
        path = target
    raise AssertionError(f"pagination did not end: {links}")


def test_tags_list_sorted(gate: GateProcess) -> None:
    reply = get(gate, "/v2/docker.io/gate/many/tags/list")
    assert reply.status == 200, reply
    assert reply.json()["tags"] == ALL_TAGS
    assert reply.header("Link") is None


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/v2/docker.io/gate/many/tags/list?n=7", "docker.io/gate/many"),
        ("/v2/gate/many/tags/list?ns=docker.io&n=7", "gate/many"),
        ("/v2/gate/many/tags/list?n=7", "gate/many"),
    ],
    ids=["prefix", "ns", "short"],
)
def test_tags_list_paginated_with_links_to_the_gate(
    gate: GateProcess, path: str, name: str
) -> None:
    first = get(gate, path)
    assert first.status == 200, first
    assert first.json()["tags"] == ALL_TAGS[:7]
    tags, links = follow_tag_pages(gate, path)
    assert tags == ALL_TAGS
    assert len(links) == (MANY_TAGS - 1) // 7
    for link in links:
        assert f"/v2/{name}/tags/list?" in link, link
        assert "n=7" in link, link
        if "ns=" in path:
            assert "ns=docker.io" in link, f"ns dropped from the next link: {link}"
    if "ns=" in path:
        assert first.header("OCI-Namespace") == "docker.io"


def test_tags_list_last_and_n(gate: GateProcess) -> None:
    reply = get(gate, "/v2/docker.io/gate/many/tags/list?last=t025")
    assert reply.json()["tags"] == ALL_TAGS[26:]
    reply = get(gate, "/v2/docker.io/gate/many/tags/list?n=3&last=t010")
    assert reply.json()["tags"] == ["t011", "t012", "t013"]
    assert reply.header("Link") is not None
    reply = get(gate, f"/v2/docker.io/gate/many/tags/list?n=3&last={ALL_TAGS[-1]}")
    assert reply.json()["tags"] == []
    assert reply.header("Link") is None
    reply = get(gate, f"/v2/docker.io/gate/many/tags/list?n={MANY_TAGS}")
    assert reply.json()["tags"] == ALL_TAGS
    assert reply.header("Link") is None


def test_tags_list_n_zero_is_empty_without_link(gate: GateProcess) -> None:
    reply = get(gate, "/v2/docker.io/gate/many/tags/list?n=0")
    assert reply.status == 200, reply
    assert reply.json()["tags"] == []
    assert reply.header("Link") is None


@pytest.mark.parametrize("n", ["abc", "-1", "1.5", "%201"])
def test_tags_list_invalid_n_is_400(gate: GateProcess, n: str) -> None:
    reply = get(gate, f"/v2/docker.io/gate/many/tags/list?n={n}")
    assert_oci_error(reply, 400, "PAGINATION_NUMBER_INVALID")


def test_tags_list_unknown_repository(gate: GateProcess) -> None:
    reply = get(gate, "/v2/docker.io/no/such-repo/tags/list")
    assert_oci_error(reply, 404, "NAME_UNKNOWN")


# -- referrers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v2/docker.io/{repo}/referrers/{digest}",
        "/v2/{repo}/referrers/{digest}?ns=docker.io",
        "/v2/docker.io/{repo}/referrers/{digest}?artifactType=application/x-test",
        # A short name: resolved by the subject digest (busybox has no :latest).
        "/v2/{repo}/referrers/{digest}",
    ],
    ids=["prefix", "ns", "artifact-type", "short"],
)
def test_referrers_empty_index_where_upstream_lacks_the_api(
    gate: GateProcess, upstreams: Upstreams, path: str
) -> None:
    pushed = upstreams.hub[OCI_MANIFEST]
    reply = get(gate, path.format(repo=pushed.repo, digest=pushed.digest))
    assert reply.status == 200, reply
    assert reply.header("Content-Type") == MT_OCI_INDEX
    document = reply.json()
    assert document["schemaVersion"] == 2
    assert document["mediaType"] == MT_OCI_INDEX
    assert document["manifests"] == []


def test_referrers_invalid_digest(gate: GateProcess) -> None:
    reply = get(gate, "/v2/docker.io/library/busybox/referrers/not-a-digest")
    assert_oci_error(reply, 400, "DIGEST_INVALID")


# -- addressing modes ----------------------------------------------------------------------


ADDRESSING = [
    ("prefix", "docker.io", "hub"),
    ("prefix", "quay.io", "quay"),
    ("prefix", "registry.corp.example", "corp"),
    ("ns", "docker.io", "hub"),
    ("ns", "quay.io", "quay"),
    ("ns", "registry.corp.example", "corp"),
    # search: [docker.io, registry.corp.example]: the hub has gate/origin, so it wins.
    ("short", "", "hub"),
]


@pytest.mark.parametrize(("mode", "registry", "role"), ADDRESSING)
def test_addressing_modes_reach_the_right_upstream(
    gate: GateProcess, upstreams: Upstreams, mode: str, registry: str, role: str
) -> None:
    seeded = upstreams.by_role(role)
    pushed = seeded["gate/origin:latest"]
    path = path_for(mode, registry, "gate/origin", "manifests", "latest")
    reply = get(gate, path, ACCEPT_LINES)
    assert reply.status == 200, reply
    assert reply.body == pushed.raw
    assert reply.header("Docker-Content-Digest") == pushed.digest
    if mode == "ns":
        assert reply.header("OCI-Namespace") == registry
    else:
        assert reply.header("OCI-Namespace") is None
    assert origin_of(gate, mode, registry, "gate/origin", "latest") == role


def test_ns_is_echoed_on_every_pull_endpoint(gate: GateProcess, upstreams: Upstreams) -> None:
    pushed = upstreams.quay["gate/origin:latest"]
    assert pushed.manifest.config is not None
    digest = pushed.manifest.config.digest
    for method, path in [
        ("GET", "/v2/gate/origin/manifests/latest?ns=quay.io"),
        ("HEAD", f"/v2/gate/origin/manifests/{pushed.digest}?ns=quay.io"),
        ("GET", f"/v2/gate/origin/blobs/{digest}?ns=quay.io"),
        ("HEAD", f"/v2/gate/origin/blobs/{digest}?ns=quay.io"),
        ("GET", "/v2/gate/origin/tags/list?ns=quay.io"),
        ("GET", f"/v2/gate/origin/referrers/{pushed.digest}?ns=quay.io"),
    ]:
        reply = get(gate, path, ACCEPT_LINES, method=method)
        assert reply.status == 200, (method, path, reply)
        assert reply.header("OCI-Namespace") == "quay.io", (method, path)


def test_same_name_differs_per_upstream(gate: GateProcess, upstreams: Upstreams) -> None:
    """library/alpine:3.19 exists on hub and corp with different content."""
    hub, corp = upstreams.hub[OCI_INDEX], upstreams.corp[OCI_INDEX]
    assert hub.digest != corp.digest
    for mode, registry, expected in [
        ("prefix", "docker.io", hub),
        ("prefix", "registry.corp.example", corp),
        ("ns", "registry.corp.example", corp),
    ]:
        path = path_for(mode, registry, "library/alpine", "manifests", "3.19")
        reply = get(gate, path, ACCEPT_LINES)
        assert reply.status == 200, reply
        assert reply.header("Docker-Content-Digest") == expected.digest
    assert origin_of(gate, "prefix", "registry.corp.example", "library/alpine", "3.19") == "corp"


@pytest.mark.parametrize(
    "path",
    [
        "/v2/alpine/manifests/3.19",
        "/v2/library/alpine/manifests/3.19",
        "/v2/alpine/manifests/3.19?ns=docker.io",
        "/v2/library/alpine/manifests/3.19?ns=docker.io",
        "/v2/alpine/manifests/3.19?ns=index.docker.io",
        "/v2/library/alpine/manifests/3.19?ns=index.docker.io",
        "/v2/library/alpine/manifests/3.19?ns=registry-1.docker.io",
        "/v2/docker.io/alpine/manifests/3.19",
        "/v2/docker.io/library/alpine/manifests/3.19",
        "/v2/index.docker.io/library/alpine/manifests/3.19",
        "/v2/registry-1.docker.io/library/alpine/manifests/3.19",
    ],
)
def test_docker_hub_normalisation(gate: GateProcess, upstreams: Upstreams, path: str) -> None:
    pushed = upstreams.hub[OCI_INDEX]
    reply = get(gate, path, ACCEPT_LINES)
    assert reply.status == 200, reply
    assert reply.header("Docker-Content-Digest") == pushed.digest
    assert reply.body == pushed.raw
    if "ns=" in path:
        sent = path.rpartition("ns=")[2]
        assert reply.header("OCI-Namespace") == sent


def test_short_name_blobs_follow_the_manifest_resolution(
    gate: GateProcess, upstreams: Upstreams
) -> None:
    """A Docker daemon mirror asks for ``library/alpine``: manifest, child, blobs."""
    pushed = upstreams.hub[OCI_INDEX]
    child = pushed.manifest.child("amd64")
    assert origin_of(gate, "short", "", "library/alpine", "3.19") == "hub"
    for blob in child.blobs:
        reply = get(gate, f"/v2/library/alpine/blobs/{blob.digest}")
        assert reply.status == 200, reply
        assert reply.body == upstreams.hub.images.blob_bytes(blob.digest)


def test_short_name_blob_without_a_remembered_resolution(
    corp_first_gate: GateProcess, upstreams: Upstreams
) -> None:
    """A blob asked for under a short name before (or without) its manifest: a client
    that kept the manifest, a second gate replica, or a pull resumed after the gate
    restarted. The gate has to find the blob on the search registries, not 502."""
    gate = corp_first_gate
    # Never resolved on this gate; corp is first in its search list.
    pushed = upstreams.corp["team/app:1"]
    assert pushed.manifest.config is not None
    config = pushed.manifest.config.digest
    reply = get(gate, f"/v2/team/app/blobs/{config}")
    assert reply.status == 200, reply
    assert reply.body == upstreams.corp.images.blob_bytes(config)
    assert json.loads(reply.body)["config"]["Labels"][ORIGIN_LABEL] == "corp"

    # Resolved (busybox: only on the hub), then the gate restarts mid-pull.
    layer = upstreams.hub[OCI_MANIFEST].manifest.layers[0].digest
    assert get(gate, "/v2/busybox/manifests/1.36", ACCEPT_LINES).status == 200
    gate.restart()
    reply = get(gate, f"/v2/busybox/blobs/{layer}")
    assert reply.status == 200, reply
    assert reply.body == upstreams.hub.images.blob_bytes(layer)


def test_short_name_not_on_any_search_registry(gate: GateProcess) -> None:
    """coreos/etcd exists only on quay.io, which is not in the search list."""
    reply = get(gate, "/v2/coreos/etcd/manifests/v3.5.0", ACCEPT_LINES)
    assert_oci_error(reply, 404, "MANIFEST_UNKNOWN", "NAME_UNKNOWN")
    reply = get(gate, "/v2/quay.io/coreos/etcd/manifests/v3.5.0", ACCEPT_LINES)
    assert reply.status == 200, reply


@pytest.fixture(scope="module")
def corp_first_gate(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GateProcess]:
    """A gate whose policy searches corp before docker.io, while its upstream table
    lists docker.io first: only the policy file can make corp win."""
    process = GateProcess(
        tmp_path_factory.mktemp("corp-first-gate"),
        {"upstreams": standard_upstreams(upstreams)},
        policy=policy_document(["registry.corp.example", "docker.io"]),
        name="corp-first-gate",
    )
    with process:
        yield process


def test_short_names_follow_the_policy_search_order(
    corp_first_gate: GateProcess, upstreams: Upstreams
) -> None:
    """Needs the policy file's ``search`` wired into resolution (design §4)."""
    gate = corp_first_gate
    corp_app = upstreams.corp["team/app:1"]
    reply = get(gate, "/v2/team/app/manifests/1", ACCEPT_LINES)
    assert reply.status == 200, reply
    assert reply.header("Docker-Content-Digest") == corp_app.digest, (
        "short name resolved against the upstream table order, not the policy search list"
    )
    assert origin_of(gate, "short", "", "team/app", "1") == "corp"
    assert origin_of(gate, "short", "", "gate/origin", "latest") == "corp"
    # corp's library/alpine is not a candidate: `library/` belongs to docker.io only,
    # so the short name alpine means registry.corp.example/alpine there (absent).
    reply = get(gate, "/v2/alpine/manifests/3.19", ACCEPT_LINES)
    assert reply.header("Docker-Content-Digest") == upstreams.hub[OCI_INDEX].digest
    # Not on corp: the next search registry has it.
    reply = get(gate, "/v2/busybox/manifests/1.36", ACCEPT_LINES)
    assert reply.status == 200, reply
    assert reply.body == upstreams.hub[OCI_MANIFEST].raw


# -- names the gate refuses ---------------------------------------------------------------


class Listener:
    """A loopback port that records whether anything connected to it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])

    def connections(self) -> int:
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def close(self) -> None:
        self.sock.close()


WRONG_REGISTRY = "wrong.example"
WRONG_PASSWORD = "hunter2-not-the-password"


@dataclass
class AuxGate:
    gate: GateProcess
    listener: Listener


@pytest.fixture(scope="module")
def aux(
    upstreams: Upstreams, token_upstream: TokenUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuxGate]:
    """A second gate for odd upstream tables (one start instead of one per test):

    - docker.io: a port that records connections and never answers;
    - quay.io: the quay upstream; down.example: a closed port;
    - private.example: the token upstream, right password (token cache used by one test);
    - wrong.example: the token upstream with a wrong password.
    """
    listener = Listener()
    private = {
        "registry": PRIVATE_REGISTRY,
        "url": token_upstream.url,
        "username": TOKEN_USER,
        "password_env": PRIVATE_PASSWORD_ENV,
    }
    table = [
        {"registry": "docker.io", "url": f"http://127.0.0.1:{listener.port}"},
        {"registry": "quay.io", "url": upstreams.quay.url},
        {
            "registry": "down.example",
            "url": f"http://127.0.0.1:{free_port()}",
            "timeouts": {"connect": 2},
        },
        private,
        {**private, "registry": WRONG_REGISTRY, "password_env": "GATE_TEST_WRONG_PASSWORD"},
    ]
    process = GateProcess(
        tmp_path_factory.mktemp("aux-gate"),
        {"upstreams": table},
        env={PRIVATE_PASSWORD_ENV: TOKEN_PASSWORD, "GATE_TEST_WRONG_PASSWORD": WRONG_PASSWORD},
        name="aux-gate",
    )
    try:
        with process:
            yield AuxGate(process, listener)
    finally:
        listener.close()


@pytest.mark.parametrize(
    "path",
    [
        "/v2/library/alpine/manifests/3.19?ns=evil.com",
        "/v2/library/alpine/manifests/3.19?ns=10.0.0.1:5000",
        "/v2/localhost/x/manifests/latest",
        "/v2/localhost:5000/x/manifests/latest",
        "/v2/evil.com/library/alpine/manifests/3.19",
        "/v2/10.0.0.1:5000/x/blobs/sha256:" + "a" * 64,
        "/v2/evil.com/x/tags/list",
        "/v2/x/tags/list?ns=169.254.169.254",
    ],
)
def test_unknown_registry_is_name_unknown(gate: GateProcess, path: str) -> None:
    started = time.monotonic()
    reply = get(gate, path, ACCEPT_LINES)
    assert_oci_error(reply, 404, "NAME_UNKNOWN")
    # Refused by table lookup: no DNS query, no connect timeout.
    assert time.monotonic() - started < 2.0
    detail: Any = reply.json()["errors"][0].get("detail") or {}
    configured = json.dumps(detail) + " ".join(reply.error_messages)
    assert "docker.io" in configured, "the error should say which registries are configured"


def test_unknown_registry_is_never_dialled(gate: GateProcess) -> None:
    listener = Listener()
    try:
        port = listener.port
        for path in (
            f"/v2/library/alpine/manifests/3.19?ns=127.0.0.1:{port}",
            f"/v2/library/alpine/blobs/sha256:{'a' * 64}?ns=127.0.0.1:{port}",
            f"/v2/127.0.0.1:{port}/library/alpine/manifests/3.19",
            f"/v2/localhost:{port}/library/alpine/manifests/3.19",
            f"/v2/localhost:{port}/library/alpine/tags/list",
        ):
            reply = get(gate, path, ACCEPT_LINES)
            assert_oci_error(reply, 404, "NAME_UNKNOWN")
        assert listener.connections() == 0, "the gate dialled a registry it was not given"
    finally:
        listener.close()


LONG_NAME = "/".join(["a" * 50] * 6)  # 305 characters of valid components

INVALID_REQUESTS = [
    # (path sent as is, status, acceptable codes). A manifest reference that is neither a
    # tag nor a digest names nothing: 404 MANIFEST_UNKNOWN on a pull, as Distribution and
    # the conformance suite have it.
    ("/v2/docker.io/library/alpine/manifests/sha256:../../x", 400, ("NAME_INVALID",)),
    (
        "/v2/docker.io/library/alpine/blobs/sha256:../../../x",
        400,
        ("DIGEST_INVALID", "NAME_INVALID"),
    ),
    ("/v2/library/alpine/manifests/sha256:..%2F..%2Fx", 400, ("DIGEST_INVALID", "NAME_INVALID")),
    ("/v2/docker.io/library/alpine/manifests/sha256:" + "A" * 64, 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/docker.io/library/alpine/blobs/sha256:" + "ABCDEF12" * 8, 400, ("DIGEST_INVALID",)),
    ("/v2/docker.io/library/alpine/manifests/sha256:abc", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/docker.io/library/alpine/blobs/sha256:" + "a" * 65, 400, ("DIGEST_INVALID",)),
    ("/v2/docker.io/library/alpine/blobs/sha512:" + "a" * 64, 400, ("DIGEST_INVALID",)),
    ("/v2/docker.io/library/alpine/blobs/notadigest", 400, ("DIGEST_INVALID",)),
    (f"/v2/docker.io/{LONG_NAME}/manifests/latest", 400, ("NAME_INVALID",)),
    (f"/v2/{LONG_NAME}/manifests/latest", 400, ("NAME_INVALID",)),
    (f"/v2/{LONG_NAME}/tags/list?ns=docker.io", 400, ("NAME_INVALID",)),
    ("/v2/docker.io%2Flibrary%2Falpine/manifests/3.19", 400, ("NAME_INVALID",)),
    ("/v2/library%2Falpine/manifests/3.19", 400, ("NAME_INVALID",)),
    ("/v2/docker.io/library%2falpine/blobs/sha256:" + "a" * 64, 400, ("NAME_INVALID",)),
    ("/v2/docker.io/Library/Alpine/manifests/3.19", 400, ("NAME_INVALID",)),
    ("/v2/docker.io/library/alpine_/manifests/3.19", 400, ("NAME_INVALID",)),
    ("/v2/docker.io//library/alpine/manifests/3.19", 400, ("NAME_INVALID",)),
    ("/v2/docker.io/library/alpine/manifests/-bad", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/docker.io/library/alpine/manifests/.bad", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/docker.io/library/alpine/manifests/" + "t" * 129, 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/alpine/manifests/bad!tag", 404, ("MANIFEST_UNKNOWN",)),
    ("/v2/alpine/manifests/3.19?ns=not_a_host!", 400, ("NAME_INVALID",)),
]


@pytest.mark.parametrize(("path", "status", "codes"), INVALID_REQUESTS)
def test_invalid_input_is_refused(
    gate: GateProcess, path: str, status: int, codes: tuple[str, ...]
) -> None:
    reply = raw_request("127.0.0.1", gate.port, "GET", path, ACCEPT_LINES)
    assert_oci_error(reply, status, *codes)


def test_invalid_names_are_refused_before_any_upstream_call(aux: AuxGate) -> None:
    """The aux gate's docker.io is a port that records connections: a refused request
    must not open one (design §10: 400 before anything is sent upstream)."""
    for path, status, codes in INVALID_REQUESTS:
        reply = raw_request("127.0.0.1", aux.gate.port, "GET", path, ACCEPT_LINES)
        assert reply.status == status, (path, reply)
        assert reply.error_codes[0] in codes, (path, reply)
    assert aux.listener.connections() == 0


# -- the token-auth upstream -----------------------------------------------------------------


def test_token_upstream_pulled_without_client_credentials(
    gate: GateProcess, token_upstream: TokenUpstream
) -> None:
    pushed = token_upstream["team/private:1"]
    base = f"/v2/{PRIVATE_REGISTRY}/{pushed.repo}"
    reply = get(gate, f"{base}/manifests/{pushed.tag}", ACCEPT_LINES)
    assert reply.status == 200, reply
    assert reply.body == pushed.raw
    assert reply.header("Docker-Content-Digest") == pushed.digest
    reply = get(
        gate, f"/v2/{pushed.repo}/manifests/{pushed.tag}?ns={PRIVATE_REGISTRY}", ACCEPT_LINES
    )
    assert reply.status == 200, reply
    for blob in pushed.manifest.blobs:
        reply = get(gate, f"{base}/blobs/{blob.digest}")
        assert reply.status == 200, reply
        assert reply.body == token_upstream.images.blob_bytes(blob.digest)
    reply = get(gate, f"{base}/tags/list")
    assert reply.status == 200, reply
    assert reply.json()["tags"] == ["1"]


def test_token_is_cached_across_pulls(aux: AuxGate, token_upstream: TokenUpstream) -> None:
    """Only this test pulls private.example through the aux gate: its token cache
    starts empty."""
    gate = aux.gate
    issuer = token_upstream.token_issuer
    issuer.reset()
    pushed = token_upstream["team/private:1"]
    base = f"/v2/{PRIVATE_REGISTRY}/{pushed.repo}"
    for _ in range(5):
        assert get(gate, f"{base}/manifests/{pushed.tag}", ACCEPT_LINES).status == 200
        assert get(gate, f"{base}/manifests/{pushed.digest}", ACCEPT_LINES).status == 200
        head = get(gate, f"{base}/manifests/{pushed.tag}", ACCEPT_LINES, method="HEAD")
        assert head.status == 200
        for blob in pushed.manifest.blobs:
            assert get(gate, f"{base}/blobs/{blob.digest}").status == 200
    requests = issuer.requests
    # 25+ upstream requests on one scope: one token (two if a first one raced).
    assert 1 <= len(requests) <= 2, requests
    for token_request in requests:
        assert token_request.user == TOKEN_USER and token_request.authenticated
        assert token_request.scopes == (f"repository:{pushed.repo}:pull",)


def test_wrong_upstream_password_is_denied_without_leaking_it(
    aux: AuxGate, token_upstream: TokenUpstream
) -> None:
    gate = aux.gate
    pushed = token_upstream["team/private:1"]
    base = f"/v2/{WRONG_REGISTRY}/{pushed.repo}"
    assert pushed.manifest.config is not None
    for path in (
        f"{base}/manifests/{pushed.tag}",
        f"{base}/blobs/{pushed.manifest.config.digest}",
        f"{base}/tags/list",
    ):
        reply = get(gate, path, ACCEPT_LINES)
        assert_oci_error(reply, 403, "DENIED")
        assert WRONG_PASSWORD not in reply.body.decode()
        assert WRONG_REGISTRY in " ".join(reply.error_messages)
    log = gate.log_text()
    assert WRONG_PASSWORD not in log, "the upstream password was written to the gate's log"
    assert TOKEN_PASSWORD not in log


# -- upstream failures -------------------------------------------------------------------------


def test_upstream_down_is_502_naming_the_upstream(aux: AuxGate) -> None:
    gate = aux.gate
    for path in (
        "/v2/down.example/team/app/manifests/1",
        "/v2/team/app/manifests/1?ns=down.example",
        f"/v2/down.example/team/app/blobs/sha256:{'b' * 64}",
        "/v2/down.example/team/app/tags/list",
        f"/v2/down.example/team/app/referrers/sha256:{'b' * 64}",
    ):
        reply = get(gate, path, ACCEPT_LINES)
        assert reply.status in (502, 504), (path, reply)
        assert_oci_error(reply, reply.status)
        assert "down.example" in " ".join(reply.error_messages), reply
        assert "127.0.0.1" not in reply.body.decode(), (
            "the upstream URL is not the client's business"
        )


def test_upstream_down_does_not_break_the_others(aux: AuxGate, upstreams: Upstreams) -> None:
    gate = aux.gate
    reply = get(gate, "/v2/down.example/x/manifests/1", ACCEPT_LINES)
    assert reply.status == 502, reply
    reply = get(gate, "/v2/quay.io/gate/origin/manifests/latest", ACCEPT_LINES)
    assert reply.status == 200, reply
    assert reply.body == upstreams.quay["gate/origin:latest"].raw


def test_error_bodies_never_leak(gate: GateProcess, token_upstream: TokenUpstream) -> None:
    """A sweep over the error paths of the shared gate (which holds a password)."""
    paths = [
        f"/v2/{PRIVATE_REGISTRY}/team/private/manifests/nope",
        f"/v2/{PRIVATE_REGISTRY}/team/nope/tags/list",
        f"/v2/{PRIVATE_REGISTRY}/team/private/blobs/sha256:{'c' * 64}",
        "/v2/docker.io/library/alpine/manifests/sha256:../../x",
        "/v2/nope/manifests/1?ns=evil.com",
        "/v2/docker.io/library/alpine/nonsense",
        "/v2/docker.io/library/alpine/manifests/",
        "/v3/",
    ]
    for path in paths:
        reply = raw_request("127.0.0.1", gate.port, "GET", path, ACCEPT_LINES)
        assert reply.status >= 400, (path, reply)
        assert_no_leak(reply)
    assert TOKEN_PASSWORD not in gate.log_text()
