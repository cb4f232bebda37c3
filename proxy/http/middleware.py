"""Request-wide concerns: request ids, authentication, and the one place errors are rendered.

Every error reaching a client is the OCI JSON form; an unexpected exception becomes a
500 that names the request id and nothing else (no traceback, no credential). Every
refused write is audited here, whatever refused it (token, name, registry, upstream),
unless the gatekeeper already wrote its record.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.auth.authenticator import METHOD_ACTIONS
from proxy.errors import RegistryError
from proxy.names.addressing import V2Route, parse_v2_path
from proxy.observability.logging_setup import AccessLog, request_id_bound
from proxy.policy.gatekeeper import AuditTrail, RequestContext
from proxy.policy.principal import ANONYMOUS
from proxy.services import SERVICES

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
log = logging.getLogger("registry_gate.http")
ACCESS_LOG = AccessLog()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_HTTP_CODES = {
    400: "UNSUPPORTED",
    404: "NOT_FOUND",
    405: "UNSUPPORTED",
    413: "SIZE_INVALID",
    431: "UNSUPPORTED",
}
# A client's own X-Request-Id is kept (beside the gate's) only when it looks like an id.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
WRITE_METHODS = frozenset({"PUT", "POST", "PATCH", "DELETE"})
# Audit names are bounded: an unparsable path is recorded, but not at any length.
_MAX_AUDITED_PATH = 256
_V2_ROUTE = "v2_route"


def new_request_id() -> str:
    """A fresh random 32-hex-digit request id: 128 random bits, as uuid4().hex carried,
    at a quarter of its cost (no UUID object); random, so an id tells a client nothing
    about how many requests the gate served."""
    return secrets.token_hex(16)


def error_response(error: RegistryError, request_id: str) -> web.Response:
    """Render a gate error as its OCI JSON response."""
    response = web.Response(status=error.status, body=error.body(), content_type="application/json")
    response.headers.update(error.headers)
    response.headers["X-Request-Id"] = request_id
    response.headers[API_VERSION_HEADER[0]] = API_VERSION_HEADER[1]
    if error.headers.get("Connection", "").lower() == "close":
        # aiohttp decides keep-alive itself; an error that must end the connection (an
        # unread body, a draining gate) says so with this header.
        response.force_close()
    return response


def request_id_of(request: web.Request) -> str:
    """The id of this request (set by the middleware)."""
    value = request.get("request_id")
    return value if isinstance(value, str) else "-"


def client_request_id_of(request: web.Request) -> str | None:
    """The client's X-Request-Id when it is a valid id (else None; never used as ours)."""
    value = request.get("client_request_id")
    return value if isinstance(value, str) else None


def request_context(request: web.Request) -> RequestContext:
    """Who is asking, for the gatekeeper and audit (one audit trail per request)."""
    trail = request.get("audit_trail")
    return RequestContext(
        request_id=request_id_of(request),
        client=request.remote,
        principal=request.get("principal", ANONYMOUS),
        user_agent=request.headers.get("User-Agent"),
        client_request_id=client_request_id_of(request),
        trail=trail if isinstance(trail, AuditTrail) else AuditTrail(),
    )


def v2_route_of(request: web.Request) -> V2Route | None:
    """The `/v2/<name>/...` endpoint of the request, parsed once per request (the auth
    middleware, the dispatcher and the metrics label all ask); None for other paths."""
    try:
        route: V2Route | None = request[_V2_ROUTE]
    except KeyError:
        path = request.path
        route = parse_v2_path(path[4:]) if path.startswith("/v2/") and len(path) > 4 else None
        request[_V2_ROUTE] = route
    return route


def route_label(request: web.Request) -> str:
    """A bounded label for the endpoint of a request (never a name or digest)."""
    path = request.path
    if path in ("/v2", "/v2/"):
        return "v2"
    if path.startswith("/v2/"):
        route = v2_route_of(request)
        return route.kind if route is not None else "unknown"
    if path in ("/token", "/metrics", "/healthz", "/readyz"):
        return path[1:]
    return "other"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Assign a request id, render errors as OCI JSON, audit refused writes, count."""
    # The gate's id is always its own: a client must not choose what audit records say.
    request["request_id"] = new_request_id()
    incoming = request.headers.get("X-Request-Id", "")
    if _CLIENT_REQUEST_ID.fullmatch(incoming):
        request["client_request_id"] = incoming
    request["audit_trail"] = AuditTrail()
    started = time.monotonic()
    with request_id_bound(request["request_id"]):
        response = await _render_errors(request, handler)
        if _is_refused_write(request, response.status):
            await _audit_refused_write(request, response.status)
    metrics = request.app[SERVICES].metrics
    seconds = time.monotonic() - started
    route = route_label(request)
    metrics.observe_request(route, request.method, response.status, seconds)
    # The access log: one structured line per request (the path never carries a secret;
    # query strings and headers, which may, are left out).
    ACCESS_LOG.write(
        request.method,
        request.path,
        response.status,
        request["request_id"],
        {
            "client": request.remote,
            "route": route,
            "status": response.status,
            "duration_ms": round(seconds * 1000, 2),
            "client_request_id": client_request_id_of(request),
        },
    )
    if response.status == 403:
        metrics.observe_denial(
            METHOD_ACTIONS.get(request.method, "pull"), request.headers.get("User-Agent")
        )
    return response


def _is_refused_write(request: web.Request, status: int) -> bool:
    trail = request.get("audit_trail")
    return (
        status >= 400
        and request.method in WRITE_METHODS
        and request.path.startswith("/v2")
        and isinstance(trail, AuditTrail)
        and trail.records == 0
    )


async def _audit_refused_write(request: web.Request, status: int) -> None:
    """Audit a write that was refused before (or without) the gatekeeper's own record:
    a missing or insufficient token, an invalid name, an unknown registry, an upstream's
    refusal."""
    name, _scope, action = _scope_for(request)
    error = request.get("error")
    reason = f"{error.code}: {error.message}" if isinstance(error, RegistryError) else None
    services = request.app[SERVICES]
    try:
        await services.gatekeeper.record(
            request_context(request),
            event="write_refused",
            action=action,
            name=name or request.path[:_MAX_AUDITED_PATH],
            decision="deny",
            status=status,
            reason=reason,
            extra={"method": request.method},
        )
    except Exception as exc:
        # The refusal stands either way; the audit log's own failure policy (metrics,
        # /readyz) reports that it could not record.
        log.warning("refused write not audited: %s", type(exc).__name__)


async def _render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except RegistryError as error:
        request["error"] = error
        return error_response(error, request["request_id"])
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "UNKNOWN")
        http_error = _http_error(code, exc.status, exc.reason)
        request["error"] = http_error
        return error_response(http_error, request["request_id"])
    except Exception:
        log.exception("unhandled error", extra={"request_id": request["request_id"]})
        internal = RegistryError(f"internal error (request id {request['request_id']})")
        request["error"] = internal
        return error_response(internal, request["request_id"])
    if not response.prepared:
        response.headers.setdefault("X-Request-Id", request["request_id"])
        response.headers.setdefault(*API_VERSION_HEADER)
    return response


def _http_error(code: str, status: int, message: str) -> RegistryError:
    error = RegistryError(message)
    error.code = code
    error.status = status
    return error


def _scope_for(request: web.Request) -> tuple[str | None, str | None, str]:
    """(repository name, scope string, action) a `/v2/` request needs from its token."""
    action = METHOD_ACTIONS.get(request.method, "pull")
    route = v2_route_of(request)
    if route is None:
        return None, None, action
    if route.kind == "upload" and action == "delete":
        # Cancelling an upload is part of pushing (the handler asks policy for push too).
        action = "push"
    actions = "pull,push" if action == "push" else action
    return route.name, f"repository:{route.name}:{actions}", action


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With token auth on, every `/v2` request needs a valid token covering its scope."""
    services = request.app[SERVICES]
    authenticator = services.authenticator
    request["principal"] = ANONYMOUS
    if authenticator is None or not request.path.startswith("/v2"):
        return await handler(request)
    realm = services.settings.token_realm(request.scheme, request.host)
    name, scope, action = _scope_for(request)
    verified = await authenticator.verify_request(request.headers, realm, scope)
    # Known before any refusal, so a refused request's audit record names who asked.
    request["principal"] = verified.principal
    if name is not None and not verified.allows(name, action):
        if not verified.principal.anonymous and not services.may(verified.principal, action, name):
            # No token would help: policy refuses this user. The handler decides again and
            # answers 403 DENIED naming the rule (audited), before anything goes upstream.
            return await handler(request)
        raise authenticator.unauthorized(
            realm, scope, f"token does not grant {action} on {name}", "insufficient_scope"
        )
    mount_from = request.query.get("from") if request.method == "POST" else None
    if mount_from and not verified.allows(mount_from, "pull"):
        # Without pull on the source, a mount would copy a blob the client cannot read.
        raise authenticator.unauthorized(
            realm,
            f"{scope} repository:{mount_from}:pull",
            f"token does not grant pull on {mount_from}",
            "insufficient_scope",
        )
    return await handler(request)
