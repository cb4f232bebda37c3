"""Who may do what, per request: resolution, the policy decision, and their audit record.

Takes one policy snapshot per request (so a reload never shows a request half of each
policy), resolves short names through it, asks policy, records the decision (metrics and
the audit log), and raises `Denied` naming the rule when policy refuses.

It asks the pull path questions (does this repository have it upstream?) through
`ResolutionProbes` and says when a resolution is pinned through `on_pinned`; what the
cache does with either (recording holds, protecting a pinned repository's blobs) is the
pull path's business, wired by the composition root.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cachetools import TTLCache

from proxy.errors import NameUnknown, RegistryError
from proxy.names.addressing import Target
from proxy.names.references import Repository, is_digest, strip_docker_library
from proxy.names.resolver import Resolution
from proxy.observability.audit import AuditLog, AuditRecord, Event
from proxy.observability.metrics import Metrics
from proxy.policy.holder import PolicyHolder, PolicySnapshot
from proxy.policy.principal import Principal
from proxy.policy.rules import Decision
from proxy.storage.pins import Creator, PinCreators

log = logging.getLogger("registry_gate.policy")
# How long a short name's resolution is remembered for the blob requests that follow it.
RESOLUTION_MEMORY_SECONDS = 600.0


# Told each time a request resolves through a pin (the pull path protects its content).
PinnedHook = Callable[[Repository], Awaitable[None]]


class ResolutionProbes(Protocol):
    """What short-name resolution asks about a candidate repository (False only when it
    does not exist there; failures raise)."""

    async def blob_exists(self, repository: Repository, digest: str) -> bool:
        """Whether the repository has the blob."""
        ...

    async def manifest_exists(self, repository: Repository, reference: str) -> bool:
        """Whether the repository has the manifest (tag or digest)."""
        ...

    async def repository_exists(self, repository: Repository) -> bool:
        """Whether the repository exists."""
        ...


@dataclass(slots=True)
class AuditTrail:
    """How many audit records one request wrote (so the edge can audit what nothing did)."""

    records: int = 0


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What audit needs to know about the client side of a request."""

    request_id: str  # the gate's own id, never the client's
    client: str | None
    principal: Principal
    user_agent: str | None
    client_request_id: str | None = None  # the client's X-Request-Id, validated
    trail: AuditTrail = field(default_factory=AuditTrail)


@dataclass(frozen=True, slots=True)
class Access:
    """A request that policy allowed: what it means and where it is fetched."""

    repository: Repository  # the fully-qualified name policy judged
    location: Repository  # where the gate fetches it (registries.conf may relocate)
    resolution: Resolution | None
    decision: Decision
    snapshot: PolicySnapshot

    def audit_fields(self) -> dict[str, Any]:
        """Decision and resolution fields for the audit record."""
        extra: dict[str, Any] = {"policy": self.snapshot.fingerprint}
        if self.resolution is not None:
            extra["resolution"] = {
                "reason": self.resolution.reason,
                "search_position": self.resolution.search_position,
                "pinned": self.resolution.pinned,
                "pin_created": self.resolution.pin_created,
                "tried": [str(r) for r in self.resolution.tried],
            }
        if self.location != self.repository:
            extra["location"] = str(self.location)
        if self.decision.audit_message is not None:
            extra["audit_rule"] = self.decision.audit_message
        return extra


class Gatekeeper:
    """Resolves and decides for the request handlers."""

    def __init__(
        self,
        holder: PolicyHolder,
        probes: ResolutionProbes,
        metrics: Metrics,
        audit: AuditLog,
        registries: frozenset[str],
        pin_creators: PinCreators | None = None,
        *,
        on_pinned: PinnedHook | None = None,
    ) -> None:
        self.holder = holder
        self.pin_creators = pin_creators or PinCreators()
        self.probes = probes
        self.on_pinned = on_pinned
        self.metrics = metrics
        self.audit = audit
        self.registries = registries
        self._recent: TTLCache[str, Repository] = TTLCache(
            maxsize=65536, ttl=RESOLUTION_MEMORY_SECONDS
        )

    def _located(self, snapshot: PolicySnapshot, repository: Repository) -> Repository:
        location = snapshot.policy.pull_location(repository)
        if location.registry not in self.registries:
            raise NameUnknown(
                f"registry {location.registry} is not configured on this gate",
                detail={"registry": location.registry, "configured": sorted(self.registries)},
            )
        return location

    async def _resolve_pull(
        self,
        context: RequestContext,
        snapshot: PolicySnapshot,
        target: Target,
        reference: str | None,
        kind: str,
    ) -> tuple[Repository, Resolution | None]:
        if target.repository is not None:
            return target.repository, None
        short = strip_docker_library(target.short_name or target.requested)
        if kind != "manifest":
            # Blobs, tags and referrers follow the manifest's resolution when there was one.
            remembered = self._recent.get(short)
            if remembered is not None:
                return remembered, None
        if kind == "blob" and reference is not None:
            resolution = await snapshot.resolver.resolve(
                short, reference, self.probes.blob_exists, record_pin=False
            )
        elif kind == "manifest" and reference is not None:
            # A pin binds the name for everyone: only the principals policy.pin_creators
            # names create one; the others resolve by the same order without persisting.
            resolution = await snapshot.resolver.resolve(
                short,
                reference,
                self.probes.manifest_exists,
                record_pin=self.pin_creators.allows(context.principal),
                creator=Creator.of(context.principal, context.client, context.request_id),
            )
        else:
            # A tag list or referrers: the first search registry that has the repository.

            async def repository_probe(repository: Repository, _reference: str) -> bool:
                return await self.probes.repository_exists(repository)

            resolution = await snapshot.resolver.resolve(
                short, reference or "latest", repository_probe, record_pin=False
            )
        self.metrics.shortname_resolutions.labels(resolution.reason).inc()
        if resolution.pinned and self.on_pinned is not None:
            await self.on_pinned(resolution.repository)
        if resolution.pin_created:
            await self.record(
                context,
                event=Event.PIN_CREATED,
                action="pull",
                name=short,
                resolved=str(resolution.repository),
                upstream=resolution.repository.registry,
                reason=f"short name {short!r} pinned to {resolution.repository}",
                extra={"resolution": resolution.to_dict()},
            )
        self._recent[short] = resolution.repository
        return resolution.repository, resolution

    async def check_pull(
        self, context: RequestContext, target: Target, reference: str | None, kind: str
    ) -> Access:
        """Resolve and decide a pull (manifest, blob, tag list, referrers)."""
        # A decision that could not be recorded is refused before any work (fail_closed).
        self.audit.check_available()
        snapshot = self.holder.current
        try:
            repository, resolution = await self._resolve_pull(
                context, snapshot, target, reference, kind
            )
        except RegistryError as error:
            if error.status == 403:
                self.metrics.shortname_resolutions.labels("denied").inc()
                await self._record_denial(context, "pull", target.requested, None, error)
            elif target.repository is None:
                # No candidate has it (404), or a search registry failed (no fall-through).
                outcome = "not_found" if error.status == 404 else "error"
                self.metrics.shortname_resolutions.labels(outcome).inc()
                if outcome == "error":
                    # Design §4: every resolution is audited, a failed one too.
                    log.warning("short name %s not resolved: %s", target.requested, error.message)
                    await self.record(
                        context,
                        event="resolution",
                        action="pull",
                        name=target.requested,
                        decision="error",
                        status=error.status,
                        reason=error.message,
                    )
            raise
        tag = reference if kind == "manifest" and reference and not is_digest(reference) else None
        digest = reference if reference and is_digest(reference) else None
        decision = snapshot.policy.decide(context.principal, "pull", repository, tag, digest)
        return await self._conclude(context, target, snapshot, repository, resolution, decision)

    async def check_write(
        self, context: RequestContext, target: Target, action: str, reference: str | None
    ) -> Access:
        """Resolve and decide a push or delete (a short name goes to the push registry)."""
        self.audit.check_available()
        snapshot = self.holder.current
        resolution = None
        if target.repository is not None:
            repository = target.repository
        else:
            short = strip_docker_library(target.short_name or target.requested)
            try:
                resolution = await snapshot.resolver.resolve_write(short, action)
            except RegistryError as error:
                await self._record_denial(context, action, target.requested, None, error)
                raise
            repository = resolution.repository
        tag = reference if reference and not is_digest(reference) else None
        digest = reference if reference and is_digest(reference) else None
        decision = snapshot.policy.decide(context.principal, action, repository, tag, digest)
        # Writes go where the name says: registries.conf relocation applies to pulls only.
        return await self._conclude(context, target, snapshot, repository, resolution, decision)

    async def _conclude(
        self,
        context: RequestContext,
        target: Target,
        snapshot: PolicySnapshot,
        repository: Repository,
        resolution: Resolution | None,
        decision: Decision,
    ) -> Access:
        outcome = "allow" if decision.allowed else "deny"
        if decision.audit_only:
            outcome = "audit-deny"
        self.metrics.observe_decision(decision.action, outcome, decision.rule_name)
        if not decision.allowed:
            log.info("denied: %s", decision.message)
            await self._record_denial(
                context, decision.action, target.requested, decision.reference, decision
            )
            decision.check()
        location = self._located(snapshot, repository) if decision.action == "pull" else repository
        return Access(repository, location, resolution, decision, snapshot)

    async def _record_denial(
        self,
        context: RequestContext,
        action: str,
        name: str,
        resolved: str | None,
        cause: Decision | RegistryError,
    ) -> None:
        if isinstance(cause, Decision):
            rule, reason = cause.rule_name, cause.message
        else:
            rule, reason = None, cause.message
        await self.record(
            context,
            event="denial",
            action=action,
            name=name,
            resolved=resolved,
            decision="deny",
            rule=rule,
            status=403,
            reason=reason,
        )

    async def record(
        self,
        context: RequestContext,
        *,
        event: str,
        action: str,
        name: str,
        access: Access | None = None,
        resolved: str | None = None,
        decision: str | None = None,
        rule: str | None = None,
        digest: str | None = None,
        status: int | None = None,
        size: int | None = None,
        reason: str | None = None,
        upstream: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Write one audit record for a decision-bearing request."""
        fields: dict[str, Any] = dict(extra or {})
        if context.client_request_id is not None:
            fields["client_request_id"] = context.client_request_id
        context.trail.records += 1
        if access is not None:
            fields.update(access.audit_fields())
            resolved = resolved or str(access.repository)
            if decision is None:
                decision = "audit-deny" if access.decision.audit_only else "allow"
            rule = rule or access.decision.rule_name
        await self.audit.write(
            AuditRecord(
                event=event,
                action=action,
                request_id=context.request_id,
                client=context.client,
                principal=context.principal,
                name=name,
                resolved=resolved,
                digest=digest,
                decision=decision,
                rule=rule,
                upstream=access.location.registry if access is not None else upstream,
                status=status,
                bytes=size,
                reason=reason,
                extra=fields,
            )
        )
