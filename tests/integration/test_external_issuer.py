"""Tokens from an enterprise identity provider, accepted by a real gate process.

The gate runs with `auth.mode: token` and only a trusted issuer whose keys it fetches
from a JWKS URL on loopback (a small HTTP server of this module that counts its
requests). The policy allows official Docker Hub images to the group `devs` only, so
the groups claim of the IdP's token decides: what is proven is that the gate verifies
the IdP's signature with the fetched keys, maps the groups claim into policy, refuses
tokens that are not the IdP's, and does not refetch the JWKS for every unknown `kid`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.gate import GateFactory, GateProcess, standard_upstreams
from tests.support.upstreams import Upstreams
from tests.support.wire import Reply, request

ISSUER = "https://idp.corp.example"
AUDIENCE = "registry-gate"
KID = "idp-key-1"
MANIFEST = "/v2/docker.io/library/alpine/manifests/3.19"
ACCEPT = ("Accept", "application/vnd.oci.image.index.v1+json")


class _JwksServer:
    """Serves one JWKS document on loopback and counts the requests for it."""

    def __init__(self, document: dict[str, Any]) -> None:
        body = json.dumps(document).encode()
        self.requests = 0
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server_self.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/jwks.json"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Idp:
    """The identity provider: its key, its JWKS server and the gate that trusts it."""

    key: rsa.RSAPrivateKey
    jwks: _JwksServer
    gate: GateProcess

    def token(self, *, groups: list[str], kid: str = KID, **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": now,
            "exp": now + 300,
            "groups": groups,
        }
        payload.update(claims)
        return jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": kid})

    def get(self, token: str | None, path: str = MANIFEST) -> Reply:
        headers = [ACCEPT]
        if token is not None:
            headers.append(("Authorization", f"Bearer {token}"))
        return request(self.gate.url, "GET", path, headers)


@pytest.fixture(scope="module")
def idp(upstreams: Upstreams, gate_factory_module: GateFactory) -> Iterator[Idp]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": KID, "alg": "RS256", "use": "sig"})
    jwks = _JwksServer({"keys": [jwk]})
    policy = {
        "search": ["docker.io"],
        "default": "deny",
        "rules": [
            {
                "name": "devs-pull-official",
                "match": "docker.io/library/*",
                "actions": ["pull"],
                "allow": True,
                "groups": ["devs"],
            }
        ],
    }
    config = {
        "upstreams": standard_upstreams(upstreams),
        "auth": {
            "mode": "token",
            "trusted_issuers": [
                {
                    "issuer": ISSUER,
                    "audience": AUDIENCE,
                    "jwks_url": jwks.url,
                    "groups_claim": "groups",
                }
            ],
        },
    }
    try:
        yield Idp(key, jwks, gate_factory_module(config, policy=policy, name="idp-gate"))
    finally:
        jwks.close()


@pytest.fixture(scope="module")
def gate_factory_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GateFactory]:
    """Gates that live as long as this module (one gate start for every test here)."""
    gates: list[GateProcess] = []

    def make(
        config: Any = None, *, policy: Any = None, env: Any = None, name: str = "gate"
    ) -> GateProcess:
        process = GateProcess(tmp_path_factory.mktemp(name), config or {}, policy=policy, env=env)
        gates.append(process)
        return process.start()

    yield make
    for process in gates:
        process.stop()


def test_a_group_member_pulls_with_the_idp_token(idp: Idp, upstreams: Upstreams) -> None:
    reply = idp.get(idp.token(groups=["devs"]))
    assert reply.status == 200, reply
    assert reply.body == upstreams.hub["library/alpine:3.19"].raw


def test_the_groups_claim_decides(idp: Idp) -> None:
    reply = idp.get(idp.token(groups=["sales"]))
    assert reply.status == 403, reply
    assert reply.error_codes == ["DENIED"]
    assert b"alice" in reply.body  # the denial names the principal the token carried


def test_no_token_is_challenged(idp: Idp) -> None:
    reply = idp.get(None)
    assert reply.status == 401, reply
    challenge = reply.header("WWW-Authenticate") or ""
    assert challenge.startswith("Bearer ") and "repository:docker.io/library/alpine:pull" in (
        challenge
    )


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"aud": "someone-else"}, id="wrong-audience"),
        pytest.param({"iss": "https://idp.corp.example.evil"}, id="wrong-issuer"),
        pytest.param({"exp": int(time.time()) - 3600}, id="expired"),
    ],
)
def test_tokens_that_are_not_valid_idp_tokens_are_refused(idp: Idp, claims: dict[str, Any]) -> None:
    reply = idp.get(idp.token(groups=["devs"], **claims))
    assert reply.status == 401, reply
    assert reply.error_codes == ["UNAUTHORIZED"]


def test_a_token_signed_by_another_key_is_refused(idp: Idp) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    forged = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 300, "groups": ["devs"]},
        other,
        algorithm="RS256",
        headers={"kid": KID},
    )
    assert idp.get(forged).status == 401


def test_unknown_kids_do_not_hammer_the_jwks_url(idp: Idp) -> None:
    before = idp.jwks.requests
    for _ in range(20):
        reply = idp.get(idp.token(groups=["devs"], kid=uuid.uuid4().hex))
        assert reply.status == 401, reply
    # At most one refresh per cooldown, however many unknown kids arrive.
    assert idp.jwks.requests - before <= 1
    # The known key still works after the refresh attempt.
    assert idp.get(idp.token(groups=["devs"])).status == 200
