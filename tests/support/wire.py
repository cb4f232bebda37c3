"""A small synchronous HTTP client for talking to the gate exactly as a test means to.

Owns how tests put requests on the wire: ``request()`` (``http.client``: several header
lines with the same name, e.g. one ``Accept`` line per media type, are sent as separate
lines, and the path is sent as given) and ``raw_request()`` (a plain socket, the request
target byte for byte, ``Connection: close``), for paths that an HTTP library would
normalise or refuse (``/../``, ``%2F``). Stdlib only, so it shares nothing with the
code under test.
"""

from __future__ import annotations

import email.parser
import http.client
import json
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import urlsplit

__all__ = ["HeaderLines", "Reply", "raw_request", "request"]

HeaderLines = Mapping[str, str] | Iterable[tuple[str, str]]
DEFAULT_TIMEOUT = 15.0


@dataclass(frozen=True)
class Reply:
    """One HTTP response: status, headers (case-insensitive lookups), whole body."""

    status: int
    headers: Message
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def header_lines(self, name: str) -> list[str]:
        return list(self.headers.get_all(name) or [])

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_codes(self) -> list[str]:
        """The ``code`` of every entry of an OCI error body ([] when not one)."""
        try:
            errors = json.loads(self.body)["errors"]
            return [str(e["code"]) for e in errors]
        except (ValueError, KeyError, TypeError):
            return []

    @property
    def error_messages(self) -> list[str]:
        try:
            return [str(e.get("message", "")) for e in json.loads(self.body)["errors"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            return []

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:300]!r})"


def _lines(headers: HeaderLines) -> list[tuple[str, str]]:
    if isinstance(headers, Mapping):
        return [(str(k), str(v)) for k, v in headers.items()]
    return [(str(k), str(v)) for k, v in headers]


def request(
    base_url: str,
    method: str,
    path: str,
    headers: HeaderLines = (),
    body: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    source: str | None = None,
) -> Reply:
    """Send one request to ``base_url`` (``http://host:port``) with ``path`` as given;
    ``source``: the local address to send from (``127.0.0.7``: another client)."""
    parts = urlsplit(base_url)
    assert parts.hostname is not None and parts.scheme == "http", base_url
    conn = http.client.HTTPConnection(
        parts.hostname,
        parts.port or 80,
        timeout=timeout,
        source_address=(source, 0) if source is not None else None,
    )
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in _lines(headers):
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, response.headers, data)
    finally:
        conn.close()


def raw_request(
    host: str,
    port: int,
    method: str,
    target: str,
    headers: HeaderLines = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> Reply:
    """Send ``METHOD target HTTP/1.1`` over a socket with the target untouched; the
    server is asked to close the connection, and the reply is read to EOF."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in _lines(headers)]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    chunks: list[bytes] = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, _, header_block = head.partition(b"\r\n")
    status = int(status_line.split()[1])
    message = email.parser.BytesParser().parsebytes(header_block + b"\r\n\r\n", headersonly=True)
    if method == "HEAD":
        return Reply(status, message, b"")
    if (message.get("Transfer-Encoding") or "").lower() == "chunked":
        rest = _dechunk(rest)
    elif message.get("Content-Length") is not None:
        rest = rest[: int(message["Content-Length"])]
    return Reply(status, message, rest)


def _dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2 :]
    return b"".join(out)
