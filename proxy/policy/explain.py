"""Explaining a decision without a request: `registry-gate policy explain` and its endpoint.

Owns the answer to "what would happen if this principal did this action on this
reference, and why": the resolution path of a short name (alias, pin, search position,
the candidates in order, each with the decision it would get), the deciding rule (file,
index, name) and any audit-mode rule that would deny. Nothing here touches an upstream
unless the caller passes a probe; even then no pin is written.

References are taken as a user writes them (`ubuntu`, `ubuntu:22.04`,
`quay.io/coreos/etcd@sha256:...`); with neither tag nor digest, `latest` is assumed as
clients do. A reference with both a tag and a digest is decided by the digest, which is
all a client sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.errors import RegistryError
from proxy.names.references import Repository, parse_reference
from proxy.names.resolver import Probe, ResolutionPlan, ShortNameResolver
from proxy.policy.principal import Principal
from proxy.policy.rules import ACTIONS, Decision, Policy
from proxy.storage.pins import PinStore


@dataclass(frozen=True, slots=True)
class CandidateExplanation:
    """One candidate of a short name and the decision it would get."""

    repository: Repository
    location: Repository
    search_position: int | None
    decision: Decision
    found: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "repository": str(self.repository),
            "location": str(self.location),
            "search_position": self.search_position,
            "decision": self.decision.to_dict(),
            "found": self.found,
        }


@dataclass(frozen=True, slots=True)
class Explanation:
    """The decision and resolution path for (principal, action, reference)."""

    principal: str
    action: str
    reference: str
    tag: str | None
    digest: str | None
    short_name: str | None
    reason: str
    resolved: Repository | None
    location: Repository | None
    decision: Decision | None
    candidates: tuple[CandidateExplanation, ...]
    plan: ResolutionPlan | None
    probed: bool
    notes: tuple[str, ...]
    policy_fingerprint: str
    policy_sources: tuple[str, ...]

    @property
    def allowed(self) -> bool | None:
        """The outcome, or None when it depends on which candidate an upstream has."""
        if self.decision is not None:
            return self.decision.allowed
        if self.reason == "refused":
            return False
        outcomes = {c.decision.allowed for c in self.candidates}
        return outcomes.pop() if len(outcomes) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the HTTP endpoint's body, `policy explain --json`)."""
        return {
            "principal": self.principal,
            "action": self.action,
            "reference": self.reference,
            "tag": self.tag,
            "digest": self.digest,
            "short_name": self.short_name,
            "reason": self.reason,
            "resolved": str(self.resolved) if self.resolved is not None else None,
            "location": str(self.location) if self.location is not None else None,
            "allowed": self.allowed,
            "decision": self.decision.to_dict() if self.decision is not None else None,
            "candidates": [c.to_dict() for c in self.candidates],
            "resolution": self.plan.to_dict() if self.plan is not None else None,
            "probed": self.probed,
            "notes": list(self.notes),
            "policy": {
                "fingerprint": self.policy_fingerprint,
                "sources": list(self.policy_sources),
            },
        }


async def explain(
    policy: Policy,
    pins: PinStore,
    principal: Principal,
    action: str,
    reference: str,
    *,
    push_registry: str | None = None,
    probe: Probe | None = None,
) -> Explanation:
    """Explain a decision. Raises NameInvalid/TagInvalid/DigestInvalid for a bad reference
    and ValueError for an unknown action; never contacts an upstream unless `probe` is
    given (then it probes the candidates of an ambiguous short name, without pinning)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r} (expected one of {', '.join(ACTIONS)})")
    parsed = parse_reference(reference)
    notes: list[str] = []
    tag, digest = parsed.tag, parsed.digest
    if tag is None and digest is None:
        tag = "latest"
        notes.append("no tag given: clients use :latest")
    if tag is not None and digest is not None:
        notes.append(f"a client sends only the digest: the tag {tag!r} is not decided on")
        tag = None
    if parsed.registry is not None:
        repository = Repository.of(parsed.registry, parsed.path)
        location = policy.pull_location(repository) if action == "pull" else repository
        decision = policy.decide(principal, action, repository, tag, digest)
        return Explanation(
            principal=principal.describe(),
            action=action,
            reference=reference,
            tag=tag,
            digest=digest,
            short_name=None,
            reason="qualified",
            resolved=repository,
            location=location,
            decision=decision,
            candidates=(),
            plan=None,
            probed=False,
            notes=tuple(notes),
            policy_fingerprint=policy.fingerprint,
            policy_sources=policy.sources,
        )

    name = parsed.path
    resolver = ShortNameResolver(policy, pins, push_registry)
    plan = await resolver.plan(name, action)
    candidates = [
        CandidateExplanation(
            c.repository,
            c.location,
            c.search_position,
            policy.decide(principal, action, c.repository, tag, digest),
        )
        for c in plan.candidates
    ]
    reason: str = plan.reason or "refused"
    chosen: CandidateExplanation | None = None
    probed = False
    if plan.refusal is not None:
        notes.append(plan.refusal.message)
    elif probe is not None and plan.needs_probe:
        probed = True
        chosen, reason = await _probe(resolver, plan, candidates, name, tag or digest, probe, notes)
    elif len(candidates) == 1:
        chosen = candidates[0]
        if plan.pins_on_success:
            notes.append(
                f"the first successful pull by a pin creator (policy.pin_creators) pins "
                f"{name!r} to {chosen.repository}"
            )
    else:
        reason = "undetermined"
        pinning = (
            ", and is pinned when a pin creator (policy.pin_creators) pulls"
            if plan.pins_on_success
            else ""
        )
        notes.append(f"the first candidate in search order that has the reference wins{pinning}")
    if plan.reason == "pin" and plan.pin is not None:
        by = plan.pin.created_by
        who = "unknown" if by is None else (by.user or "anonymous")
        notes.append(
            f"pinned on {plan.pin.created or 'unknown'} by {who}; remove the pin to resolve "
            "it again"
        )
    return Explanation(
        principal=principal.describe(),
        action=action,
        reference=reference,
        tag=tag,
        digest=digest,
        short_name=name,
        reason=reason,
        resolved=chosen.repository if chosen is not None else None,
        location=chosen.location if chosen is not None else None,
        decision=chosen.decision if chosen is not None else None,
        candidates=tuple(candidates),
        plan=plan,
        probed=probed,
        notes=tuple(notes),
        policy_fingerprint=policy.fingerprint,
        policy_sources=policy.sources,
    )


async def _probe(
    resolver: ShortNameResolver,
    plan: ResolutionPlan,
    candidates: list[CandidateExplanation],
    name: str,
    reference: str | None,
    probe: Probe,
    notes: list[str],
) -> tuple[CandidateExplanation | None, str]:
    """Resolve for real (no pin written) and mark what each candidate answered."""
    assert reference is not None
    try:
        resolution = await resolver.resolve(name, reference, probe, record_pin=False)
    except RegistryError as exc:
        notes.append(f"resolution fails: {exc.message}")
        return None, "refused"
    tried = set(resolution.tried)
    for i, candidate in enumerate(candidates):
        if candidate.location in tried:
            found = candidate.repository == resolution.repository
            candidates[i] = CandidateExplanation(
                candidate.repository,
                candidate.location,
                candidate.search_position,
                candidate.decision,
                found,
            )
    chosen = next(c for c in candidates if c.repository == resolution.repository)
    if plan.pins_on_success:
        notes.append(
            f"a pull now by a pin creator (policy.pin_creators) would pin {name!r} to "
            f"{chosen.repository}"
        )
    return chosen, resolution.reason


def _decision_line(decision: Decision) -> str:
    verdict = "ALLOWED" if decision.allowed else "DENIED"
    if decision.rule is None:
        source = "by the policy default (no rule matched)"
    else:
        source = f'by rule "{decision.rule.name}" ({decision.rule.where})'
    why = f": {decision.reason}" if decision.reason and decision.rule is not None else ""
    line = f"{verdict} {source}{why}"
    if decision.audit_rule is not None:
        line += (
            f'\n      audit: rule "{decision.audit_rule.name}" ({decision.audit_rule.where}, '
            "mode: audit) would deny it"
        )
    return line


def format_explanation(result: Explanation) -> str:
    """A human-readable explanation for the command line."""
    lines = [f"{result.action} {result.reference} as {result.principal}"]
    lines.append(
        f"  policy {result.policy_fingerprint} from {', '.join(result.policy_sources) or '-'}"
    )
    plan = result.plan
    if plan is None:
        shown = result.decision.reference if result.decision is not None else result.resolved
        lines.append(f"  fully qualified: {shown}")
        if result.location is not None and result.location != result.resolved:
            lines.append(f"    fetched from {result.location}")
    else:
        how = {
            "alias": "alias",
            "pin": "pin",
            "search": "search list",
            "push_registry": "push registry",
        }.get(plan.reason or "", "refused")
        lines.append(
            f'  short name "{plan.name}" (short_name_mode: {plan.mode}), resolved by {how}'
            + (" (probed)" if result.probed else "")
        )
        for candidate in result.candidates:
            position = (
                f"search[{candidate.search_position}]"
                if candidate.search_position is not None
                else plan.reason or "candidate"
            )
            found = {True: " [has it]", False: " [not found]", None: ""}[candidate.found]
            ref = candidate.decision.reference
            lines.append(f"    {position} {ref}{found}")
            if candidate.location != candidate.repository:
                lines.append(f"      fetched from {candidate.location}")
            lines.append(f"      {_decision_line(candidate.decision)}")
    for note in result.notes:
        lines.append(f"  note: {note}")
    if result.decision is not None:
        lines.append(f"  decision: {_decision_line(result.decision)}")
    elif result.allowed is not None:
        verdict = "ALLOWED" if result.allowed else "DENIED"
        lines.append(f"  decision: {verdict} whichever candidate it resolves to")
    else:
        lines.append("  decision: depends on which candidate has the reference (see above)")
    return "\n".join(lines)
