"""Client authentication: the gate's token service and the check every request passes.

With `auth.mode: token`, `/v2/` and every protected request without a valid token get
401 with `WWW-Authenticate: Bearer realm=...,service=...,scope=...` (the per-request
scope matters to containerd). The token endpoint implements the Docker token spec (GET
with Basic credentials; the OAuth2 POST form with `grant_type=password` and
`refresh_token`) and grants the intersection of the requested scopes and what policy
allows the principal. A token's scope alone never grants a write: the registry side asks
policy again on every request.

Every login (Basic or the OAuth2 password form) first asks the login limiter, then checks
the password off the event loop; a refusal says why (`CredentialsInvalid.reason`, for
the audit log and metrics, never for the client) and who was tried, never the password.

Requested actions are read as Distribution reads them: `pull`, `push`, `delete` are
granted where policy allows each, `*` stands for all three (so it grants at most what
policy allows for each), and any other action is ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from proxy.auth.credentials import UserDirectory
from proxy.auth.login_limits import LoginLimiter, user_key
from proxy.auth.tokens import TokenInvalid, TokenIssuer, TokenVerifier, VerifiedToken
from proxy.errors import Unauthorized
from proxy.policy.principal import ANONYMOUS, Principal
from proxy.upstream.challenge import Scope, format_challenge, parse_scopes

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
# The actions a grant can hold, in grant order; `*` means all of them.
GRANTABLE_ACTIONS = ("pull", "push", "delete")
# Clients ask for a handful (a push with mounts: a few); this bounds the policy work and
# the token size one request can cause.
MAX_SCOPES = 64

MayFn = Callable[[Principal, str, str], bool]


class CredentialsInvalid(Exception):
    """Credentials that do not authenticate anyone.

    `reason` is a short fixed word for audit and metrics (`unknown_user`,
    `wrong_password`, `malformed`, `unsupported_scheme`, `invalid_refresh_token`, ...);
    `user` is the (bounded) user name tried, None when none could be read.
    """

    def __init__(self, message: str, *, reason: str, user: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.user = None if user is None else user_key(user)


class LoginLimited(CredentialsInvalid):
    """Too many failed logins for this user or client: refused before any check (429)."""

    def __init__(self, user: str | None, bucket: str, retry_after: int) -> None:
        super().__init__("too many failed logins; retry later", reason="limited", user=user)
        self.bucket = bucket
        self.retry_after = retry_after


class ScopeInvalid(ValueError):
    """A token request whose scopes cannot be served (too many)."""


def grantable_actions(requested: Sequence[str]) -> tuple[str, ...]:
    """The known actions a scope asks for (`*` is all of them; unknown ones are ignored)."""
    wanted = set(GRANTABLE_ACTIONS) if "*" in requested else set(requested)
    return tuple(action for action in GRANTABLE_ACTIONS if action in wanted)


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
        limiter: LoginLimiter,
    ) -> None:
        self.realm = realm
        self.service = service
        self.issuer = issuer
        self.verifier = verifier
        self.users = users
        self.limiter = limiter

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

    # --- logins ----------------------------------------------------------------------

    async def principal_from_basic(
        self, authorization: str | None, client: str | None
    ) -> Principal:
        """The principal of a Basic header (anonymous without one); raises CredentialsInvalid."""
        if not authorization:
            return ANONYMOUS
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            self._refuse_garbage(client)
            raise CredentialsInvalid(
                "unsupported authorization scheme", reason="unsupported_scheme"
            )
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            self._refuse_garbage(client)
            raise CredentialsInvalid("malformed basic credentials", reason="malformed") from exc
        user, sep, password = decoded.partition(":")
        if not sep:
            self._refuse_garbage(client)
            raise CredentialsInvalid("malformed basic credentials", reason="malformed")
        return await self.password_login(user, password, client)

    def _refuse_garbage(self, client: str | None) -> None:
        """Unreadable credentials count against the client (there is no user to charge)."""
        limited = self.limiter.check(None, client)
        if limited is not None:
            raise LoginLimited(None, limited.bucket, limited.retry_after)
        self.limiter.failed(None, client)

    async def password_login(self, user: str, password: str, client: str | None) -> Principal:
        """Check a user's password, within the login limits; raises CredentialsInvalid."""
        limited = self.limiter.check(user, client)
        if limited is not None:
            # Refused unchecked: a guess while limited must not learn anything either.
            raise LoginLimited(user, limited.bucket, limited.retry_after)
        # bcrypt costs milliseconds of CPU and releases the GIL: keep it off the loop.
        principal = await asyncio.to_thread(self.users.authenticate, user, password)
        if principal is None:
            self.limiter.failed(user, client)
            reason = "wrong_password" if self.users.knows(user) else "unknown_user"
            raise CredentialsInvalid("invalid username or password", reason=reason, user=user)
        self.limiter.succeeded(user, client)
        return principal

    async def refresh_login(self, refresh_token: str, client: str | None) -> Principal:
        """The principal a refresh token stands for; raises CredentialsInvalid."""
        limited = self.limiter.check(None, client)
        if limited is not None:
            raise LoginLimited(None, limited.bucket, limited.retry_after)
        try:
            verified = await self.verifier.verify(refresh_token)
        except TokenInvalid as exc:
            self.limiter.failed(None, client)
            raise CredentialsInvalid(
                "invalid refresh token", reason="invalid_refresh_token"
            ) from exc
        if (
            verified.access is None
            or verified.principal.anonymous
            or not any(scope.type == "refresh" for scope in verified.access)
        ):
            self.limiter.failed(None, client)
            raise CredentialsInvalid(
                "not a refresh token", reason="invalid_refresh_token", user=verified.principal.user
            )
        user = verified.principal.user or ""
        # Group membership is read again, so a removed member loses access on refresh.
        return Principal(user, self.users.groups_of(user))

    # --- the token endpoint ------------------------------------------------------------

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
            raise CredentialsInvalid("this gate does not issue tokens", reason="no_issuer")
        scopes = parse_scopes(list(requested))
        if len(scopes) > MAX_SCOPES:
            raise ScopeInvalid(f"too many scopes (at most {MAX_SCOPES})")
        # One entry per repository, its actions merged (`pull` then `push` asked apart).
        wanted: dict[str, set[str]] = {}
        for scope in scopes:
            if scope.type == "repository":
                wanted.setdefault(scope.name, set()).update(grantable_actions(scope.actions))
        granted: list[Scope] = []
        for name, actions in wanted.items():
            allowed = tuple(
                a for a in GRANTABLE_ACTIONS if a in actions and may(principal, a, name)
            )
            if allowed:
                granted.append(Scope("repository", name, allowed))
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
