"""Authentication of requests one replica sends another (fill streams, upload hops).

Owns signing and checking them, and the client session a replica sends them with. The
key is derived from the shared `upload_secret`
(HMAC-SHA256 of a fixed label), so the secret itself never signs anything but upload
session ids, and a signature for one purpose is no good for the other. A request carries
`X-Gate-Replica-Auth: v1 <unix time> <hex HMAC of "time\\nMETHOD\\npath">`: it names
exactly one path (one digest), and is accepted for `MAX_SKEW` seconds either side of the
receiver's clock, so a captured header is worth little and not for long. No header, a
malformed one, a wrong MAC or a stale time are all refused alike.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import aiohttp

HEADER = "X-Gate-Replica-Auth"
MAX_SKEW = 300
_LABEL = b"registry-gate replica requests v1"


def peer_session(timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """The HTTP client for requests to other replicas (fill streams, upload hops)."""
    return aiohttp.ClientSession(
        # A connection per request in flight: no pool wait (which no timeout would bound).
        connector=aiohttp.TCPConnector(limit=0),
        timeout=timeout,
        # Never a proxy from the environment, never decompressed: bytes as they are (a
        # fill stream is hashed, an upload body is relayed).
        trust_env=False,
        auto_decompress=False,
    )


class ReplicaSigner:
    """Signs and checks replica-to-replica requests with a key derived from a secret."""

    def __init__(self, shared_secret: bytes) -> None:
        self._key = hmac.new(shared_secret, _LABEL, hashlib.sha256).digest()

    def _mac(self, stamp: int, method: str, path: str) -> str:
        message = f"{stamp}\n{method.upper()}\n{path}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def sign(self, method: str, path: str, now: float | None = None) -> dict[str, str]:
        """The header authenticating `method path` (path without query) now."""
        stamp = int(time.time() if now is None else now)
        return {HEADER: f"v1 {stamp} {self._mac(stamp, method, path)}"}

    def verify(self, method: str, path: str, header: str | None, now: float | None = None) -> bool:
        """Whether `header` authenticates `method path` from a replica, now."""
        if not header or len(header) > 128:
            return False
        parts = header.split(" ")
        if len(parts) != 3 or parts[0] != "v1" or not parts[1].isdigit() or len(parts[1]) > 12:
            return False
        stamp = int(parts[1])
        current = time.time() if now is None else now
        if abs(current - stamp) > MAX_SKEW:
            return False
        # Bytes: compare_digest refuses str that is not ASCII (a hostile header may be).
        return hmac.compare_digest(parts[2].encode(), self._mac(stamp, method, path).encode())
