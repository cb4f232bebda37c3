"""Request-wide concerns: request ids, authentication, and the one place errors are rendered.

Every error reaching a client is the OCI JSON form; an unexpected exception becomes a
500 that names the request id and nothing else (no traceback, no credential).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.addressing import parse_v2_path
from proxy.auth import METHOD_ACTIONS
from proxy.errors import RegistryError
from proxy.logging_setup import request_id_bound
from proxy.principal import ANONYMOUS
from proxy.services import SERVICES

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
log = logging.getLogger("registry_gate.http")
access_log = logging.getLogger("registry_gate.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_HTTP_CODES = {
    400: "UNSUPPORTED",
    404: "NOT_FOUND",
    405: "UNSUPPORTED",
    413: "SIZE_INVALID",
    431: "UNSUPPORTED",
}


def error_response(error: RegistryError, request_id: str) -> web.Response:
    """Render a gate error as its OCI JSON response."""
    response = web.Response(status=error.status, body=error.body(), content_type="application/json")
    response.headers.update(error.headers)
    response.headers["X-Request-Id"] = request_id
    response.headers[API_VERSION_HEADER[0]] = API_VERSION_HEADER[1]
    return response


def request_id_of(request: web.Request) -> str:
    """The id of this request (set by the middleware)."""
    value = request.get("request_id")
    return value if isinstance(value, str) else "-"


def route_label(request: web.Request) -> str:
    """A bounded label for the endpoint of a request (never a name or digest)."""
    path = request.path
    if path in ("/v2", "/v2/"):
        return "v2"
    if path.startswith("/v2/"):
        route = parse_v2_path(path[4:])
        return route.kind if route is not None else "unknown"
    if path in ("/token", "/metrics", "/healthz", "/readyz"):
        return path[1:]
    return "other"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Assign a request id, render errors as OCI JSON, count the request."""
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else ""
    request["request_id"] = request_id or uuid.uuid4().hex
    started = time.monotonic()
    with request_id_bound(request["request_id"]):
        response = await _render_errors(request, handler)
    metrics = request.app[SERVICES].metrics
    seconds = time.monotonic() - started
    route = route_label(request)
    metrics.observe_request(route, request.method, response.status, seconds)
    # The access log: one structured line per request (the path never carries a secret;
    # query strings and headers, which may, are left out).
    access_log.info(
        "%s %s %d",
        request.method,
        request.path,
        response.status,
        extra={
            "request_id": request["request_id"],
            "client": request.remote,
            "route": route,
            "status": response.status,
            "duration_ms": round(seconds * 1000, 2),
        },
    )
    if response.status == 403:
        metrics.observe_denial(
            METHOD_ACTIONS.get(request.method, "pull"), request.headers.get("User-Agent")
        )
    return response


async def _render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except RegistryError as error:
        return error_response(error, request["request_id"])
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "UNKNOWN")
        return error_response(_http_error(code, exc.status, exc.reason), request["request_id"])
    except Exception:
        log.exception("unhandled error", extra={"request_id": request["request_id"]})
        internal = RegistryError(f"internal error (request id {request['request_id']})")
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
    route = parse_v2_path(request.match_info.get("tail", "")) if request.path != "/v2/" else None
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
    if name is not None and not verified.allows(name, action):
        if not verified.principal.anonymous and not services.may(verified.principal, action, name):
            # No token would help: policy refuses this user. The handler decides again and
            # answers 403 DENIED naming the rule (audited), before anything goes upstream.
            request["principal"] = verified.principal
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
    request["principal"] = verified.principal
    return await handler(request)
