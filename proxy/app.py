"""Composition root: builds the aiohttp application and its services from settings."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.middleware import error_middleware
from proxy.pull_through import PullThrough
from proxy.push import Pusher
from proxy.routes import add_routes
from proxy.services import SERVICES, Services
from proxy.settings import Settings
from proxy.upload_tokens import UploadSealer
from proxy.upstream import UpstreamClient

log = logging.getLogger("registry_gate")
# Headers (and the request line) larger than this are refused with 431/400.
MAX_HEADER_SIZE = 16 * 1024


def build_services(settings: Settings) -> Services:
    """Create (not yet start) every service from validated settings."""
    clients = {u.registry: UpstreamClient(u) for u in settings.upstreams}
    search = [u.registry for u in settings.upstreams]
    # Replicas that share upload sessions must share this secret (settings.upload_secret).
    secret = (settings.upload_secret or secrets.token_hex(32)).encode()
    return Services(
        settings=settings,
        clients=clients,
        pull=PullThrough(clients),
        pusher=Pusher(clients, UploadSealer(secret)),
        search=search,
    )


async def _upstream_lifecycle(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    for client in services.clients.values():
        await client.start()
    yield
    for client in services.clients.values():
        await client.close()


def build_app(settings: Settings, services: Services | None = None) -> web.Application:
    """The aiohttp application for these settings."""
    app = web.Application(
        middlewares=[error_middleware],
        handler_args={"max_line_size": MAX_HEADER_SIZE, "max_field_size": MAX_HEADER_SIZE},
        client_max_size=4 * 1024 * 1024,
    )
    app[SERVICES] = services or build_services(settings)
    app.cleanup_ctx.append(_upstream_lifecycle)
    add_routes(app)
    return app
