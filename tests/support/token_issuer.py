"""In-process token server for CNCF Distribution's ``auth: token`` mode.

Owns the issuer side of the registry Bearer-token dance used by the tests: an RSA key
and a self-signed certificate (made with ``cryptography``), a loopback HTTP endpoint
that answers ``GET /token?service=...&scope=...`` (and the OAuth2 ``POST /token``
password grant) with RS256 JWTs signed by pyjwt, and a record of every request so tests
can assert that the gate caches tokens instead of fetching one per upstream request.

Distribution verifies a token by checking the certificate chain in the JWT's ``x5c``
header against ``rootcertbundle`` (a PEM file written here), then ``iss``, ``aud``,
``exp``/``nbf`` and the ``access`` claim (registry/auth/token/token.go).

A stdlib ``ThreadingHTTPServer`` on a daemon thread is used rather than an aiohttp app:
it needs no event loop of its own, so it cannot interfere with pytest-asyncio's loops.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

__all__ = ["AccessEntry", "TokenIssuer", "TokenRequest", "parse_scope"]


@dataclass(frozen=True)
class AccessEntry:
    """One element of the JWT ``access`` claim: what the token lets its bearer do."""

    type: str
    name: str
    actions: tuple[str, ...]

    def to_claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


@dataclass(frozen=True)
class TokenRequest:
    """What one request to the token endpoint asked for and what it got."""

    method: str
    service: str | None
    scopes: tuple[str, ...]
    user: str | None  # None = anonymous; set even when the password was wrong
    authenticated: bool
    status: int
    granted: tuple[AccessEntry, ...]


def parse_scope(scope: str) -> tuple[str, str, tuple[str, ...]]:
    """Split ``repository:name:pull,push`` into (type, name, actions).

    The name may itself contain a colon (``repository:host:5000/repo:pull``), so split
    on the first and on the last colon only.
    """
    typ, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return typ, name, tuple(a for a in actions.split(",") if a)


def _self_signed(common_name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Backdated so a registry whose clock is slightly behind still accepts the chain.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        # A CA certificate, so Go's x509 verifier accepts it as its own trust anchor.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


class TokenIssuer:
    """A token server on ``127.0.0.1:<free port>`` for one or more Distribution registries.

    Policy, deliberately simple: a listed user with the right password is granted every
    action asked for; an anonymous caller is granted only ``anonymous_actions`` (``pull``
    by default) or, with ``anonymous_actions=None``, refused with 401; a wrong password is
    refused with 401.
    """

    def __init__(
        self,
        directory: Path,
        *,
        users: Mapping[str, str] | None = None,
        anonymous_actions: Collection[str] | None = ("pull",),
        service: str = "gate-test-registry",
        issuer: str = "gate-test-issuer",
        ttl: int = 300,
    ) -> None:
        self.directory = directory
        self.users: dict[str, str] = dict(users or {})
        self.anonymous_actions: frozenset[str] | None = (
            None if anonymous_actions is None else frozenset(anonymous_actions)
        )
        self.service = service
        self.issuer = issuer
        self.ttl = ttl
        directory.mkdir(parents=True, exist_ok=True)
        self._key, cert = _self_signed(issuer)
        self.rootcertbundle = directory / "token-root.pem"
        self.rootcertbundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> TokenIssuer:
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        thread = threading.Thread(
            target=server.serve_forever, name="token-issuer", kwargs={"poll_interval": 0.05}
        )
        thread.daemon = True
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> TokenIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("token issuer is not running")
        return int(self._server.server_address[1])

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def distribution_auth_config(self) -> dict[str, Any]:
        """The ``auth:`` section of a Distribution config that trusts this issuer."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.rootcertbundle),
            }
        }

    # -- what tests assert on ------------------------------------------------------

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def last_request(self) -> TokenRequest | None:
        with self._lock:
            return self._requests[-1] if self._requests else None

    @property
    def last_scopes(self) -> tuple[str, ...]:
        last = self.last_request
        return last.scopes if last else ()

    @property
    def last_user(self) -> str | None:
        last = self.last_request
        return last.user if last else None

    def reset(self) -> None:
        """Forget recorded requests (tests share one session-scoped issuer)."""
        with self._lock:
            self._requests.clear()

    # -- issuing -------------------------------------------------------------------

    def issue(self, subject: str, access: Collection[AccessEntry], audience: str) -> str:
        """Sign a JWT in the shape Distribution 2.8 expects."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            # Distribution 2.8 decodes ``aud`` as a single string, not a list.
            "aud": audience,
            "exp": now + self.ttl,
            # Slightly in the past to tolerate clock granularity between processes.
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [a.to_claim() for a in access],
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"x5c": [self._x5c]})

    def handle(
        self, method: str, params: Mapping[str, list[str]], authorization: str | None
    ) -> tuple[int, dict[str, Any]]:
        """Decide one token request; returns (HTTP status, JSON body). Records it."""
        service = params["service"][0] if params.get("service") else None
        scopes = tuple(s for raw in params.get("scope", []) for s in raw.split())
        user, password = _credentials(method, params, authorization)
        authenticated = user is not None and self.users.get(user) == password
        status = 200
        body: dict[str, Any] = {}
        granted: tuple[AccessEntry, ...] = ()
        if user is not None and not authenticated:
            status, body = 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad creds"}]}
        elif user is None and self.anonymous_actions is None:
            status, body = 401, {"errors": [{"code": "UNAUTHORIZED", "message": "no creds"}]}
        else:
            entries = []
            for scope in scopes:
                typ, name, actions = parse_scope(scope)
                allowed = actions
                if not authenticated:
                    assert self.anonymous_actions is not None
                    allowed = tuple(a for a in actions if a in self.anonymous_actions)
                entries.append(AccessEntry(typ, name, allowed))
            granted = tuple(entries)
            token = self.issue(user or "", granted, service or self.service)
            issued_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            body = {
                "token": token,
                "access_token": token,
                "expires_in": self.ttl,
                "issued_at": issued_at,
            }
        record = TokenRequest(method, service, scopes, user, authenticated, status, granted)
        with self._lock:
            self._requests.append(record)
        return status, body


def _credentials(
    method: str, params: Mapping[str, list[str]], authorization: str | None
) -> tuple[str | None, str | None]:
    """Basic credentials from the header, or the OAuth2 password grant's form fields."""
    if authorization and authorization[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(authorization[6:], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return "", None  # malformed header: treat as a failed login, not anonymous
        user, _, password = decoded.partition(":")
        return user, password
    if method == "POST" and (params.get("grant_type") or [""])[0] == "password":
        return (params.get("username") or [""])[0], (params.get("password") or [""])[0]
    return None, None


def _make_handler(issuer: TokenIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the issuer records requests itself; stderr noise helps no one

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", f'Basic realm="{issuer.issuer}"')
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/token":
                self._reply(404, {"error": "not found"})
                return
            params = urllib.parse.parse_qs(url.query)
            self._reply(*issuer.handle("GET", params, self.headers.get("Authorization")))

        def do_POST(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            form = self.rfile.read(length).decode() if length else ""
            if url.path != "/token":
                self._reply(404, {"error": "not found"})
                return
            params = urllib.parse.parse_qs(form)
            # OAuth2 clients (containerd) send the scope space-separated in one field.
            self._reply(*issuer.handle("POST", params, self.headers.get("Authorization")))

    return Handler
