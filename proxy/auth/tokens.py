"""Client-facing JWTs: issuing the gate's own tokens and verifying tokens presented to it.

The verifier is strict where the peers' advisories say it must be: the algorithm is fixed
by the key (never `none`, never HS* against a public key), keys embedded in the token
(`jwk`, `jku`, `x5u`, `x5c`) are refused, `exp` is required, `iss` and `aud` must match
exactly, unknown `crit` is refused, tokens over 8 KB are refused, and clock skew is at
most 60 seconds. Tokens from external issuers (JWKS or PEM keys) are verified the same
way; an unknown `kid` refreshes a JWKS URL at most once per cooldown.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.policy.principal import Principal
from proxy.settings import ConfigError, TrustedIssuer
from proxy.upstream.challenge import Scope

MAX_TOKEN_BYTES = 8 * 1024
LEEWAY_SECONDS = 60
JWKS_REFRESH_COOLDOWN = 60.0
_EMBEDDED_KEY_HEADERS = ("jwk", "jku", "x5u", "x5c")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class TokenInvalid(Exception):
    """A presented token failed verification (the message says why, never the token)."""


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """What a valid token says: who, and (for the gate's own tokens) what it grants."""

    principal: Principal
    access: tuple[Scope, ...] | None  # None: an identity token, policy alone decides
    issuer: str

    def allows(self, name: str, action: str) -> bool:
        """Whether the grant covers `action` on repository `name`."""
        if self.access is None:
            return True
        return any(
            scope.type == "repository" and scope.name == name and action in scope.actions
            for scope in self.access
        )


def _algorithm_for(key: PrivateKey | PublicKey, allowed: Sequence[str] = ()) -> str:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        # One RSA key serves RS* and PS*: the issuer's configured algorithm says which.
        return next((a for a in allowed if a.startswith(("RS", "PS"))), "RS256")
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        curve = key.curve.name
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[curve]
    raise ConfigError("auth.signing_key: only RSA and EC keys are supported")


def key_id(public_key: PublicKey) -> str:
    """A stable `kid`: a digest of the DER-encoded public key."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:32]


def load_private_key(path: Path) -> PrivateKey:
    """Read the gate's signing key (PEM, RSA or EC, unencrypted)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"auth.signing_key: cannot load a PEM private key from {path}") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError("auth.signing_key: only RSA and EC keys are supported")
    return key


@dataclass(frozen=True, slots=True)
class _Key:
    key: PublicKey
    algorithm: str


class TokenIssuer:
    """Signs the gate's own access tokens."""

    def __init__(self, private_key: PrivateKey, issuer: str, service: str, ttl: int) -> None:
        self._private_key = private_key
        self.public_key: PublicKey = private_key.public_key()
        self.algorithm = _algorithm_for(private_key)
        self.kid = key_id(self.public_key)
        self.issuer = issuer
        self.service = service
        self.ttl = ttl

    def issue(
        self,
        principal: Principal,
        access: Sequence[Scope],
        now: float | None = None,
        ttl: int | None = None,
    ) -> str:
        """A signed JWT granting `access` to `principal` (for `ttl` seconds)."""
        issued = int(now if now is not None else time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": principal.user or "",
            "aud": self.service,
            "iat": issued,
            "nbf": issued - 1,
            "exp": issued + (ttl or self.ttl),
            "jti": uuid.uuid4().hex,
            "groups": sorted(principal.groups),
            "access": [
                {"type": scope.type, "name": scope.name, "actions": list(scope.actions)}
                for scope in access
            ],
        }
        return jwt.encode(
            claims,
            self._private_key,
            algorithm=self.algorithm,
            headers={"kid": self.kid, "typ": "JWT"},
        )


class _ExternalIssuer:
    """Keys and claim mapping for one trusted external issuer."""

    def __init__(
        self,
        settings: TrustedIssuer,
        fetch_jwks: Callable[[str], Awaitable[dict[str, Any]]] | None,
    ) -> None:
        self.settings = settings
        self._fetch_jwks = fetch_jwks
        self.keys: dict[str | None, _Key] = {}
        self._last_refresh = float("-inf")
        if settings.jwks_file is not None:
            self.keys = _parse_jwks(_read_json(settings.jwks_file), settings.algorithms)
        elif settings.public_key_file is not None:
            self.keys = {None: _public_key_from_pem(settings.public_key_file, settings.algorithms)}

    async def key_for(self, kid: str | None) -> _Key | None:
        key = self.keys.get(kid)
        if key is None and kid is not None:
            key = self.keys.get(None)
        if key is not None or self.settings.jwks_url is None or self._fetch_jwks is None:
            return key
        now = time.monotonic()
        # A flood of random kids must not become a flood of JWKS fetches.
        if now - self._last_refresh < JWKS_REFRESH_COOLDOWN:
            return None
        self._last_refresh = now
        try:
            document = await self._fetch_jwks(self.settings.jwks_url)
            fresh = _parse_jwks(document, self.settings.algorithms)
        except Exception:
            # A failed refresh keeps the keys already known.
            return None
        if fresh:
            self.keys = fresh
        return self.keys.get(kid)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"auth.trusted_issuers: cannot read JWKS file {path}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"auth.trusted_issuers: {path} is not a JWKS document")
    return document


def _public_key_from_pem(path: Path, allowed: Sequence[str]) -> _Key:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"auth.trusted_issuers: cannot load a PEM public key from {path}"
        ) from exc
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError("auth.trusted_issuers: only RSA and EC keys are supported")
    return _Key(key, _algorithm_for(key, allowed))


def _parse_jwks(document: dict[str, Any], allowed: Sequence[str]) -> dict[str | None, _Key]:
    keys: dict[str | None, _Key] = {}
    for entry in document.get("keys", []):
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC"):
            continue
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError):
            continue
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            continue
        declared = entry.get("alg")
        algorithm = declared if isinstance(declared, str) and declared in allowed else None
        algorithm = algorithm or _algorithm_for(key, allowed)
        if algorithm in allowed:
            keys[entry.get("kid")] = _Key(key, algorithm)
    return keys


@dataclass
class TokenVerifier:
    """Verifies bearer tokens: the gate's own, and those of trusted external issuers."""

    own: TokenIssuer | None
    service: str
    external: list[_ExternalIssuer] = field(default_factory=list)
    groups_of: Callable[[str], frozenset[str]] = lambda _user: frozenset()

    @classmethod
    def build(
        cls,
        own: TokenIssuer | None,
        service: str,
        issuers: Sequence[TrustedIssuer],
        fetch_jwks: Callable[[str], Awaitable[dict[str, Any]]] | None,
        groups_of: Callable[[str], frozenset[str]],
    ) -> TokenVerifier:
        """A verifier for the gate's key and the configured external issuers."""
        return cls(own, service, [_ExternalIssuer(i, fetch_jwks) for i in issuers], groups_of)

    async def verify(self, token: str) -> VerifiedToken:
        """Verify a bearer token; raises TokenInvalid."""
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenInvalid("token too large")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise TokenInvalid("malformed token") from exc
        if any(name in header for name in _EMBEDDED_KEY_HEADERS):
            raise TokenInvalid("tokens carrying their own keys are refused")
        if "crit" in header:
            raise TokenInvalid("unsupported critical header parameters")
        issuer = unverified.get("iss")
        if self.own is not None and issuer == self.own.issuer:
            return self._verify_own(token, header)
        for external in self.external:
            if issuer == external.settings.issuer:
                return await self._verify_external(token, header, external)
        raise TokenInvalid("token from an untrusted issuer")

    def _decode(self, token: str, key: _Key, audience: str, issuer: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=audience,
                issuer=issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud"], "strict_aud": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenInvalid("token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise TokenInvalid("token not yet valid") from exc
        except jwt.InvalidAudienceError as exc:
            raise TokenInvalid("token for another audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise TokenInvalid("token from another issuer") from exc
        except jwt.PyJWTError as exc:
            raise TokenInvalid("token signature or claims invalid") from exc

    def _verify_own(self, token: str, header: dict[str, Any]) -> VerifiedToken:
        assert self.own is not None
        if header.get("kid") not in (None, self.own.kid):
            raise TokenInvalid("unknown signing key")
        own_key = _Key(self.own.public_key, self.own.algorithm)
        claims = self._decode(token, own_key, self.own.service, self.own.issuer)
        access: list[Scope] = []
        for item in claims.get("access") or []:
            if isinstance(item, dict):
                actions = tuple(str(a) for a in item.get("actions") or [])
                access.append(Scope(str(item.get("type")), str(item.get("name")), actions))
        user = str(claims.get("sub") or "") or None
        groups = frozenset(str(g) for g in claims.get("groups") or [])
        return VerifiedToken(Principal(user, groups), tuple(access), self.own.issuer)

    async def _verify_external(
        self, token: str, header: dict[str, Any], external: _ExternalIssuer
    ) -> VerifiedToken:
        key = await external.key_for(header.get("kid"))
        if key is None:
            raise TokenInvalid("unknown signing key")
        if header.get("alg") != key.algorithm:
            raise TokenInvalid("algorithm does not match the issuer's key")
        settings = external.settings
        claims = self._decode(token, key, settings.audience, settings.issuer)
        user = str(claims.get("sub") or "") or None
        if user is None:
            raise TokenInvalid("token without a subject")
        claimed = claims.get(settings.groups_claim) or []
        groups = frozenset(str(g) for g in claimed) if isinstance(claimed, list) else frozenset()
        return VerifiedToken(Principal(user, groups | self.groups_of(user)), None, settings.issuer)
