"""Client authentication: the gate's token service and the check every request passes.

With `auth.mode: token`, `/v2/` and every protected request without a valid token get
401 with `WWW-Authenticate: Bearer realm=...,service=...,scope=...` (the per-request
scope matters to containerd). The token endpoint implements the Docker token spec (GET
with Basic credentials; the OAuth2 POST form with `grant_type=password` and
`refresh_token`) and grants the intersection of the requested scopes and what policy
allows the principal. A token's scope alone never grants a write: the registry side asks
policy again on every request.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from proxy.challenge import Scope, format_challenge, parse_scopes
from proxy.credentials import UserDirectory
from proxy.errors import Unauthorized
from proxy.principal import ANONYMOUS, Principal
from proxy.tokens import TokenInvalid, TokenIssuer, TokenVerifier, VerifiedToken

# The action a request method needs on its repository (as Distribution requires).
METHOD_ACTIONS = {
    "GET": "pull",
    "HEAD": "pull",
    "POST": "push",
    "PUT": "push",
    "PATCH": "push",
    "DELETE": "delete",
}
# Refresh tokens live long: they stand for a login (docker login keeps them).
REFRESH_TOKEN_TTL = 30 * 86400

MayFn = Callable[[Principal, str, str], bool]


class CredentialsInvalid(Exception):
    """The token endpoint got credentials that do not authenticate anyone."""


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What the token endpoint answers."""

    token: str
    expires_in: int
    issued_at: str
    scopes: tuple[Scope, ...]
    refresh_token: str | None


class Authenticator:
    """Authenticates clients and issues tokens for one gate."""

    def __init__(
        self,
        realm: str | None,
        service: str,
        issuer: TokenIssuer | None,
        verifier: TokenVerifier,
        users: UserDirectory,
    ) -> None:
        self.realm = realm
        self.service = service
        self.issuer = issuer
        self.verifier = verifier
        self.users = users

    def challenge(self, realm: str, scope: str | None, error: str | None = None) -> str:
        """The `WWW-Authenticate` value for a 401."""
        params = {"realm": realm, "service": self.service}
        if scope:
            params["scope"] = scope  # carries the client's name: format_challenge quotes it
        if error:
            params["error"] = error
        return format_challenge("Bearer", params)

    def unauthorized(
        self, realm: str, scope: str | None, message: str, error: str | None = None
    ) -> Unauthorized:
        """A 401 error carrying the Bearer challenge."""
        return Unauthorized(
            message, headers={"WWW-Authenticate": self.challenge(realm, scope, error)}
        )

    async def verify_request(
        self, headers: Mapping[str, str], realm: str, scope: str | None
    ) -> VerifiedToken:
        """The verified bearer token of a request; raises Unauthorized with a challenge."""
        authorization = headers.get("Authorization", "")
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise self.unauthorized(realm, scope, "authentication required")
        try:
            return await self.verifier.verify(credential.strip())
        except TokenInvalid as exc:
            raise self.unauthorized(realm, scope, f"invalid token: {exc}", "invalid_token") from exc

    # --- the token endpoint ------------------------------------------------------------

    def principal_from_basic(self, authorization: str | None) -> Principal:
        """The principal of a Basic header (anonymous without one)."""
        if not authorization:
            return ANONYMOUS
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise CredentialsInvalid("unsupported authorization scheme")
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise CredentialsInvalid("malformed basic credentials") from exc
        if not sep:
            raise CredentialsInvalid("malformed basic credentials")
        return self.password_login(user, password)

    def password_login(self, user: str, password: str) -> Principal:
        """Check a user's password; raises CredentialsInvalid."""
        principal = self.users.authenticate(user, password)
        if principal is None:
            raise CredentialsInvalid("invalid username or password")
        return principal

    async def refresh_login(self, refresh_token: str) -> Principal:
        """The principal a refresh token stands for; raises CredentialsInvalid."""
        try:
            verified = await self.verifier.verify(refresh_token)
        except TokenInvalid as exc:
            raise CredentialsInvalid("invalid refresh token") from exc
        if verified.access is None or verified.principal.anonymous:
            raise CredentialsInvalid("not a refresh token")
        if not any(scope.type == "refresh" for scope in verified.access):
            raise CredentialsInvalid("not a refresh token")
        user = verified.principal.user or ""
        # Group membership is read again, so a removed member loses access on refresh.
        return Principal(user, self.users.groups_of(user))

    def grant(
        self,
        principal: Principal,
        requested: Sequence[str],
        may: MayFn,
        *,
        offline: bool,
        now: float | None = None,
    ) -> TokenGrant:
        """Issue a token for the allowed part of the requested scopes."""
        if self.issuer is None:
            raise CredentialsInvalid("this gate does not issue tokens")
        granted: list[Scope] = []
        for scope in parse_scopes(list(requested)):
            if scope.type != "repository":
                continue
            actions = tuple(a for a in scope.actions if may(principal, a, scope.name))
            if actions:
                granted.append(Scope("repository", scope.name, actions))
        issued = now if now is not None else time.time()
        token = self.issuer.issue(principal, granted, now=issued)
        refresh = None
        if offline and not principal.anonymous:
            refresh = self.issuer.issue(
                principal,
                [Scope("refresh", "login", ("refresh",))],
                now=issued,
                ttl=REFRESH_TOKEN_TTL,
            )
        return TokenGrant(
            token=token,
            expires_in=self.issuer.ttl,
            issued_at=datetime.fromtimestamp(issued, UTC).isoformat().replace("+00:00", "Z"),
            scopes=tuple(granted),
            refresh_token=refresh,
        )
