"""The services a running gate is made of, as one typed object in the aiohttp app.

Built by the composition root (`app.py`) from validated settings; handlers reach it with
`request.app[SERVICES]`. Nothing here is a module-level singleton.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from proxy.auth.authenticator import (
    GRANTABLE_ACTIONS,
    Authenticator,
    CredentialsInvalid,
    LoginLimited,
)
from proxy.content.pull_through import PullThrough
from proxy.content.push import Pusher
from proxy.errors import RegistryError
from proxy.names.addressing import locate
from proxy.names.references import Repository, strip_docker_library
from proxy.observability.audit import AuditLog, AuditRecord, Event
from proxy.observability.metrics import Metrics
from proxy.policy.gatekeeper import Gatekeeper
from proxy.policy.holder import PolicyHolder
from proxy.policy.principal import Principal
from proxy.settings import Settings
from proxy.storage.redis_client import RedisState
from proxy.storage.redis_ratelimits import SharedRateLimits
from proxy.upstream.api import Registry


@dataclass
class Services:
    """Everything the request handlers use."""

    settings: Settings
    clients: Mapping[str, Registry]
    pull: PullThrough
    pusher: Pusher
    metrics: Metrics
    audit: AuditLog
    holder: PolicyHolder
    gatekeeper: Gatekeeper
    authenticator: Authenticator | None = None
    # The Redis connection of the stores kept there (`redis:`); None: all in-process.
    shared: RedisState | None = None
    # The upstream rate-limit budgets replicas share through it (with `shared`).
    ratelimits: SharedRateLimits | None = None

    def may(self, principal: Principal, action: str, name: str) -> bool:
        """Whether policy could allow `action` on the repository a client calls `name`.

        Used to cut token grants down; the registry side decides again per request (with
        the tag, after short-name resolution), so a pull of a short name is granted here.
        """
        if action not in GRANTABLE_ACTIONS:
            return False
        try:
            target = locate(name, None, self.registries)
        except RegistryError:
            return False
        snapshot = self.holder.current
        repository = target.repository
        if repository is None:
            if action == "pull":
                return True
            registry = self.settings.push_registry
            if registry is None:
                return False
            repository = Repository.of(registry, strip_docker_library(name))
        return snapshot.policy.decide(principal, action, repository).allowed

    def observe_token(self, outcome: str) -> None:
        """Count a token endpoint outcome."""
        self.metrics.token_requests.labels(outcome).inc()

    async def record_login_failure(
        self, error: CredentialsInvalid, *, request_id: str, client: str | None, endpoint: str
    ) -> None:
        """Count and audit a refused login: who was tried, from where, why; no password."""
        self.metrics.login_failures.labels(error.reason).inc()
        extra = {"endpoint": endpoint}
        status = 401
        if isinstance(error, LoginLimited):
            self.metrics.logins_limited.labels(error.bucket).inc()
            extra["bucket"] = error.bucket
            status = 429
        await self.audit.write(
            AuditRecord(
                event=Event.LOGIN_FAILURE,
                action="login",
                request_id=request_id,
                client=client,
                name=error.user,
                decision="deny",
                status=status,
                reason=error.reason,
                extra=extra,
            )
        )

    @property
    def registries(self) -> frozenset[str]:
        """The registries of the upstream table."""
        return frozenset(self.clients)


SERVICES = web.AppKey("services", Services)
