"""Composition root: builds the aiohttp application and its services from settings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web

from proxy import __version__
from proxy.auth.authenticator import Authenticator
from proxy.auth.credentials import UserDirectory
from proxy.auth.login_limits import LoginLimiter
from proxy.auth.tokens import TokenIssuer, TokenVerifier, load_private_key
from proxy.auth.upload_tokens import UploadOwner, UploadSealer
from proxy.content.pull_through import PullThrough
from proxy.content.push import Pusher
from proxy.content.replica_fills import ReplicaFills
from proxy.content.upload_handoff import UploadHandoff
from proxy.http.drain import DRAIN, Drain, drain_middleware
from proxy.http.middleware import auth_middleware, error_middleware
from proxy.http.operator_routes import add_operator_routes
from proxy.http.replica_routes import add_replica_routes
from proxy.http.routes import add_routes
from proxy.http.token_routes import add_token_routes
from proxy.http.upload_hop_routes import add_upload_hop_routes
from proxy.observability.audit import AuditLog
from proxy.observability.metrics import Metrics
from proxy.policy.gatekeeper import Gatekeeper
from proxy.policy.holder import PolicyHolder, PolicySources
from proxy.services import SERVICES, Services
from proxy.settings import Settings
from proxy.storage.cache import Cache, close_pin_store, pin_store
from proxy.storage.pins import PinCreators
from proxy.storage.redis_client import RedisState
from proxy.storage.redis_mutex import RedisMutexes
from proxy.storage.redis_ratelimits import SharedRateLimits
from proxy.upstream.api import Registry
from proxy.upstream.circuit import CircuitBreaker
from proxy.upstream.client import UpstreamClient, UpstreamObserver

log = logging.getLogger("registry_gate")
# Headers (and the request line) larger than this are refused with 431/400.
MAX_HEADER_SIZE = 16 * 1024


def build_services(settings: Settings, upstreams: Mapping[str, Registry] | None = None) -> Services:
    """Create (not yet start) every service from validated settings.

    `upstreams` replaces the HTTP clients of the upstream table (the in-process tests
    give in-memory registries; their names must be the table's). Raises ConfigError
    (PolicyError included) for what the settings name but is invalid.
    """
    metrics = Metrics(version=__version__)
    shared = ratelimits = None
    if settings.redis is not None:
        errors = metrics.shared_state_errors
        shared = RedisState.from_settings(
            settings.redis, on_error=lambda store: errors.labels(store).inc()
        )
        known = frozenset(u.registry for u in settings.upstreams)
        ratelimits = SharedRateLimits(shared, metrics, known)
    if upstreams is None:
        observer: UpstreamObserver = metrics if ratelimits is None else ratelimits
        upstreams = _upstream_clients(settings, metrics, observer)
    clients = upstreams
    pull = PullThrough(
        clients,
        metrics=metrics,
        tag_lists=settings.tag_lists,
        revalidate_grace=settings.storage.revalidate_grace,
        replicas=ReplicaFills.from_settings(settings, metrics, shared),
    )
    audit = AuditLog.for_gate(settings, metrics=metrics)
    pins = pin_store(settings, shared)
    holder = PolicyHolder(
        PolicySources.from_settings(settings),
        pins,
        on_reload=lambda outcome: metrics.policy_reloads.labels(outcome).inc(),
    )
    # Replicas that share upload sessions must share this secret (settings.upload_secret).
    secret = (settings.upload_secret or secrets.token_hex(32)).encode()
    # With several replicas, each upload id names the replica holding its running hash.
    handoff = UploadHandoff.from_settings(settings, metrics)
    owner = UploadOwner(settings.replica.id, settings.peer_url()) if handoff else None
    return Services(
        settings=settings,
        clients=clients,
        pull=pull,
        pusher=Pusher(
            clients,
            UploadSealer(secret, owner),
            metrics,
            settings.uploads,
            handoff,
            mutexes=None if shared is None else RedisMutexes(shared),
        ),
        metrics=metrics,
        audit=audit,
        holder=holder,
        gatekeeper=Gatekeeper(
            holder,
            pull,
            metrics,
            audit,
            frozenset(clients),
            PinCreators(settings.policy.pin_creators),
            # A pin promises the same image: the pull path keeps its content cached.
            on_pinned=pull.protect,
        ),
        authenticator=build_authenticator(settings) if settings.auth.mode == "token" else None,
        shared=shared,
        ratelimits=ratelimits,
    )


def _upstream_clients(
    settings: Settings, metrics: Metrics, observer: UpstreamObserver
) -> dict[str, Registry]:
    """The HTTP client of each upstream in the table, each with its circuit breaker;
    `observer` sees their exchanges (the metrics, or the budgets shared with replicas)."""
    return {
        u.registry: UpstreamClient(
            u,
            observer,
            breaker=CircuitBreaker(
                u.circuit.failures,
                u.circuit.cooldown,
                on_change=partial(metrics.set_circuit_state, u.registry),
            ),
        )
        for u in settings.upstreams
    }


def build_authenticator(settings: Settings) -> Authenticator:
    """The client-facing token service and verifier from the auth settings."""
    auth = settings.auth
    users = UserDirectory.from_settings(auth)
    issuer = None
    if auth.signing_key is not None:
        issuer = TokenIssuer(
            load_private_key(auth.signing_key), auth.issuer, auth.service, auth.token_ttl
        )
    verifier = TokenVerifier.build(
        issuer, auth.service, auth.trusted_issuers, fetch_jwks, users.groups_of
    )
    limiter = LoginLimiter(auth.login_limits)
    return Authenticator(auth.realm, auth.service, issuer, verifier, users, limiter)


async def fetch_jwks(url: str) -> dict[str, Any]:
    """Fetch an external issuer's JWKS document (capped, short timeout)."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
        session.get(url) as response,
    ):
        response.raise_for_status()
        body = await response.content.read(1024 * 1024)
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("JWKS document is not an object")
    return document


async def _upstream_lifecycle(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    for client in services.clients.values():
        await client.start()
    handoff = services.pusher.handoff
    if handoff is not None:
        await handoff.start()
    yield
    # Coalesced upstream exchanges (background tag revalidations) use the clients.
    await services.pull.close()
    # Uploads cut by the shutdown are cancelled upstream before the pools close.
    await services.pusher.drain()
    if handoff is not None:
        await handoff.close()
    for client in services.clients.values():
        await client.close()


async def _shared_state_lifecycle(app: web.Application) -> AsyncIterator[None]:
    shared = app[SERVICES].shared
    if shared is None:
        yield
        return
    # A Redis that is down at start-up costs efficiency, as it does later: start anyway.
    if not await shared.ping():
        log.warning("redis is unreachable at start-up: serving degraded until it answers")
    yield
    ratelimits = app[SERVICES].ratelimits
    if ratelimits is not None:
        await ratelimits.close()
    pins = app[SERVICES].holder.pins
    await close_pin_store(pins)
    await shared.close()


async def _cache_lifecycle(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    pull = services.pull
    pull.cache = await Cache.open(
        services.settings.storage,
        services.metrics,
        on_fill_finished=pull.fill_finished,
        shared=services.shared,
    )
    for pin in await services.holder.pins.list():
        await pull.protect(pin.repository)
    yield
    await pull.cache.close()


async def _replica_fills_lifecycle(app: web.Application) -> AsyncIterator[None]:
    replicas = app[SERVICES].pull.replicas
    if replicas is None:
        yield
        return
    await replicas.start()
    yield
    await replicas.close()


async def _policy_watch_lifecycle(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    if not services.settings.policy.watch:
        yield
        return
    task = asyncio.create_task(services.holder.watch(), name="policy-watch")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _audit_lifecycle(app: web.Application) -> AsyncIterator[None]:
    # Closed after the handlers finish, so the queue drains every record they wrote.
    async with app[SERVICES].audit:
        yield


def build_app(settings: Settings, services: Services | None = None) -> web.Application:
    """The aiohttp application for these settings."""
    app = web.Application(
        middlewares=[error_middleware, drain_middleware, auth_middleware],
        handler_args={
            "max_line_size": MAX_HEADER_SIZE,
            "max_field_size": MAX_HEADER_SIZE,
            # Upload bodies are forwarded byte for byte: never gunzip what a client sent.
            "auto_decompress": False,
            # aiohttp arms this timer when a connection opens and only a complete request
            # stops it, so it is also the deadline for a client that drips its headers.
            "keepalive_timeout": settings.idle_timeout,
        },
        client_max_size=4 * 1024 * 1024,
    )
    app[SERVICES] = services or build_services(settings)
    app[DRAIN] = Drain()
    app.cleanup_ctx.append(_audit_lifecycle)
    # Shared state first: closed last, after everything that may still write to it.
    app.cleanup_ctx.append(_shared_state_lifecycle)
    # Before the cache: closed after it, so fills cut by the shutdown release their leases.
    app.cleanup_ctx.append(_replica_fills_lifecycle)
    app.cleanup_ctx.append(_cache_lifecycle)
    app.cleanup_ctx.append(_policy_watch_lifecycle)
    app.cleanup_ctx.append(_upstream_lifecycle)
    add_routes(app)
    if app[SERVICES].pull.replicas is not None:
        add_replica_routes(app)
    if app[SERVICES].pusher.handoff is not None:
        add_upload_hop_routes(app)
    add_token_routes(app)
    add_operator_routes(
        app,
        metrics_here=settings.metrics.enabled and not settings.metrics.listen,
        # In token mode the main port is the clients' port: operators only (issue 11).
        guarded=app[SERVICES].authenticator is not None,
    )
    return app


def build_metrics_app(services: Services) -> web.Application:
    """The `/metrics` app for a separate listen address."""
    app = web.Application()
    app[SERVICES] = services
    add_operator_routes(app, metrics_here=True, health=False)
    return app
