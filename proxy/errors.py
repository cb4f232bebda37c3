"""The exception hierarchy of the gate and its mapping to OCI error codes.

Every failure a client can see is one of these classes; only the error middleware turns
them into responses (`{"errors":[{"code","message","detail"}]}`), and only the upstream
client maps upstream statuses onto them. Messages never carry credentials.
"""

from __future__ import annotations

import json
from typing import Any


class RegistryError(Exception):
    """Base of every error the gate answers a client with."""

    code = "UNKNOWN"
    status = 500

    def __init__(
        self,
        message: str,
        *,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        """The OCI JSON error document for this error."""
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return json.dumps({"errors": [entry]}).encode()


class NameInvalid(RegistryError):
    """The repository name does not match the OCI name grammar."""

    code, status = "NAME_INVALID", 400


class TagInvalid(RegistryError):
    """The tag does not match the OCI tag grammar."""

    code, status = "TAG_INVALID", 400


class DigestInvalid(RegistryError):
    """A digest is malformed, or content does not hash to it."""

    code, status = "DIGEST_INVALID", 400


class ManifestInvalid(RegistryError):
    """A manifest is malformed, too large, or contradicts its declared type."""

    code, status = "MANIFEST_INVALID", 400


class ManifestTooLarge(ManifestInvalid):
    """A client's manifest is over the 4 MiB the gate accepts (413, as the spec says)."""

    status = 413


class BodyTooLarge(RegistryError):
    """A request body the gate reads itself is over its cap (the connection is closed)."""

    code, status = "SIZE_INVALID", 413

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class BodyTimeout(RegistryError):
    """A request body the gate reads itself did not arrive in time (connection closed).

    OCI has no timeout code; SIZE_INVALID says what happened: the body did not arrive
    as declared.
    """

    code, status = "SIZE_INVALID", 408

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class PaginationNumberInvalid(RegistryError):
    """The `n` parameter of a list request is not a non-negative integer."""

    code, status = "PAGINATION_NUMBER_INVALID", 400


class RangeInvalid(RegistryError):
    """A `Range` header cannot be satisfied for this blob."""

    code, status = "RANGE_INVALID", 416


class NameUnknown(RegistryError):
    """The registry or repository is not known (not configured, or absent upstream)."""

    code, status = "NAME_UNKNOWN", 404


class ManifestUnknown(RegistryError):
    """The manifest (tag or digest) does not exist upstream."""

    code, status = "MANIFEST_UNKNOWN", 404


class BlobUnknown(RegistryError):
    """The blob does not exist upstream, or the repository is not known to hold it."""

    code, status = "BLOB_UNKNOWN", 404


class BlobUploadUnknown(RegistryError):
    """The upload session is not known."""

    code, status = "BLOB_UPLOAD_UNKNOWN", 404


class BlobUploadInvalid(RegistryError):
    """An upload the gate ended: its body broke off, or it cannot be completed."""

    code, status = "BLOB_UPLOAD_INVALID", 400


class UploadTooSlow(BlobUploadInvalid):
    """A client sent its upload body below the minimum rate (`uploads.min_rate`)."""

    status = 408


class Unauthorized(RegistryError):
    """The client must authenticate (answered with a Bearer challenge)."""

    code, status = "UNAUTHORIZED", 401


class Denied(RegistryError):
    """Policy refuses the request, or the upstream refused the gate's credentials."""

    code, status = "DENIED", 403


class Unsupported(RegistryError):
    """The operation is not supported by the gate or the upstream."""

    code, status = "UNSUPPORTED", 405


class TooManyRequests(RegistryError):
    """The upstream rate-limited the gate (carries the upstream `Retry-After`)."""

    code, status = "TOOMANYREQUESTS", 429


class UpstreamUnavailable(RegistryError):
    """The upstream failed (5xx, refused connection, bad content); names the upstream."""

    code, status = "UNAVAILABLE", 502


class UpstreamTimeout(RegistryError):
    """The upstream did not answer in time; names the upstream."""

    code, status = "UNAVAILABLE", 504


class ServiceUnavailable(RegistryError):
    """The gate itself cannot serve now (circuit open, shutting down)."""

    code, status = "UNAVAILABLE", 503
