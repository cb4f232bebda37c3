"""Operator endpoints: `/metrics`, `/policy/explain`, `/healthz` and `/readyz`.

With `auth.mode: token`, `/metrics` and `/policy/explain` on the main port answer only an
operator (`auth.operators`: users or groups), authenticated by a gate or trusted-issuer
token (Bearer) or by htpasswd Basic credentials (what a Prometheus scrape can send; the
login limits and the audit of refused logins apply). Anonymous gets 401 with a challenge,
anyone else 403. `/healthz` and `/readyz` stay open (probes carry no credentials), and so
does the separate `metrics.listen` port, which is the operator's to bind privately.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.auth.authenticator import CredentialsInvalid, LoginLimited
from proxy.auth.tokens import TokenInvalid
from proxy.errors import Denied, TooManyRequests, Unauthorized, Unsupported
from proxy.http.middleware import request_id_of
from proxy.policy.explain import explain
from proxy.policy.principal import Principal
from proxy.services import SERVICES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BASIC_CHALLENGE = 'Basic realm="registry-gate"'


async def operator_principal(request: web.Request) -> Principal:
    """The authenticated operator of a request; raises 401, 403 or 429 otherwise."""
    services = request.app[SERVICES]
    authenticator = services.authenticator
    assert authenticator is not None, "operator endpoints are guarded in token mode only"
    realm = services.settings.auth.realm or f"{request.scheme}://{request.host}/token"

    def unauthorized(message: str, error: str | None = None) -> Unauthorized:
        challenge = f"{authenticator.challenge(realm, None, error)}, {BASIC_CHALLENGE}"
        return Unauthorized(message, headers={"WWW-Authenticate": challenge})

    header = request.headers.get("Authorization", "")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            principal = await authenticator.principal_from_basic(header, request.remote)
        except CredentialsInvalid as exc:
            await services.record_login_failure(
                exc, request_id=request_id_of(request), client=request.remote, endpoint="operator"
            )
            if isinstance(exc, LoginLimited):
                raise TooManyRequests(
                    str(exc), headers={"Retry-After": str(exc.retry_after)}
                ) from exc
            raise unauthorized("invalid username or password") from exc
    elif scheme.lower() == "bearer" and credential.strip():
        try:
            verified = await authenticator.verifier.verify(credential.strip())
        except TokenInvalid as exc:
            raise unauthorized(f"invalid token: {exc}", "invalid_token") from exc
        if any(scope.type == "refresh" for scope in verified.access or ()):
            # A refresh token stands for a long login, not for access (as on /v2).
            raise unauthorized("a refresh token is not an access token", "invalid_token")
        principal = verified.principal
        if principal.anonymous:
            # An anonymous token proves nobody: a login could still help.
            raise unauthorized("authentication required")
    else:
        raise unauthorized("authentication required")
    operators = services.settings.auth.operators
    if principal.user in operators.users or principal.groups & set(operators.groups):
        return principal
    raise Denied(
        f"{principal.describe()} is not an operator (auth.operators)",
    )


def operator_only(handler: Handler) -> Handler:
    """`handler`, answering only operators (see `operator_principal`)."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        await operator_principal(request)
        return await handler(request)

    return guarded


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition of the gate's private registry."""
    services = request.app[SERVICES]
    cache = services.pull.open_cache
    if cache is not None:
        # The blob store keeps its running totals; publish them as the scrape reads them.
        usage = await cache.blobs.stats()
        services.metrics.observe_cache_usage(usage.bytes, usage.filling, usage.removed_open)
    if services.ratelimits is not None:
        await services.ratelimits.refresh()
    body, content_type = services.metrics.render(request.headers.get("Accept"))
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def policy_explain(request: web.Request) -> web.Response:
    """`GET /policy/explain?action=pull&reference=REF[&user=U][&group=G...]` (JSON).

    Explains from the policy in force and the pins, without contacting an upstream.
    """
    services = request.app[SERVICES]
    query = request.query
    principal = Principal(query.get("user") or None, frozenset(query.getall("group", [])))
    try:
        result = await explain(
            services.holder.current.policy,
            services.holder.pins,
            principal,
            query.get("action", "pull"),
            query.get("reference", ""),
            push_registry=services.settings.push_registry,
        )
    except ValueError as exc:
        raise Unsupported(str(exc)) from exc
    return web.json_response(result.to_dict())


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 503 while the audit log cannot be written and the gate refuses requests
    for it (`audit.on_failure: fail_closed`); with `fail_open` the problem is reported
    and the gate stays ready, since it serves."""
    audit = request.app[SERVICES].audit
    problem = audit.problem if audit.enabled else None
    if problem is None:
        return web.json_response({"status": "ready"})
    if audit.on_failure == "fail_open":
        detail = f"{problem} (audit.on_failure fail_open: serving, records are not written)"
        return web.json_response({"status": "degraded", "audit": detail})
    return web.json_response({"status": "unready", "audit": problem}, status=503)


def add_operator_routes(
    app: web.Application, *, metrics_here: bool, health: bool = True, guarded: bool = False
) -> None:
    """Register the operator endpoints on an app (`guarded`: for operators only)."""
    wrap = operator_only if guarded else (lambda handler: handler)
    if metrics_here:
        app.router.add_get("/metrics", wrap(metrics))
        app.router.add_get("/policy/explain", wrap(policy_explain))
    if health:
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
