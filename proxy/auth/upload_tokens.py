"""Upload session ids handed to clients (pure): the upstream upload URL, sealed.

An upstream answers an upload POST with its own `Location` (absolute, naming its own
host). The gate gives the client a `Location` on the gate instead, whose last component
seals the upstream's path and query with an HMAC: the gate stays stateless across
replicas (they share the secret), and a client cannot point an upload at another
repository or host by editing the id. The id also seals how many bytes the gate had
passed into the session when it issued the id, so a replica can tell whether the
session's content went through it (see `proxy/content/upload_sessions.py`).

With several replicas (`redis` configured) the id also seals its owner: the replica
that holds the session's running digest (`replica.id`) and where the other replicas
reach it (its peer URL). A replica handed an id it does not own relays the request there
(`proxy/content/upload_handoff.py`); since only the gate can seal an id, a client cannot
make a replica send anything to an address of its choosing. An id without an owner (a
single process, or one issued before this field existed) is continued where it lands.
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
class UploadOwner:
    """The replica holding an upload session's running digest, and its peer URL."""

    replica: str
    url: str


@dataclass(frozen=True, slots=True)
class SealedUpload:
    """What an upload id carries: the upstream path and query, the bytes passed so far,
    and the replica owning it (None: no owner named, continued where it lands)."""

    location: str
    offset: int
    owner: UploadOwner | None = None


class UploadSealer:
    """Seals and opens upload ids with one secret; `owner`: this replica, named in
    every id it seals (None: a single process, ids name no owner)."""

    def __init__(self, secret: bytes, owner: UploadOwner | None = None) -> None:
        self._secret = secret
        self.owner = owner

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def seal(
        self, registry: str, repository: str, upstream_path_and_query: str, offset: int = 0
    ) -> str:
        """An opaque id binding an upstream upload URL (and its offset) to a repository."""
        fields: list[object] = [registry, repository, upstream_path_and_query, offset]
        if self.owner is not None:
            fields += [self.owner.replica, self.owner.url]
        payload = json.dumps(fields).encode()
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
            fields = json.loads(payload)
            sealed_registry, sealed_repository, location, offset, *named = fields
        except (ValueError, TypeError) as exc:
            raise BlobUploadUnknown("unknown upload session") from exc
        if (sealed_registry, sealed_repository) != (registry, repository):
            raise BlobUploadUnknown("upload session belongs to another repository")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise BlobUploadUnknown("unknown upload session")
        owner = None
        if named:
            if len(named) != 2 or not all(isinstance(item, str) for item in named):
                raise BlobUploadUnknown("unknown upload session")
            owner = UploadOwner(named[0], named[1])
        return SealedUpload(str(location), offset, owner)
