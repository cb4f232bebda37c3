"""Operator endpoints: `/metrics`, `/policy/explain`, `/healthz` and `/readyz`."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import Unsupported
from proxy.explain import explain
from proxy.principal import Principal
from proxy.services import SERVICES


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition of the gate's private registry."""
    services = request.app[SERVICES]
    cache = services.pull.open_cache
    if cache is not None:
        # The blob store keeps its running totals; publish them as the scrape reads them.
        usage = await cache.blobs.stats()
        services.metrics.observe_cache_usage(usage.bytes, usage.filling, usage.removed_open)
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
    """Readiness: the audit log can be written (a gate that cannot audit must not serve)."""
    services = request.app[SERVICES]
    problems: dict[str, str] = {}
    if services.audit.last_error is not None:
        problems["audit"] = services.audit.last_error
    status = 503 if problems else 200
    return web.json_response(
        {"status": "ready" if not problems else "unready", **problems}, status=status
    )


def add_operator_routes(app: web.Application, *, metrics_here: bool, health: bool = True) -> None:
    """Register the operator endpoints on an app."""
    if metrics_here:
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/policy/explain", policy_explain)
    if health:
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
