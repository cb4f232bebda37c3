"""The services a running gate is made of, as one typed object in the aiohttp app.

Built by the composition root (`app.py`) from validated settings; handlers reach it with
`request.app[SERVICES]`. Nothing here is a module-level singleton.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from cachetools import TTLCache

from proxy.audit import AuditLog
from proxy.auth import Authenticator
from proxy.metrics import Metrics
from proxy.principal import Principal
from proxy.pull_through import PullThrough
from proxy.push import Pusher
from proxy.references import Repository
from proxy.settings import Settings
from proxy.upstream import UpstreamClient

# How long a short name's resolution is remembered for the blob requests that follow it.
RESOLUTION_MEMORY_SECONDS = 600.0


@dataclass
class Services:
    """Everything the request handlers use."""

    settings: Settings
    clients: dict[str, UpstreamClient]
    pull: PullThrough
    pusher: Pusher
    search: list[str]
    metrics: Metrics
    audit: AuditLog
    authenticator: Authenticator | None = None
    recent_resolutions: TTLCache[str, Repository] = field(
        default_factory=lambda: TTLCache(maxsize=65536, ttl=RESOLUTION_MEMORY_SECONDS)
    )

    def may(self, principal: Principal, action: str, name: str) -> bool:
        """Whether policy could allow `action` on the repository a client calls `name`.

        Used to cut token grants down; the registry side decides again per request.
        """
        return True

    def observe_token(self, outcome: str) -> None:
        """Count a token endpoint outcome."""
        self.metrics.token_requests.labels(outcome).inc()

    @property
    def registries(self) -> frozenset[str]:
        """The registries of the upstream table."""
        return frozenset(self.clients)


SERVICES = web.AppKey("services", Services)
