"""Properties of proxy/auth/tokens.py: any bearer token presented to the gate.

Whatever an attacker sends as a token (any header, any claims, any signature or none),
the verifier raises TokenInvalid and nothing else, for the gate's own issuer and for
external issuers (a JWKS file with `kid`s, and a PEM key); and a token the gate issued
verifies to what it granted.
"""

from __future__ import annotations

import asyncio
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.auth.tokens import TokenInvalid, TokenIssuer, TokenVerifier
from proxy.policy.principal import Principal
from proxy.settings import TrustedIssuer
from proxy.upstream.challenge import Scope
from tests.support.hostile_tokens import presented_tokens

PROPERTIES = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SERVICE = "registry-gate"
OWN, JWKS_IDP, PEM_IDP = "registry-gate", "https://idp.example", "https://pem.example"
ISSUERS = [OWN, JWKS_IDP, PEM_IDP, "https://stranger.example"]


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> TokenVerifier:
    directory = tmp_path_factory.mktemp("issuers")
    own = TokenIssuer(rsa.generate_private_key(65537, 2048), OWN, SERVICE, ttl=300)
    idp_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(idp_key.public_key()))
    (directory / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
    pem = ec.generate_private_key(ec.SECP256R1()).public_key()
    (directory / "idp.pem").write_bytes(
        pem.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    trusted = [
        TrustedIssuer(issuer=JWKS_IDP, audience=SERVICE, jwks_file=directory / "jwks.json"),
        TrustedIssuer(issuer=PEM_IDP, audience=SERVICE, public_key_file=directory / "idp.pem"),
    ]
    return TokenVerifier.build(own, SERVICE, trusted, None, lambda _user: frozenset())


@PROPERTIES
@given(presented_tokens(ISSUERS, SERVICE))
def test_any_presented_token_is_refused_with_token_invalid(
    verifier: TokenVerifier, token: str
) -> None:
    with pytest.raises(TokenInvalid):
        asyncio.run(verifier.verify(token))


_NAME = st.from_regex(r"[a-z0-9]+(/[a-z0-9._-]+){0,2}", fullmatch=True)


@PROPERTIES
@given(
    st.one_of(st.none(), st.from_regex(r"[a-z]{1,8}", fullmatch=True)),
    st.frozensets(st.from_regex(r"[a-z]{1,8}", fullmatch=True), max_size=3),
    st.lists(
        st.builds(
            Scope,
            st.just("repository"),
            _NAME,
            st.lists(st.sampled_from(["pull", "push", "delete"]), max_size=3).map(tuple),
        ),
        max_size=3,
    ),
)
def test_an_issued_token_verifies_to_what_it_granted(
    verifier: TokenVerifier, user: str | None, groups: frozenset[str], granted: list[Scope]
) -> None:
    assert verifier.own is not None
    principal = Principal(user, groups if user else frozenset())
    verified = asyncio.run(verifier.verify(verifier.own.issue(principal, granted)))
    assert verified.principal.user == user
    assert verified.access == tuple(granted)
