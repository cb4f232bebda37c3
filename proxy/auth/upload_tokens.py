"""Upload session ids handed to clients (pure): the upstream upload URL, sealed.

An upstream answers an upload POST with its own `Location` (absolute, naming its own
host). The gate gives the client a `Location` on the gate instead, whose last component
seals the upstream's path and query with an HMAC: the gate stays stateless across
replicas (they share the secret), and a client cannot point an upload at another
repository or host by editing the id. The id also seals how many bytes the gate had
passed into the session when it issued the id, so a replica can tell whether the
session's content went through it (see `proxy/content/upload_sessions.py`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

from proxy.errors import BlobUploadUnknown

_MAC_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class SealedUpload:
    """What an upload id carries: the upstream path and query, and the bytes passed so far."""

    location: str
    offset: int


class UploadSealer:
    """Seals and opens upload ids with one secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def seal(
        self, registry: str, repository: str, upstream_path_and_query: str, offset: int = 0
    ) -> str:
        """An opaque id binding an upstream upload URL (and its offset) to a repository."""
        payload = json.dumps([registry, repository, upstream_path_and_query, offset]).encode()
        return _b64(self._mac(payload) + payload)

    def open(self, token: str, registry: str, repository: str) -> SealedUpload:
        """The upload sealed in `token`, if it belongs to this repository."""
        try:
            raw = _unb64(token)
        except (ValueError, TypeError) as exc:
            raise BlobUploadUnknown("unknown upload session") from exc
        mac, payload = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise BlobUploadUnknown("unknown upload session")
        try:
            sealed_registry, sealed_repository, location, offset = json.loads(payload)
        except (ValueError, TypeError) as exc:
            raise BlobUploadUnknown("unknown upload session") from exc
        if (sealed_registry, sealed_repository) != (registry, repository):
            raise BlobUploadUnknown("upload session belongs to another repository")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise BlobUploadUnknown("unknown upload session")
        return SealedUpload(str(location), offset)
