"""proxy/upstream.py: `map_failure`, the one table from upstream answers to OCI errors."""

from __future__ import annotations

import json

import pytest
from multidict import CIMultiDict

from proxy.errors import (
    BlobUnknown,
    BlobUploadUnknown,
    Denied,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.upstream import Kind, PassThroughError, map_failure

UPSTREAM = "quay.io"
SECRET = "hunter2-s3cret"
NO_HEADERS: CIMultiDict[str] = CIMultiDict()


def oci_body(code: str, message: str = "upstream says no", detail: object = None) -> bytes:
    entry: dict[str, object] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}).encode()


def mapped(
    status: int, kind: Kind = "manifest", headers: CIMultiDict[str] | None = None, body: bytes = b""
) -> RegistryError:
    error = map_failure(
        UPSTREAM, status, kind, headers if headers is not None else NO_HEADERS, body
    )
    # Every mapped error is a complete OCI error document.
    document = json.loads(error.body())
    assert document["errors"][0]["code"] == error.code
    return error


@pytest.mark.parametrize(
    ("kind", "error_type", "code"),
    [
        ("manifest", ManifestUnknown, "MANIFEST_UNKNOWN"),
        ("blob", BlobUnknown, "BLOB_UNKNOWN"),
        ("tags", NameUnknown, "NAME_UNKNOWN"),
        ("upload", BlobUploadUnknown, "BLOB_UPLOAD_UNKNOWN"),
        ("referrers", NameUnknown, "NAME_UNKNOWN"),
        ("ping", NameUnknown, "NAME_UNKNOWN"),
    ],
)
def test_404_per_kind(kind: Kind, error_type: type[RegistryError], code: str) -> None:
    error = mapped(404, kind)
    assert type(error) is error_type
    assert (error.code, error.status) == (code, 404)
    assert UPSTREAM in error.message


@pytest.mark.parametrize("status", [401, 403])
def test_refusals_are_denied(status: int) -> None:
    error = mapped(status, body=oci_body("UNAUTHORIZED", f"token {SECRET} rejected"))
    assert isinstance(error, Denied)
    assert (error.code, error.status) == ("DENIED", 403)
    assert UPSTREAM in error.message


@pytest.mark.parametrize("retry_after", ["30", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_429_carries_retry_after(retry_after: str) -> None:
    headers = CIMultiDict({"retry-after": retry_after})
    error = mapped(429, "blob", headers)
    assert isinstance(error, TooManyRequests)
    assert (error.code, error.status) == ("TOOMANYREQUESTS", 429)
    assert error.headers == {"Retry-After": retry_after}
    assert UPSTREAM in error.message


def test_429_without_retry_after_gets_a_default() -> None:
    error = mapped(429)
    assert error.headers["Retry-After"].isdigit()


@pytest.mark.parametrize("status", [500, 501, 502, 503, 599])
def test_5xx_is_502_naming_the_upstream(status: int) -> None:
    error = mapped(status, body=b"<html>Internal error " + SECRET.encode() + b"</html>")
    assert type(error) is UpstreamUnavailable
    assert (error.code, error.status) == ("UNAVAILABLE", 502)
    assert UPSTREAM in error.message
    assert str(status) in error.message


def test_504_is_504() -> None:
    error = mapped(504)
    assert isinstance(error, UpstreamTimeout)
    assert (error.code, error.status) == ("UNAVAILABLE", 504)
    assert UPSTREAM in error.message


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "MANIFEST_INVALID"),
        (400, "DIGEST_INVALID"),
        (400, "NAME_INVALID"),
        (400, "TAG_INVALID"),
        (400, "SIZE_INVALID"),
        (400, "BLOB_UPLOAD_INVALID"),
        (400, "MANIFEST_BLOB_UNKNOWN"),
        (400, "BLOB_UPLOAD_UNKNOWN"),
        (405, "UNSUPPORTED"),
        (409, "MANIFEST_INVALID"),
        (400, "NAME_UNKNOWN"),
    ],
)
def test_4xx_with_standard_code_passes_through(status: int, code: str) -> None:
    upstream_message = "layer missing at http://10.1.2.3:5000/v2/x (db 10.9.9.9)"
    error = mapped(status, "upload", body=oci_body(code, upstream_message, detail={"x": 1}))
    assert isinstance(error, PassThroughError)
    assert (error.code, error.status) == (code, status)
    assert error.message.startswith(f"upstream {UPSTREAM}: ")
    # The upstream's message and detail are not relayed (they may name internal
    # addresses): the client gets the code's standard message.
    assert "10." not in error.body().decode()
    assert "layer missing" not in error.message
    assert error.detail is None


def test_416_passes_through_as_range_invalid() -> None:
    error = mapped(416, "blob")
    assert (error.code, error.status) == ("RANGE_INVALID", 416)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html>Bad Request</html>",
        oci_body("DENIED"),
        oci_body("UNAUTHORIZED"),
        oci_body("TOOMANYREQUESTS"),
        oci_body("SOMETHING_ELSE"),
        b'{"errors": []}',
        b'{"errors": {"code": "NAME_INVALID"}}',
        b'{"errors": ["NAME_INVALID"]}',
        b'{"errors": [{"message": "no code"}]}',
        b"[]",
        b"\xff\xfe",
        pytest.param(b"[" * 65536, id="deeply-nested"),
        pytest.param(b'{"errors":' * 20000, id="deeply-nested-object"),
    ],
)
@pytest.mark.parametrize("status", [400, 405, 409, 413, 418])
def test_other_4xx_is_502(body: bytes, status: int) -> None:
    error = mapped(status, body=body)
    assert type(error) is UpstreamUnavailable
    assert (error.code, error.status) == ("UNAVAILABLE", 502)
    assert UPSTREAM in error.message
    assert str(status) in error.message


def test_upstream_message_is_bounded() -> None:
    error = mapped(400, body=oci_body("MANIFEST_INVALID", "x" * 100_000))
    assert len(error.message) < 600
    assert "x" * 10 not in error.message


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 429, 500, 502, 503, 504])
def test_no_credentials_in_any_message(status: int) -> None:
    headers = CIMultiDict(
        {
            "WWW-Authenticate": f'Bearer realm="https://auth.example/token?secret={SECRET}"',
            "Authorization": f"Bearer {SECRET}",
            "Set-Cookie": f"session={SECRET}",
            "Retry-After": "5",
        }
    )
    body = json.dumps(
        {"errors": [{"code": "UNAUTHORIZED", "message": "bad", "detail": {"token": SECRET}}]}
    ).encode()
    error = mapped(status, headers=headers, body=body)
    rendered = error.body().decode() + error.message + json.dumps(error.headers)
    assert SECRET not in rendered
