"""proxy/content/manifest_checks.py: what the gate checks in an upstream manifest (security.md)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from proxy.content.manifest_checks import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    bare_media_type,
    digest_of,
    inspect_manifest,
)
from proxy.errors import UpstreamUnavailable

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
UPSTREAM = "quay.io"


def d(char: str) -> str:
    return "sha256:" + char * 64


def image_manifest(media_type: str | None = OCI_MANIFEST, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": d("c"),
            "size": 1,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": d("1"),
                "size": 2,
            },
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": d("2"),
                "size": 3,
            },
        ],
    }
    if media_type is not None:
        doc["mediaType"] = media_type
    doc.update(extra)
    return doc


def index(media_type: str | None = OCI_INDEX, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": d("a"), "size": 10, "platform": {"os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": d("b"), "size": 11},
        ],
    }
    if media_type is not None:
        doc["mediaType"] = media_type
    doc.update(extra)
    return doc


def body_of(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def refused(
    body: bytes, content_type: str | None, requested: str | None = None
) -> UpstreamUnavailable:
    with pytest.raises(UpstreamUnavailable) as info:
        inspect_manifest(body, content_type, requested, UPSTREAM)
    error = info.value
    assert (error.code, error.status) == ("UNAVAILABLE", 502)
    assert UPSTREAM in error.message
    return error


# --- helpers -----------------------------------------------------------------------------


def test_digest_of() -> None:
    assert digest_of(b"abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert digest_of(b"abc", "sha512") == "sha512:" + hashlib.sha512(b"abc").hexdigest()


@pytest.mark.parametrize(
    ("header", "bare"),
    [
        (None, ""),
        ("", ""),
        (OCI_MANIFEST, OCI_MANIFEST),
        (f"{OCI_MANIFEST}; charset=utf-8", OCI_MANIFEST),
        ("  Application/VND.OCI.Image.Manifest.v1+JSON ; x=y", OCI_MANIFEST),
    ],
)
def test_bare_media_type(header: str | None, bare: str) -> None:
    assert bare_media_type(header) == bare


def test_type_sets() -> None:
    assert {OCI_INDEX, DOCKER_LIST} == INDEX_TYPES
    assert {OCI_MANIFEST, DOCKER_MANIFEST} == MANIFEST_TYPES


# --- accepted manifests and what they reference -------------------------------------------


def test_image_manifest_blobs_extracted() -> None:
    body = body_of(image_manifest())
    info = inspect_manifest(body, OCI_MANIFEST, None, UPSTREAM)
    assert info.digest == digest_of(body)
    assert info.media_type == OCI_MANIFEST
    assert info.size == len(body)
    assert info.blobs == (d("c"), d("1"), d("2"))
    assert info.children == ()


def test_index_children_extracted() -> None:
    body = body_of(index())
    info = inspect_manifest(body, OCI_INDEX, None, UPSTREAM)
    assert info.media_type == OCI_INDEX
    assert info.children == (d("a"), d("b"))
    assert info.blobs == ()


def test_docker_types() -> None:
    body = body_of(image_manifest(DOCKER_MANIFEST))
    assert inspect_manifest(body, DOCKER_MANIFEST, None, UPSTREAM).media_type == DOCKER_MANIFEST
    body = body_of(index(DOCKER_LIST))
    assert inspect_manifest(body, DOCKER_LIST, None, UPSTREAM).children == (d("a"), d("b"))


def test_by_digest_matching_is_accepted() -> None:
    body = body_of(image_manifest())
    info = inspect_manifest(body, OCI_MANIFEST, digest_of(body), UPSTREAM)
    assert info.digest == digest_of(body)


def test_sha512_digest_is_verified_with_sha512() -> None:
    body = body_of(image_manifest())
    requested = digest_of(body, "sha512")
    assert inspect_manifest(body, OCI_MANIFEST, requested, UPSTREAM).digest == requested
    refused(body, OCI_MANIFEST, "sha512:" + "0" * 128)


def test_content_type_parameters_ignored() -> None:
    body = body_of(image_manifest())
    info = inspect_manifest(body, f"{OCI_MANIFEST}; charset=utf-8", None, UPSTREAM)
    assert info.media_type == OCI_MANIFEST


@pytest.mark.parametrize("header", [None, "", "application/json", "application/octet-stream"])
def test_generic_content_type_takes_the_declared_media_type(header: str | None) -> None:
    info = inspect_manifest(body_of(index()), header, None, UPSTREAM)
    assert info.media_type == OCI_INDEX


def test_no_media_type_in_body_uses_the_header() -> None:
    body = body_of(image_manifest(media_type=None))
    assert inspect_manifest(body, OCI_MANIFEST, None, UPSTREAM).media_type == OCI_MANIFEST


def test_schema1_fs_layers() -> None:
    doc = {"schemaVersion": 1, "fsLayers": [{"blobSum": d("1")}, {"blobSum": d("2")}, "junk"]}
    info = inspect_manifest(
        body_of(doc), "application/vnd.docker.distribution.manifest.v1+prettyjws", None, UPSTREAM
    )
    assert info.blobs == (d("1"), d("2"))


def test_malformed_descriptors_are_skipped() -> None:
    doc = image_manifest(layers=[{"digest": d("1")}, "x", 3, {"size": 1}, None])
    doc["config"] = "not-an-object"
    info = inspect_manifest(body_of(doc), OCI_MANIFEST, None, UPSTREAM)
    assert info.blobs == (d("1"),)
    doc = index(manifests={"digest": d("a")})
    assert inspect_manifest(body_of(doc), OCI_INDEX, None, UPSTREAM).children == ()


@pytest.mark.parametrize("fs_layers", [5, None, "sha256:x", True, {"blobSum": "x"}])
def test_non_list_fs_layers_are_not_a_crash(fs_layers: object) -> None:
    doc = {"schemaVersion": 1, "fsLayers": fs_layers}
    info = inspect_manifest(body_of(doc), "application/json", None, UPSTREAM)
    assert info.blobs == ()


# --- refused -----------------------------------------------------------------------------


def test_digest_mismatch_is_502_whatever_the_header_claims() -> None:
    body = body_of(image_manifest())
    other = d("f")
    error = refused(body, OCI_MANIFEST, other)
    assert error.detail == {"requested": other, "received": digest_of(body)}


def test_one_byte_difference_is_a_mismatch() -> None:
    body = body_of(image_manifest())
    refused(body + b" ", OCI_MANIFEST, digest_of(body))


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(image_manifest(manifests=index()["manifests"]), id="manifest-with-manifests"),
        pytest.param(index(layers=image_manifest()["layers"]), id="index-with-layers"),
        pytest.param(index(config=image_manifest()["config"]), id="index-with-config"),
        pytest.param(index(media_type=None, layers=[], config={}), id="no-media-type-both"),
    ],
)
@pytest.mark.parametrize("header", [OCI_MANIFEST, OCI_INDEX, "application/json", None])
def test_type_confusion_both_index_and_image_is_refused(
    doc: dict[str, Any], header: str | None
) -> None:
    error = refused(body_of(doc), header)
    assert "ambiguous" in error.message


@pytest.mark.parametrize(
    ("declared", "header"),
    [
        (OCI_MANIFEST, OCI_INDEX),
        (OCI_INDEX, OCI_MANIFEST),
        (DOCKER_MANIFEST, OCI_MANIFEST),
        (DOCKER_LIST, OCI_INDEX),
        (OCI_MANIFEST, "text/html"),
    ],
)
def test_media_type_contradicting_content_type_is_refused(declared: str, header: str) -> None:
    doc = index(declared) if declared in INDEX_TYPES else image_manifest(declared)
    error = refused(body_of(doc), header)
    assert error.detail == {"content_type": header, "media_type": declared}


def test_over_4_mib_is_refused_before_parsing() -> None:
    assert MAX_MANIFEST_SIZE == 4 * 1024 * 1024
    doc = image_manifest(annotations={"pad": "x" * MAX_MANIFEST_SIZE})
    error = refused(body_of(doc), OCI_MANIFEST)
    assert "4 MiB" in error.message


def test_exactly_4_mib_is_allowed() -> None:
    doc = image_manifest(annotations={"pad": ""})
    base = len(body_of(doc))
    doc["annotations"]["pad"] = "x" * (MAX_MANIFEST_SIZE - base)
    body = body_of(doc)
    assert len(body) == MAX_MANIFEST_SIZE
    assert inspect_manifest(body, OCI_MANIFEST, None, UPSTREAM).size == MAX_MANIFEST_SIZE


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>Login</body></html>",
        b"",
        b"{",
        b"\xff\xfe\x00",
        b"null",
        pytest.param(b"[" * 100_000, id="deeply-nested-array"),
        pytest.param(b'{"a":' * 100_000, id="deeply-nested-object"),
    ],
)
def test_non_json_is_refused(body: bytes) -> None:
    refused(body, OCI_MANIFEST)


@pytest.mark.parametrize("body", [b"[]", b'"x"', b"42", b"true"])
def test_json_that_is_not_an_object_is_refused(body: bytes) -> None:
    refused(body, OCI_MANIFEST)


def test_html_200_page_by_digest_is_a_mismatch_first() -> None:
    body = b"<html>captive portal</html>"
    error = refused(body, "text/html", d("a"))
    assert "digest" in error.message


def test_messages_carry_no_body() -> None:
    secret = "Bearer s3cr3t-token"
    body = f"<html>{secret}</html>".encode()
    error = refused(body, OCI_MANIFEST)
    assert secret not in error.body().decode()
