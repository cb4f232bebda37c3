"""proxy/auth/upload_tokens.py: sealed upload session ids (a client cannot redirect an upload)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.auth.upload_tokens import SealedUpload, UploadOwner, UploadSealer
from proxy.errors import BlobUploadUnknown

SECRET = b"0123456789abcdef0123456789abcdef"
LOCATION = "/v2/team/app/blobs/uploads/5f2a?_state=abc%3D%3D&x=1"


def sealer() -> UploadSealer:
    return UploadSealer(SECRET)


def refused(
    token: str, registry: str = "quay.io", repository: str = "team/app"
) -> BlobUploadUnknown:
    with pytest.raises(BlobUploadUnknown) as info:
        sealer().open(token, registry, repository)
    error = info.value
    assert (error.code, error.status) == ("BLOB_UPLOAD_UNKNOWN", 404)
    return error


def unb64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_round_trip() -> None:
    token = sealer().seal("quay.io", "team/app", LOCATION)
    assert sealer().open(token, "quay.io", "team/app") == SealedUpload(LOCATION, 0)


def test_the_offset_is_sealed_too() -> None:
    token = sealer().seal("quay.io", "team/app", LOCATION, 123_456)
    assert sealer().open(token, "quay.io", "team/app") == SealedUpload(LOCATION, 123_456)
    payload = unb64(token)[16:]
    assert payload.endswith(b"123456]")
    mac = unb64(token)[:16]
    refused(b64(mac + payload.replace(b"123456]", b"0]")))


def test_token_is_a_url_safe_path_component() -> None:
    token = sealer().seal("localhost:5000", "a/b", "/v2/a/b/blobs/uploads/x?y=/+z")
    assert "/" not in token
    assert "=" not in token
    assert "+" not in token
    assert token.isascii()


def test_replicas_sharing_the_secret_agree() -> None:
    token = UploadSealer(SECRET).seal("quay.io", "team/app", LOCATION)
    assert UploadSealer(bytes(SECRET)).open(token, "quay.io", "team/app").location == LOCATION


def test_other_secret_refused() -> None:
    token = UploadSealer(b"another secret").seal("quay.io", "team/app", LOCATION)
    refused(token)


def test_token_for_another_repository_is_upload_unknown() -> None:
    token = sealer().seal("quay.io", "team/app", LOCATION)
    error = refused(token, "quay.io", "team/other")
    assert "another repository" in error.message
    refused(token, "docker.io", "team/app")
    refused(token, "quay.io", "team/app/x")


def test_tampered_payload_refused() -> None:
    token = sealer().seal("quay.io", "team/app", LOCATION)
    raw = unb64(token)
    mac, payload = raw[:16], raw[16:]
    forged = json.dumps(["quay.io", "team/app", "/v2/team/app/blobs/uploads/evil"]).encode()
    refused(b64(mac + forged))
    # Moving the upload to another repository by editing the sealed names.
    moved = payload.replace(b"team/app", b"team/own")
    refused(b64(mac + moved), "quay.io", "team/own")


def test_tampered_mac_refused() -> None:
    token = sealer().seal("quay.io", "team/app", LOCATION)
    raw = bytearray(unb64(token))
    raw[0] ^= 1
    refused(b64(bytes(raw)))


@pytest.mark.parametrize("position", [0, 5, 15, 16, 20, -1])
def test_any_flipped_byte_is_refused(position: int) -> None:
    raw = bytearray(unb64(sealer().seal("quay.io", "team/app", LOCATION)))
    raw[position] ^= 0x40
    refused(b64(bytes(raw)))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "x",
        "!!!!",
        "%2e%2e",
        "../../etc/passwd",
        "é",
        "\x00",
        "a" * 10_000,
        b64(b"\x00" * 16),
        b64(b"\x00" * 16 + b"[1,2]"),
    ],
)
def test_garbage_is_upload_unknown(token: str) -> None:
    refused(token)


def test_valid_mac_over_non_json_is_still_refused() -> None:
    # A payload the gate never sealed, with a correct MAC, must not crash the opener.
    for payload in (
        b"not json",
        b'{"a": 1}',
        b"[1, 2]",
        b"\xff",
        b'["quay.io", "team/app", "/x", -1]',
        b'["quay.io", "team/app", "/x", "7"]',
        b'["quay.io", "team/app", "/x", true]',
    ):
        mac = hmac.new(SECRET, payload, hashlib.sha256).digest()[:16]
        refused(b64(mac + payload))


_TEXT = st.text(min_size=1, max_size=60)


@given(_TEXT, _TEXT, _TEXT)
def test_seal_open_property(registry: str, repository: str, location: str) -> None:
    token = sealer().seal(registry, repository, location)
    assert sealer().open(token, registry, repository).location == location
    with pytest.raises(BlobUploadUnknown):
        sealer().open(token, registry, repository + "x")


def test_an_owner_is_sealed_with_the_id_and_cannot_be_changed() -> None:
    owner = UploadOwner("replica-a", "http://10.0.0.7:5000")
    token = UploadSealer(SECRET, owner).seal("quay.io", "team/app", LOCATION, 42)
    # Any replica sharing the secret opens it and learns the owner.
    assert sealer().open(token, "quay.io", "team/app") == SealedUpload(LOCATION, 42, owner)
    raw = unb64(token)
    mac, payload = raw[:16], raw[16:]
    refused(b64(mac + payload.replace(b"10.0.0.7", b"10.6.6.6")))
    refused(b64(mac + payload.replace(b"replica-a", b"replica-b")))


def test_ids_without_an_owner_still_open_and_malformed_owners_are_refused() -> None:
    # Ids sealed by a single process (or before owners were sealed) name no owner.
    token = sealer().seal("quay.io", "team/app", LOCATION, 7)
    assert sealer().open(token, "quay.io", "team/app").owner is None
    for extra in ([1, 2], ["only-one"], ["a", "b", "c"], ["a", None]):
        fields = ["quay.io", "team/app", LOCATION, 7, *extra]
        payload = json.dumps(fields).encode()
        mac = hmac.new(SECRET, payload, hashlib.sha256).digest()[:16]
        refused(b64(mac + payload))
