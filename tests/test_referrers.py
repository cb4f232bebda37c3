"""The referrers documents (pure): fallback tags, descriptors, filtering, merging."""

from __future__ import annotations

import json

from proxy.content import referrers

SUBJECT = "sha256:" + "ab" * 32
DIGEST = "sha256:" + "cd" * 32


def manifest(**extra: object) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.example.config", "digest": DIGEST, "size": 2},
        "layers": [],
        **extra,
    }
    return json.dumps(document).encode()


def test_fallback_tag_is_the_digest_with_a_dash() -> None:
    assert referrers.fallback_tag(SUBJECT) == "sha256-" + "ab" * 32
    assert len(referrers.fallback_tag("sha512:" + "ab" * 64)) == referrers.MAX_TAG


def test_descriptor_of_a_manifest_with_a_subject() -> None:
    body = manifest(
        subject={"mediaType": "x", "digest": SUBJECT, "size": 1},
        artifactType="application/vnd.example.sig",
        annotations={"k": "v"},
    )
    subject, descriptor = referrers.referrer_descriptor(body, "ignored", DIGEST) or ("", {})
    assert subject == SUBJECT
    assert descriptor == {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": DIGEST,
        "size": len(body),
        "artifactType": "application/vnd.example.sig",
        "annotations": {"k": "v"},
    }


def test_artifact_type_defaults_to_the_config_media_type() -> None:
    body = manifest(subject={"mediaType": "x", "digest": SUBJECT, "size": 1})
    found = referrers.referrer_descriptor(body, "x", DIGEST)
    assert found is not None
    assert found[1]["artifactType"] == "application/vnd.example.config"


def test_no_subject_or_a_malformed_one_is_not_a_referrer() -> None:
    assert referrers.referrer_descriptor(manifest(), "x", DIGEST) is None
    assert referrers.referrer_descriptor(b"[1]", "x", DIGEST) is None
    assert referrers.referrer_descriptor(b"not json", "x", DIGEST) is None
    for bad in ("sha256:../../x", "sha256:AB", 7):
        body = manifest(subject={"digest": bad})
        assert referrers.referrer_descriptor(body, "x", DIGEST) is None, bad


def test_with_descriptor_adds_once_and_filter_keeps_one_type() -> None:
    index = referrers.empty_index()
    first = {"digest": DIGEST, "artifactType": "a"}
    second = {"digest": SUBJECT, "artifactType": "b"}
    index = referrers.with_descriptor(index, first)
    index = referrers.with_descriptor(index, second)
    index = referrers.with_descriptor(index, {**first, "size": 3})
    assert [m["digest"] for m in index["manifests"]] == [SUBJECT, DIGEST]
    assert referrers.filter_by_artifact_type(index, "b")["manifests"] == [second]


def test_parse_index_refuses_what_is_not_an_index() -> None:
    for bad in (b"[]", b'{"manifests": 3}'):
        try:
            referrers.parse_index(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
    parsed = referrers.parse_index(b'{"manifests": [1, {"digest": "d"}]}')
    assert parsed["manifests"] == [{"digest": "d"}]
