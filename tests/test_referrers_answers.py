"""What the gate accepts as an upstream's referrers answer, and where it caches one (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.content.referrers_answers import INDEX_TYPE, cache_key, verify_page
from proxy.errors import TagInvalid, UpstreamUnavailable
from proxy.names.references import validate_tag

SUBJECT = "sha256:" + "ab" * 32
GOOD = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": SUBJECT, "size": 7}


def page(manifests: list[Any], **extra: Any) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": manifests, **extra}
    ).encode()


def test_a_valid_index_is_accepted_with_its_descriptors() -> None:
    typed = {**GOOD, "artifactType": "application/x", "annotations": {"k": "v"}}
    verified = verify_page(page([GOOD, typed]), f"{INDEX_TYPE}; charset=utf-8", [], "up")
    assert verified.manifests == [GOOD, typed]
    assert not verified.filtered


@pytest.mark.parametrize(
    "applied, filtered",
    [
        (["artifactType"], True),
        (["annotations, artifactType"], True),
        (["annotations", "ArtifactType"], True),
        (["annotations"], False),
        ([""], False),
    ],
)
def test_filters_applied_is_read_as_a_list(applied: list[str], filtered: bool) -> None:
    assert verify_page(page([]), INDEX_TYPE, applied, "up").filtered is filtered


@pytest.mark.parametrize(
    "body, content_type",
    [
        (page([GOOD]), "application/vnd.oci.image.manifest.v1+json"),
        (page([GOOD]), "application/json"),
        (page([GOOD]), None),
        (b"not json", INDEX_TYPE),
        (b"[]", INDEX_TYPE),
        (b"[" * 100_000, INDEX_TYPE),
        (page([GOOD], schemaVersion=1), INDEX_TYPE),
        (page([GOOD], mediaType="application/vnd.oci.image.manifest.v1+json"), INDEX_TYPE),
        (page([GOOD], layers=[]), INDEX_TYPE),
        (json.dumps({"schemaVersion": 2, "manifests": {}}).encode(), INDEX_TYPE),
        (json.dumps({"schemaVersion": 2}).encode(), INDEX_TYPE),
        (page([1]), INDEX_TYPE),
        (page([{**GOOD, "digest": "sha256:../../x"}]), INDEX_TYPE),
        (page([{**GOOD, "size": -1}]), INDEX_TYPE),
        (page([{**GOOD, "size": True}]), INDEX_TYPE),
        (page([{**GOOD, "size": "7"}]), INDEX_TYPE),
        (page([{**GOOD, "mediaType": ""}]), INDEX_TYPE),
        (page([{**GOOD, "artifactType": 3}]), INDEX_TYPE),
        (page([{**GOOD, "artifactType": "x" * 256}]), INDEX_TYPE),
        (page([{**GOOD, "annotations": []}]), INDEX_TYPE),
    ],
)
def test_what_is_not_an_oci_index_is_a_502_naming_the_upstream(
    body: bytes, content_type: str | None
) -> None:
    with pytest.raises(UpstreamUnavailable) as caught:
        verify_page(body, content_type, [], "upstream.example")
    assert "upstream.example" in caught.value.message


def test_cache_keys_are_never_tags_and_stay_short() -> None:
    plain = cache_key(SUBJECT, None)
    typed = cache_key(SUBJECT, "application/x")
    long = cache_key("sha512:" + "cd" * 64, "x" * 5000)
    assert len({plain, typed, cache_key(SUBJECT, "application/y")}) == 3
    assert typed.startswith(plain + "/")
    assert len(long) < 300
    for key in (plain, typed, long):
        with pytest.raises(TagInvalid):
            validate_tag(key)
