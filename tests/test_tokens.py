"""proxy/auth/tokens.py: the gate's JWTs and the strict verifier (security.md items 11 and 13)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from proxy.auth import tokens as tokens_module
from proxy.auth.tokens import (
    JWKS_REFRESH_COOLDOWN,
    LEEWAY_SECONDS,
    MAX_TOKEN_BYTES,
    TokenInvalid,
    TokenIssuer,
    TokenVerifier,
    VerifiedToken,
    key_id,
    load_private_key,
)
from proxy.policy.principal import Principal
from proxy.settings import ConfigError, TrustedIssuer
from proxy.upstream.challenge import Scope

SERVICE = "registry-gate"
ISSUER = "registry-gate"
IDP = "https://idp.corp.example"
ALICE = Principal("alice", frozenset({"platform"}))

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# --- keys and forging helpers --------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def issuer(rsa_key: rsa.RSAPrivateKey) -> TokenIssuer:
    return TokenIssuer(rsa_key, ISSUER, SERVICE, ttl=300)


@pytest.fixture
def verifier(issuer: TokenIssuer) -> TokenVerifier:
    return TokenVerifier(own=issuer, service=SERVICE)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def forge(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """A compact JWS with exactly this header (no library second-guessing it)."""
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def rs256(key: rsa.RSAPrivateKey) -> Callable[[bytes], bytes]:
    return lambda msg: RSAAlgorithm(RSAAlgorithm.SHA256).sign(msg, key)


def es256(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    return lambda msg: ECAlgorithm(ECAlgorithm.SHA256).sign(msg, key)


def hs256(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda msg: hmac.new(secret, msg, hashlib.sha256).digest()


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def own_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": SERVICE,
        "iat": now,
        "nbf": now - 1,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "groups": ["platform"],
        "access": [{"type": "repository", "name": "team/app", "actions": ["pull"]}],
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


async def refused(verifier: TokenVerifier, token: str, reason: str | None = None) -> str:
    with pytest.raises(TokenInvalid) as info:
        await verifier.verify(token)
    message = str(info.value)
    if reason is not None:
        assert reason in message
    # The message says why, never the token.
    assert token not in message
    return message


# --- the gate's own tokens -----------------------------------------------------------------


async def test_issue_and_verify_round_trip(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token = issuer.issue(ALICE, [Scope("repository", "team/app", ("pull", "push"))])
    verified = await verifier.verify(token)
    assert verified.principal == ALICE
    assert verified.issuer == ISSUER
    assert verified.access == (Scope("repository", "team/app", ("pull", "push")),)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert header["kid"] == issuer.kid == key_id(issuer.public_key)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 300
    assert claims["aud"] == SERVICE


async def test_ec_issuer_uses_es256(ec_key: ec.EllipticCurvePrivateKey) -> None:
    issuer = TokenIssuer(ec_key, ISSUER, SERVICE, ttl=300)
    assert issuer.algorithm == "ES256"
    verified = await TokenVerifier(issuer, SERVICE).verify(issuer.issue(ALICE, []))
    assert verified.principal == ALICE
    assert verified.access == ()


async def test_p384_issuer_uses_es384() -> None:
    issuer = TokenIssuer(ec.generate_private_key(ec.SECP384R1()), ISSUER, SERVICE, ttl=60)
    assert issuer.algorithm == "ES384"
    assert (await TokenVerifier(issuer, SERVICE).verify(issuer.issue(ALICE, []))).principal == ALICE


async def test_anonymous_token(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    verified = await verifier.verify(issuer.issue(Principal(), []))
    assert verified.principal.anonymous
    assert verified.principal.groups == frozenset()


async def test_custom_ttl(issuer: TokenIssuer) -> None:
    token = issuer.issue(ALICE, [], now=1000.0, ttl=60)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (1000, 999, 1060)


def test_key_id_is_stable_and_distinct(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    assert key_id(rsa_key.public_key()) == key_id(rsa_key.public_key())
    assert key_id(rsa_key.public_key()) != key_id(other_rsa_key.public_key())


# --- scope escalation ----------------------------------------------------------------------


async def test_token_for_repo_a_does_not_allow_repo_b(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.issue(ALICE, [Scope("repository", "team/a", ("pull",))])
    verified = await verifier.verify(token)
    assert verified.allows("team/a", "pull")
    assert not verified.allows("team/b", "pull")
    assert not verified.allows("team/a", "push")
    assert not verified.allows("team/a", "delete")
    assert not verified.allows("team/a/sub", "pull")
    assert not verified.allows("team", "pull")
    assert not verified.allows("team/a ", "pull")


async def test_non_repository_scopes_grant_no_repository(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.issue(
        ALICE, [Scope("registry", "catalog", ("*",)), Scope("refresh", "login", ("refresh",))]
    )
    verified = await verifier.verify(token)
    assert not verified.allows("catalog", "*")
    assert not verified.allows("login", "refresh")
    assert not verified.allows("team/a", "pull")


def test_identity_tokens_leave_the_decision_to_policy() -> None:
    assert VerifiedToken(ALICE, None, IDP).allows("anything", "push")
    assert not VerifiedToken(ALICE, (), ISSUER).allows("anything", "pull")


async def test_editing_the_access_claim_breaks_the_signature(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.issue(ALICE, [Scope("repository", "team/a", ("pull",))])
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["access"][0]["actions"] = ["pull", "push"]
    await refused(verifier, f"{header}.{b64json(claims)}.{signature}")


# --- security.md item 11 -------------------------------------------------------------------


async def test_alg_none_refused(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    for alg in ("none", "None", "NONE"):
        header = {"alg": alg, "typ": "JWT", "kid": issuer.kid}
        await refused(verifier, f"{b64json(header)}.{b64json(own_claims())}.")


async def test_hs256_signed_with_the_rsa_public_key_pem_refused(
    rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    for secret in (public_pem(rsa_key), public_pem(rsa_key).strip()):
        token = forge(
            {"alg": "HS256", "typ": "JWT", "kid": issuer.kid}, own_claims(), hs256(secret)
        )
        await refused(verifier, token)


async def test_hs256_signed_with_the_ec_public_key_pem_refused(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    issuer = TokenIssuer(ec_key, ISSUER, SERVICE, ttl=300)
    token = forge({"alg": "HS256", "kid": issuer.kid}, own_claims(), hs256(public_pem(ec_key)))
    await refused(TokenVerifier(issuer, SERVICE), token)


async def test_other_asymmetric_algorithm_refused(
    rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    sign = lambda msg: RSAAlgorithm(RSAAlgorithm.SHA512).sign(msg, rsa_key)  # noqa: E731
    await refused(verifier, forge({"alg": "RS512", "kid": issuer.kid}, own_claims(), sign))


@pytest.mark.parametrize("embedded", ["jwk", "jku", "x5u", "x5c"])
async def test_keys_embedded_in_the_token_refused_even_with_right_kid(
    embedded: str,
    rsa_key: rsa.RSAPrivateKey,
    issuer: TokenIssuer,
    verifier: TokenVerifier,
) -> None:
    values: dict[str, Any] = {
        "jwk": RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True),
        "jku": "https://evil.example/jwks.json",
        "x5u": "https://evil.example/cert.pem",
        "x5c": ["MIIB"],
    }
    header = {"alg": "RS256", "typ": "JWT", "kid": issuer.kid, embedded: values[embedded]}
    # Signed with the gate's own (right) key: the header alone must sink it.
    token = forge(header, own_claims(), rs256(rsa_key))
    await refused(verifier, token, "own keys")


async def test_embedded_jwk_of_an_attacker_key_refused(
    other_rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    header = {
        "alg": "RS256",
        "kid": issuer.kid,
        "jwk": RSAAlgorithm.to_jwk(other_rsa_key.public_key(), as_dict=True),
    }
    await refused(verifier, forge(header, own_claims(), rs256(other_rsa_key)))


async def test_missing_exp_refused(
    rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token = forge({"alg": "RS256", "kid": issuer.kid}, own_claims(exp=None), rs256(rsa_key))
    await refused(verifier, token)


@pytest.mark.parametrize("claim", ["iss", "aud"])
async def test_missing_iss_or_aud_refused(
    claim: str, rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token = forge({"alg": "RS256", "kid": issuer.kid}, own_claims(**{claim: None}), rs256(rsa_key))
    await refused(verifier, token)


@pytest.mark.parametrize(
    "aud",
    [
        "registry-gat",
        "registry-gate-evil",
        "xregistry-gate",
        "REGISTRY-GATE",
        "registry",
        "",
        ["other"],
        [],
        ["registry-gat", "registry-gate-x"],
    ],
)
async def test_wrong_audience_refused(
    aud: Any, rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token = forge({"alg": "RS256", "kid": issuer.kid}, own_claims(aud=aud), rs256(rsa_key))
    await refused(verifier, token)


async def test_audience_list_containing_the_service_is_accepted(
    rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token = forge(
        {"alg": "RS256", "kid": issuer.kid}, own_claims(aud=["other", SERVICE]), rs256(rsa_key)
    )
    assert (await verifier.verify(token)).principal.user == "alice"


@pytest.mark.parametrize(
    "iss",
    [
        "registry-gat",
        "registry-gate-evil",
        "xregistry-gate",
        "Registry-Gate",
        "",
        ["registry-gate"],
    ],
)
async def test_wrong_issuer_refused(
    iss: Any, rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token = forge({"alg": "RS256", "kid": issuer.kid}, own_claims(iss=iss), rs256(rsa_key))
    await refused(verifier, token)


@pytest.mark.parametrize("crit", [["exp"], ["x-unknown"], [], "b64"])
async def test_crit_header_refused(
    crit: Any, rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    header = {"alg": "RS256", "kid": issuer.kid, "crit": crit, "x-unknown": True}
    await refused(verifier, forge(header, own_claims(), rs256(rsa_key)))


async def test_token_over_8_kb_refused(
    rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    assert MAX_TOKEN_BYTES == 8 * 1024
    big = forge({"alg": "RS256", "kid": issuer.kid}, own_claims(pad="x" * 8192), rs256(rsa_key))
    assert len(big) > MAX_TOKEN_BYTES
    await refused(verifier, big, "too large")
    await refused(verifier, "a" * 100_000, "too large")


async def test_token_just_under_the_cap_is_verified(
    rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    header = {"alg": "RS256", "kid": issuer.kid}
    base = len(forge(header, own_claims(pad=""), rs256(rsa_key)))
    pad = "x" * ((MAX_TOKEN_BYTES - base) * 3 // 4 - 4)
    token = forge(header, own_claims(pad=pad), rs256(rsa_key))
    assert len(token) <= MAX_TOKEN_BYTES
    assert (await verifier.verify(token)).principal.user == "alice"


async def test_expiry_leeway_is_60_seconds(
    rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    assert LEEWAY_SECONDS == 60
    now = int(time.time())
    header = {"alg": "RS256", "kid": issuer.kid}
    within = forge(header, own_claims(iat=now - 400, nbf=now - 400, exp=now - 30), rs256(rsa_key))
    assert (await verifier.verify(within)).principal.user == "alice"
    beyond = forge(header, own_claims(iat=now - 400, nbf=now - 400, exp=now - 90), rs256(rsa_key))
    await refused(verifier, beyond, "expired")


async def test_issuer_tokens_expire(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    old = issuer.issue(ALICE, [], now=time.time() - 300 - 30)
    assert (await verifier.verify(old)).principal == ALICE
    older = issuer.issue(ALICE, [], now=time.time() - 300 - 90)
    await refused(verifier, older, "expired")


async def test_nbf_in_the_future_refused(
    rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    now = int(time.time())
    header = {"alg": "RS256", "kid": issuer.kid}
    future = forge(header, own_claims(iat=now, nbf=now + 120, exp=now + 600), rs256(rsa_key))
    await refused(verifier, future, "not yet valid")
    skewed = forge(header, own_claims(iat=now, nbf=now + 30, exp=now + 600), rs256(rsa_key))
    assert (await verifier.verify(skewed)).principal.user == "alice"


async def test_iat_in_the_future_refused(
    rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    now = int(time.time())
    token = forge(
        {"alg": "RS256", "kid": issuer.kid},
        own_claims(iat=now + 3600, nbf=None, exp=now + 7200),
        rs256(rsa_key),
    )
    await refused(verifier, token)


async def test_tampered_signature_refused(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token = issuer.issue(ALICE, [])
    head, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 1
    await refused(verifier, f"{head}.{payload}.{b64(bytes(raw))}")
    await refused(verifier, f"{head}.{payload}.")
    await refused(verifier, f"{head}.{payload}")


async def test_signed_by_another_key_refused(
    other_rsa_key: rsa.RSAPrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    impostor = TokenIssuer(other_rsa_key, ISSUER, SERVICE, ttl=300)
    await refused(verifier, impostor.issue(ALICE, []), "unknown signing key")
    # Same claims, the right kid, the wrong key.
    token = forge({"alg": "RS256", "kid": issuer.kid}, own_claims(), rs256(other_rsa_key))
    await refused(verifier, token)


async def test_token_without_kid_is_checked_against_the_own_key(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey, verifier: TokenVerifier
) -> None:
    ok = forge({"alg": "RS256"}, own_claims(), rs256(rsa_key))
    assert (await verifier.verify(ok)).principal.user == "alice"
    await refused(verifier, forge({"alg": "RS256"}, own_claims(), rs256(other_rsa_key)))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-jwt",
        "a.b.c",
        "....",
        "eyJhbGciOiJSUzI1NiJ9",
        f"{b64(b'[' * 3000)}.{b64json({})}.x",
        f"{b64json({'alg': 'RS256'})}.{b64(b'[' * 3000)}.x",
        f"{b64json(['alg'])}.{b64json({})}.x",
        f"{b64json({'alg': 'RS256'})}.{b64json(['iss'])}.x",
    ],
)
async def test_malformed_tokens_are_token_invalid(token: str, verifier: TokenVerifier) -> None:
    with pytest.raises(TokenInvalid):
        await verifier.verify(token)


async def test_untrusted_issuer(rsa_key: rsa.RSAPrivateKey, verifier: TokenVerifier) -> None:
    token = forge({"alg": "RS256"}, own_claims(iss="https://evil.example"), rs256(rsa_key))
    await refused(verifier, token, "untrusted issuer")


async def test_verifier_without_own_issuer_refuses_own_tokens(issuer: TokenIssuer) -> None:
    await refused(TokenVerifier(None, SERVICE), issuer.issue(ALICE, []), "untrusted issuer")


# --- loading the signing key ----------------------------------------------------------------


def test_load_private_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "token.pem"
    path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    loaded = load_private_key(path)
    assert key_id(loaded.public_key()) == key_id(rsa_key.public_key())


def test_load_private_key_refuses_what_it_cannot_use(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    ed = tmp_path / "ed.pem"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    public = tmp_path / "pub.pem"
    public.write_bytes(public_pem(rsa_key))
    for path in (ed, encrypted, public, tmp_path / "absent.pem"):
        with pytest.raises(ConfigError, match=r"auth\.signing_key"):
            load_private_key(path)


# --- external issuers ----------------------------------------------------------------------


def jwk_of(key: PrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        entry = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        entry = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    entry["kid"] = kid
    return entry


def idp_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": IDP,
        "aud": SERVICE,
        "sub": "bob",
        "iat": now,
        "exp": now + 300,
        "groups": ["dev", "ops"],
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def external_verifier(
    tmp_path: Path,
    jwks: dict[str, Any] | None = None,
    pem: bytes | None = None,
    groups_of: Callable[[str], frozenset[str]] = lambda _u: frozenset(),
    **issuer_settings: Any,
) -> TokenVerifier:
    if jwks is not None:
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps(jwks))
        issuer_settings["jwks_file"] = path
    if pem is not None:
        path = tmp_path / "idp.pem"
        path.write_bytes(pem)
        issuer_settings["public_key_file"] = path
    trusted = TrustedIssuer(issuer=IDP, audience=SERVICE, **issuer_settings)
    return TokenVerifier.build(None, SERVICE, [trusted], None, groups_of)


async def test_external_issuer_with_jwks_file(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    jwks = {"keys": [jwk_of(rsa_key, "rsa-1"), jwk_of(ec_key, "ec-1")]}
    verifier = external_verifier(tmp_path, jwks, groups_of=lambda u: frozenset({f"local-{u}"}))
    verified = await verifier.verify(
        forge({"alg": "RS256", "kid": "rsa-1"}, idp_claims(), rs256(rsa_key))
    )
    assert verified.principal == Principal("bob", frozenset({"dev", "ops", "local-bob"}))
    assert verified.issuer == IDP
    assert verified.access is None
    verified = await verifier.verify(
        forge({"alg": "ES256", "kid": "ec-1"}, idp_claims(), es256(ec_key))
    )
    assert verified.principal.user == "bob"


async def test_external_issuer_key_must_match_kid(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks = {"keys": [jwk_of(rsa_key, "rsa-1"), jwk_of(other_rsa_key, "rsa-2")]}
    verifier = external_verifier(tmp_path, jwks)
    await refused(verifier, forge({"alg": "RS256", "kid": "rsa-2"}, idp_claims(), rs256(rsa_key)))
    await refused(
        verifier, forge({"alg": "RS256", "kid": "nope"}, idp_claims(), rs256(rsa_key)), "unknown"
    )


async def test_external_issuer_with_pem_public_key(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    verifier = external_verifier(tmp_path, pem=public_pem(ec_key), groups_claim="roles")
    token = forge({"alg": "ES256", "kid": "any"}, idp_claims(roles=["admins"]), es256(ec_key))
    assert (await verifier.verify(token)).principal == Principal("bob", frozenset({"admins"}))
    token = forge({"alg": "ES256"}, idp_claims(roles=["admins"]), es256(ec_key))
    assert (await verifier.verify(token)).principal.groups == frozenset({"admins"})


@pytest.mark.parametrize("claimed", ["admins", {"admins": True}, 7, True, 1.5, None])
async def test_groups_claim_must_be_a_list(
    claimed: Any, tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    verifier = external_verifier(tmp_path, pem=public_pem(ec_key))
    token = forge({"alg": "ES256"}, idp_claims(groups=claimed), es256(ec_key))
    assert (await verifier.verify(token)).principal.groups == frozenset()


async def test_external_issuer_strictness(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = external_verifier(tmp_path, pem=public_pem(ec_key))
    sign = es256(ec_key)
    header = {"alg": "ES256"}
    await refused(verifier, forge({"alg": "none"}, idp_claims(), lambda _m: b""))
    await refused(verifier, forge({"alg": "HS256"}, idp_claims(), hs256(public_pem(ec_key))))
    await refused(verifier, forge({"alg": "RS256"}, idp_claims(), rs256(rsa_key)))
    await refused(verifier, forge(header, idp_claims(aud="registry-gate-x"), sign), "audience")
    await refused(verifier, forge(header, idp_claims(aud=None), sign))
    await refused(verifier, forge(header, idp_claims(exp=None), sign))
    await refused(verifier, forge(header, idp_claims(sub=None), sign), "subject")
    await refused(verifier, forge(header, idp_claims(iss=IDP + "/"), sign), "untrusted")
    await refused(verifier, forge(header, idp_claims(iss=IDP[:-1]), sign), "untrusted")
    jwk = {**header, "jwk": ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)}
    await refused(verifier, forge(jwk, idp_claims(), sign), "own keys")


async def test_jwks_skips_symmetric_and_disallowed_keys(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    secret = b"shared-secret-shared-secret-32by"
    jwks = {
        "keys": [
            {"kty": "oct", "kid": "hmac", "k": b64(secret)},
            jwk_of(ec_key, "ec-1"),
            {"kty": "RSA", "kid": "broken", "n": "AA", "e": "AQAB"},
            "junk",
        ]
    }
    verifier = external_verifier(tmp_path, jwks, algorithms=["RS256"])
    await refused(verifier, forge({"alg": "HS256", "kid": "hmac"}, idp_claims(), hs256(secret)))
    # ES256 is not in the issuer's algorithms: its key is not loaded.
    await refused(verifier, forge({"alg": "ES256", "kid": "ec-1"}, idp_claims(), es256(ec_key)))


async def test_rsa_issuer_with_ps256(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    entry = jwk_of(rsa_key, "ps")
    entry["alg"] = "PS256"
    verifier = external_verifier(tmp_path, {"keys": [entry]}, algorithms=["PS256"])
    claims = idp_claims()
    token = jwt.encode(claims, rsa_key, algorithm="PS256", headers={"kid": "ps"})
    assert (await verifier.verify(token)).principal.user == "bob"


def test_unreadable_jwks_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text("{not json")
    trusted = TrustedIssuer(issuer=IDP, audience=SERVICE, jwks_file=tmp_path / "jwks.json")
    with pytest.raises(ConfigError, match="trusted_issuers"):
        TokenVerifier.build(None, SERVICE, [trusted], None, lambda _u: frozenset())
    trusted = TrustedIssuer(issuer=IDP, audience=SERVICE, public_key_file=tmp_path / "absent.pem")
    with pytest.raises(ConfigError, match="trusted_issuers"):
        TokenVerifier.build(None, SERVICE, [trusted], None, lambda _u: frozenset())


# --- security.md item 13: the unknown-kid flood ------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class CountingJwks:
    """A fake JWKS endpoint: counts fetches; can be told to fail."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.fetches: list[str] = []
        self.fail = False

    async def __call__(self, url: str) -> dict[str, Any]:
        self.fetches.append(url)
        await asyncio.sleep(0)
        if self.fail:
            raise OSError("JWKS endpoint down")
        return self.document


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    # Only the tokens module's clock: the event loop keeps the real one.
    monkeypatch.setattr(
        tokens_module, "time", types.SimpleNamespace(monotonic=fake.monotonic, time=time.time)
    )
    return fake


def url_verifier(fetch: CountingJwks) -> TokenVerifier:
    trusted = TrustedIssuer(issuer=IDP, audience=SERVICE, jwks_url="https://idp.corp.example/jwks")
    return TokenVerifier.build(None, SERVICE, [trusted], fetch, lambda _u: frozenset())


async def test_random_kid_flood_fetches_at_most_once_per_cooldown(
    clock: Clock, rsa_key: rsa.RSAPrivateKey
) -> None:
    fetch = CountingJwks({"keys": [jwk_of(rsa_key, "k1")]})
    verifier = url_verifier(fetch)
    good = forge({"alg": "RS256", "kid": "k1"}, idp_claims(), rs256(rsa_key))
    assert (await verifier.verify(good)).principal.user == "bob"
    assert len(fetch.fetches) == 1

    flood = [
        forge({"alg": "RS256", "kid": uuid.uuid4().hex}, idp_claims(), rs256(rsa_key))
        for _ in range(1000)
    ]
    results = await asyncio.gather(*(verifier.verify(t) for t in flood), return_exceptions=True)
    assert all(isinstance(r, TokenInvalid) for r in results)
    assert len(fetch.fetches) == 1  # the first fetch's cooldown still runs

    clock.now += JWKS_REFRESH_COOLDOWN + 1
    results = await asyncio.gather(*(verifier.verify(t) for t in flood), return_exceptions=True)
    assert all(isinstance(r, TokenInvalid) for r in results)
    assert len(fetch.fetches) == 2
    # Known keys keep working without any fetch.
    assert (await verifier.verify(good)).principal.user == "bob"
    assert len(fetch.fetches) == 2


async def test_concurrent_flood_on_a_cold_issuer_fetches_once(
    clock: Clock, rsa_key: rsa.RSAPrivateKey
) -> None:
    fetch = CountingJwks({"keys": [jwk_of(rsa_key, "k1")]})
    verifier = url_verifier(fetch)
    flood = [
        forge({"alg": "RS256", "kid": uuid.uuid4().hex}, idp_claims(), rs256(rsa_key))
        for _ in range(1000)
    ]
    await asyncio.gather(*(verifier.verify(t) for t in flood), return_exceptions=True)
    assert len(fetch.fetches) == 1


async def test_failed_refresh_keeps_cached_keys(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    fetch = CountingJwks({"keys": [jwk_of(rsa_key, "k1")]})
    verifier = url_verifier(fetch)
    good = forge({"alg": "RS256", "kid": "k1"}, idp_claims(), rs256(rsa_key))
    assert (await verifier.verify(good)).principal.user == "bob"

    clock.now += JWKS_REFRESH_COOLDOWN + 1
    fetch.fail = True
    unknown = forge({"alg": "RS256", "kid": "rotated"}, idp_claims(), rs256(rsa_key))
    await refused(verifier, unknown, "unknown signing key")
    assert len(fetch.fetches) == 2
    assert (await verifier.verify(good)).principal.user == "bob"


async def test_empty_refresh_keeps_cached_keys(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> None:
    fetch = CountingJwks({"keys": [jwk_of(rsa_key, "k1")]})
    verifier = url_verifier(fetch)
    good = forge({"alg": "RS256", "kid": "k1"}, idp_claims(), rs256(rsa_key))
    assert (await verifier.verify(good)).principal.user == "bob"
    clock.now += JWKS_REFRESH_COOLDOWN + 1
    fetch.document = {"keys": []}
    await refused(verifier, forge({"alg": "RS256", "kid": "x"}, idp_claims(), rs256(rsa_key)))
    assert (await verifier.verify(good)).principal.user == "bob"


async def test_rotation_is_picked_up_after_the_cooldown(
    clock: Clock, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    fetch = CountingJwks({"keys": [jwk_of(rsa_key, "k1")]})
    verifier = url_verifier(fetch)
    assert await verifier.verify(forge({"alg": "RS256", "kid": "k1"}, idp_claims(), rs256(rsa_key)))
    fetch.document = {"keys": [jwk_of(other_rsa_key, "k2")]}
    rotated = forge({"alg": "RS256", "kid": "k2"}, idp_claims(), rs256(other_rsa_key))
    await refused(verifier, rotated)  # within the cooldown
    clock.now += JWKS_REFRESH_COOLDOWN + 1
    assert (await verifier.verify(rotated)).principal.user == "bob"
