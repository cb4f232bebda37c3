"""A minimal, synchronous OCI distribution client for talking to upstreams directly.

Owns the "ground truth" side of the tests: seeding verification and assertions fetch
manifests and blobs straight from a real registry (bypassing the gate), including the
Bearer-token dance against a ``TokenIssuer``. Stdlib ``urllib`` only, so it shares
nothing with the code under test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message

__all__ = ["MANIFEST_ACCEPT", "RegistryClient", "RegistryHTTPError", "Response"]

MANIFEST_ACCEPT = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)

_PARAM = re.compile(r'(\w+)="([^"]*)"')


class RegistryHTTPError(RuntimeError):
    def __init__(self, method: str, url: str, status: int, body: bytes) -> None:
        super().__init__(f"{method} {url} -> {status}: {body[:300]!r}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Response:
    status: int
    headers: Message
    body: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.body).hexdigest()


@dataclass
class RegistryClient:
    """Talks to ``http://host``; with ``credentials`` it logs in to the token realm."""

    host: str
    credentials: tuple[str, str] | None = None
    timeout: float = 30.0
    _tokens: dict[str, str] = field(default_factory=dict, repr=False)

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        accept: tuple[str, ...] = (),
        data: bytes | None = None,
        scope: str | None = None,
    ) -> Response:
        """One request; on a Bearer challenge fetch a token (cached per scope) and retry."""
        url = f"http://{self.host}{path}"
        cached = self._tokens.get(scope or "")
        response = self._send(
            method=method, url=url, headers=headers, accept=accept, data=data, token=cached
        )
        if response.status == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            if challenge.lower().startswith("bearer "):
                token = self.token(challenge)
                self._tokens[scope or ""] = token
                response = self._send(
                    method=method, url=url, headers=headers, accept=accept, data=data, token=token
                )
        if response.status >= 400:
            raise RegistryHTTPError(method, url, response.status, response.body)
        return response

    def token(self, challenge: str) -> str:
        """Answer a ``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` challenge."""
        params = dict(_PARAM.findall(challenge))
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        req = urllib.request.Request(f"{params['realm']}?{urllib.parse.urlencode(query)}")
        if self.credentials is not None:
            basic = base64.b64encode(":".join(self.credentials).encode()).decode()
            req.add_header("Authorization", f"Basic {basic}")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            doc = json.load(resp)
        return str(doc.get("token") or doc["access_token"])

    def _send(
        self,
        *,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        accept: tuple[str, ...],
        data: bytes | None,
        token: str | None,
    ) -> Response:
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        if accept:
            req.add_header("Accept", ", ".join(accept))
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return Response(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return Response(err.code, err.headers, err.read())

    # -- the calls seeding and tests need -------------------------------------------

    def get_manifest(self, repo: str, reference: str) -> Response:
        return self.request(
            "GET",
            f"/v2/{repo}/manifests/{reference}",
            accept=MANIFEST_ACCEPT,
            scope=f"repository:{repo}:pull",
        )

    def get_blob(self, repo: str, digest: str) -> bytes:
        body = self.request(
            "GET", f"/v2/{repo}/blobs/{digest}", scope=f"repository:{repo}:pull"
        ).body
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if actual != digest:
            raise RegistryHTTPError("GET", f"{self.host}/{repo}@{digest}", 200, b"bad digest")
        return body

    def put_manifest(self, repo: str, reference: str, raw: bytes, media_type: str) -> str:
        response = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            headers={"Content-Type": media_type},
            data=raw,
            scope=f"repository:{repo}:pull,push",
        )
        return str(response.headers.get("Docker-Content-Digest", ""))

    def tags(self, repo: str) -> list[str]:
        body = self.request("GET", f"/v2/{repo}/tags/list", scope=f"repository:{repo}:pull").body
        return list(json.loads(body).get("tags") or [])
