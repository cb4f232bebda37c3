"""The gate's token endpoint (`/token`): the Docker token spec, GET and OAuth2 POST.

Bad credentials are a 401 with a Basic challenge (what clients expect from a token
service); the body never repeats what was sent. Every refused login is audited and
counted; past the login limits the answer is 429 `TOOMANYREQUESTS` with `Retry-After`.
Scopes never cause a 500: unknown actions and types are ignored, too many scopes or an
unreadable form are a 400.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDict

from proxy.auth.authenticator import CredentialsInvalid, LoginLimited, ScopeInvalid, TokenGrant
from proxy.http.middleware import request_id_of
from proxy.http.request_bodies import read_body
from proxy.policy.principal import Principal
from proxy.services import SERVICES, Services

MAX_FORM_BYTES = 64 * 1024


def _grant_body(grant: TokenGrant, oauth: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "token": grant.token,
        "access_token": grant.token,
        "expires_in": grant.expires_in,
        "issued_at": grant.issued_at,
    }
    if oauth:
        body["scope"] = " ".join(str(scope) for scope in grant.scopes)
    if grant.refresh_token is not None:
        body["refresh_token"] = grant.refresh_token
    return body


def _error(status: int, code: str, message: str, headers: dict[str, str]) -> web.Response:
    body = {"errors": [{"code": code, "message": message}]}
    return web.json_response(body, status=status, headers=headers)


async def _refused(
    request: web.Request, services: Services, error: CredentialsInvalid
) -> web.Response:
    await services.record_login_failure(
        error, request_id=request_id_of(request), client=request.remote, endpoint="token"
    )
    if isinstance(error, LoginLimited):
        services.observe_token("limited")
        headers = {"Retry-After": str(error.retry_after)}
        return _error(429, "TOOMANYREQUESTS", str(error), headers)
    services.observe_token("refused")
    return _error(
        401, "UNAUTHORIZED", str(error), {"WWW-Authenticate": 'Basic realm="registry-gate"'}
    )


def _issue(
    services: Services, principal: Principal, scopes: list[str], offline: bool, oauth: bool
) -> web.Response:
    assert services.authenticator is not None
    try:
        grant = services.authenticator.grant(principal, scopes, services.may, offline=offline)
    except ScopeInvalid as exc:
        services.observe_token("invalid")
        return _error(400, "UNSUPPORTED", str(exc), {})
    services.observe_token("anonymous" if principal.anonymous else "issued")
    return web.json_response(_grant_body(grant, oauth))


async def token_get(request: web.Request) -> web.Response:
    """GET /token?service=&scope=... with optional Basic credentials."""
    services = request.app[SERVICES]
    if services.authenticator is None:
        raise web.HTTPNotFound()
    try:
        principal = await services.authenticator.principal_from_basic(
            request.headers.get("Authorization"), request.remote
        )
    except CredentialsInvalid as exc:
        return await _refused(request, services, exc)
    offline = request.query.get("offline_token", "").lower() == "true"
    return _issue(services, principal, request.query.getall("scope", []), offline, oauth=False)


async def token_post(request: web.Request) -> web.Response:
    """POST /token: OAuth2 `grant_type=password` or `refresh_token`."""
    services = request.app[SERVICES]
    authenticator = services.authenticator
    if authenticator is None:
        raise web.HTTPNotFound()
    # Read with a cap and a deadline (413/408, connection closed): this endpoint is open
    # to anyone, so a large or dripped form must not hold memory or a handler.
    body = await read_body(
        request, limit=MAX_FORM_BYTES, seconds=services.settings.request_body_timeout
    )
    form = MultiDict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    grant_type = str(form.get("grant_type", ""))
    try:
        if grant_type == "password":
            principal = await authenticator.password_login(
                str(form.get("username", "")), str(form.get("password", "")), request.remote
            )
        elif grant_type == "refresh_token":
            principal = await authenticator.refresh_login(
                str(form.get("refresh_token", "")), request.remote
            )
        else:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
    except CredentialsInvalid as exc:
        return await _refused(request, services, exc)
    offline = str(form.get("access_type", "")) == "offline"
    scopes = [str(form.get("scope", ""))]
    response = _issue(services, principal, scopes, offline, oauth=True)
    return response


def add_token_routes(app: web.Application) -> None:
    """Register the token endpoint."""
    app.router.add_get("/token", token_get)
    app.router.add_post("/token", token_post)
