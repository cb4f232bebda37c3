"""Short-name resolution (design §4): from `ubuntu` to one fully-qualified repository.

Owns the order of candidates and the modes. For a pull of short name N (a Docker mirror
request's `library/` already taken away by the caller):

1. an alias for N is the only candidate (whatever the mode);
2. in `permissive` mode a pin for N is the only candidate (pins hold when the search
   list changes, and survive restarts: see `proxy.storage.pins`);
3. otherwise the candidates are `search[i]/N` in order (Docker Hub adds `library/` to a
   one-component name). `enforcing` refuses more than one candidate (DENIED, naming the
   candidates and how to alias); `disabled` and `permissive` ask the upstreams in order
   and the first that has the reference wins; `permissive` then pins N to the winner,
   when the caller allows it (only principals `policy.pin_creators` names create pins:
   the others resolve by the same search order without persisting the outcome).

The caller supplies the probe: True when the upstream has the reference, False on 404,
and an exception for anything else, which fails the resolution instead of falling through
to a later registry (a registry that is down must not let a later one serve a squatted
name). A single candidate is not probed unless it is about to be pinned. Writes
(push/delete) of a short name go to the configured push registry.

Resolution is the same for every principal (a pin is global); policy decides afterwards
on the resolved reference. Candidates are probed at their pull location (registries.conf
`location`), while the resolved repository, which policy and pins see, keeps its name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from proxy.errors import Denied, ManifestUnknown, NameInvalid, NameUnknown, RegistryError
from proxy.names.references import Repository, is_digest, looks_like_registry, validate_name
from proxy.names.registries_conf import ShortNameMode
from proxy.policy.rules import ACTIONS, Policy
from proxy.storage.pins import Creator, Pin, PinStore

Probe = Callable[[Repository, str], Awaitable[bool]]
Reason = Literal["alias", "pin", "search", "push_registry"]
_PLURAL = {"pull": "pulls", "push": "pushes", "delete": "deletes"}


@dataclass(frozen=True, slots=True)
class Candidate:
    """A repository a short name may mean, and where a pull of it is fetched from."""

    repository: Repository
    location: Repository
    search_position: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form for explain and audit."""
        return {
            "repository": str(self.repository),
            "location": str(self.location),
            "search_position": self.search_position,
        }


@dataclass(frozen=True, slots=True)
class ResolutionPlan:
    """How a short name would resolve, before asking any upstream."""

    name: str
    action: str
    mode: ShortNameMode
    reason: Reason | None
    candidates: tuple[Candidate, ...]
    pin: Pin | None = None
    refusal: RegistryError | None = None
    needs_probe: bool = False
    pins_on_success: bool = False

    @property
    def determined(self) -> bool:
        """Whether the outcome is known without probing (one candidate, or a refusal)."""
        return self.refusal is not None or len(self.candidates) == 1

    def to_dict(self) -> dict[str, Any]:
        """JSON form for explain."""
        return {
            "name": self.name,
            "action": self.action,
            "mode": self.mode,
            "reason": self.reason,
            "candidates": [c.to_dict() for c in self.candidates],
            "pin": self.pin.to_dict() if self.pin is not None else None,
            "refused": self.refusal.message if self.refusal is not None else None,
            "needs_probe": self.needs_probe,
            "pins_on_success": self.pins_on_success,
        }


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a short name resolved to and why (audited with every resolution)."""

    name: str
    reference: str | None
    repository: Repository
    location: Repository
    reason: Reason
    mode: ShortNameMode
    search_position: int | None
    candidates: tuple[Repository, ...]
    tried: tuple[Repository, ...]
    pinned: bool
    pin_created: bool = False  # this resolution created the pin (audited as pin_created)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the audit record."""
        return {
            "name": self.name,
            "reference": self.reference,
            "repository": str(self.repository),
            "location": str(self.location),
            "reason": self.reason,
            "mode": self.mode,
            "search_position": self.search_position,
            "candidates": [str(c) for c in self.candidates],
            "tried": [str(t) for t in self.tried],
            "pinned": self.pinned,
            "pin_created": self.pin_created,
        }


def _with_reference(repository: Repository | str, reference: str) -> str:
    return f"{repository}{'@' if is_digest(reference) else ':'}{reference}"


def check_short_name(name: str) -> str:
    """Validate a short name (`ubuntu`, `team/app`); a registry in it is an error here."""
    validate_name(name)
    if looks_like_registry(name.partition("/")[0]):
        raise NameInvalid(
            "not a short name: the first component names a registry", detail={"name": name}
        )
    return name


class ShortNameResolver:
    """Resolves short names for one policy snapshot; pins are shared across snapshots."""

    def __init__(self, policy: Policy, pins: PinStore, push_registry: str | None = None) -> None:
        self.policy = policy
        self.pins = pins
        self.push_registry = push_registry

    def _candidate(self, repository: Repository, position: int | None = None) -> Candidate:
        return Candidate(repository, self.policy.pull_location(repository), position)

    async def plan(self, name: str, action: str = "pull") -> ResolutionPlan:
        """The candidates of a short name for an action, reading pins but no upstream."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        check_short_name(name)
        mode = self.policy.short_name_mode
        if action != "pull":
            return self._write_plan(name, action, mode)
        alias = self.policy.aliases.get(name)
        if alias is not None:
            return ResolutionPlan(name, action, mode, "alias", (self._candidate(alias),))
        if mode == "permissive":
            pin = await self.pins.get(name)
            if pin is not None:
                return ResolutionPlan(
                    name, action, mode, "pin", (self._candidate(pin.repository),), pin=pin
                )
        search = self.policy.search
        candidates = tuple(
            self._candidate(Repository.of(registry, name), i) for i, registry in enumerate(search)
        )
        if not candidates:
            refusal: RegistryError = NameUnknown(
                f"short name {name!r} cannot be resolved: the policy has no search list and "
                "no alias for it; use a fully-qualified name such as docker.io/library/"
                f"{name}",
                detail={"name": name},
            )
            return ResolutionPlan(name, action, mode, None, (), refusal=refusal)
        if mode == "enforcing" and len(candidates) > 1:
            listed = ", ".join(str(c.repository) for c in candidates)
            refusal = Denied(
                f"short name {name!r} is ambiguous and short_name_mode is enforcing: it "
                f"could be {listed}; pull a fully-qualified name, or ask the operator to "
                f"add an alias to the policy (aliases: {{{name}: {candidates[0].repository}}})",
                detail={"name": name, "candidates": [str(c.repository) for c in candidates]},
            )
            return ResolutionPlan(name, action, mode, None, candidates, refusal=refusal)
        pins_on_success = mode == "permissive"
        return ResolutionPlan(
            name,
            action,
            mode,
            "search",
            candidates,
            # One candidate needs no probe, unless it is about to be pinned: only names
            # that exist are pinned.
            needs_probe=len(candidates) > 1 or pins_on_success,
            pins_on_success=pins_on_success,
        )

    def _write_plan(self, name: str, action: str, mode: ShortNameMode) -> ResolutionPlan:
        if self.push_registry is None:
            refusal = Denied(
                f"short-name {_PLURAL[action]} are refused: no push_registry is configured; "
                f"{action} to a fully-qualified name such as registry.example/team/{name}",
                detail={"name": name},
            )
            return ResolutionPlan(name, action, mode, None, (), refusal=refusal)
        repository = Repository.of(self.push_registry, name)
        # Writes go where the name says: registries.conf locations rewrite pulls only.
        candidate = Candidate(repository, repository)
        return ResolutionPlan(name, action, mode, "push_registry", (candidate,))

    async def resolve(
        self,
        name: str,
        reference: str,
        probe: Probe,
        *,
        record_pin: bool = True,
        creator: Creator | None = None,
    ) -> Resolution:
        """Resolve a short name for a pull of `reference` (tag or digest).

        Raises Denied (enforcing mode, ambiguous), NameUnknown (nothing to search),
        ManifestUnknown (no candidate has it), or whatever the probe raised for the
        first candidate that failed. `record_pin=False` resolves without pinning
        (explain with probing, a principal who may not create pins); `creator` is
        recorded in a pin this call creates.
        """
        plan = await self.plan(name, "pull")
        if plan.refusal is not None:
            raise plan.refusal
        assert plan.reason is not None
        every = tuple(c.repository for c in plan.candidates)
        if not plan.needs_probe:
            only = plan.candidates[0]
            return Resolution(
                name,
                reference,
                only.repository,
                only.location,
                plan.reason,
                plan.mode,
                only.search_position,
                every,
                (),
                plan.reason == "pin",
            )
        tried: list[Repository] = []
        chosen: Candidate | None = None
        for candidate in plan.candidates:
            tried.append(candidate.location)
            try:
                found = await probe(candidate.location, reference)
            except Exception as exc:
                exc.add_note(
                    f"resolving short name {name!r}: {candidate.location} failed, so later "
                    "search registries were not tried"
                )
                raise
            if found:
                chosen = candidate
                break
        if chosen is None:
            raise ManifestUnknown(
                f"{_with_reference(name, reference)} was not found in any search registry "
                f"(tried {', '.join(_with_reference(t, reference) for t in tried)})",
                detail={"name": name, "reference": reference, "tried": [str(t) for t in tried]},
            )
        created = False
        if plan.pins_on_success and record_pin:
            pin, created = await self.pins.setdefault(name, chosen.repository, creator)
            if pin.repository != chosen.repository:
                # Another request pinned the name first: everyone follows the pin.
                repository = pin.repository
                return Resolution(
                    name,
                    reference,
                    repository,
                    self.policy.pull_location(repository),
                    "pin",
                    plan.mode,
                    None,
                    every,
                    tuple(tried),
                    True,
                )
        return Resolution(
            name,
            reference,
            chosen.repository,
            chosen.location,
            "search",
            plan.mode,
            chosen.search_position,
            every,
            tuple(tried),
            plan.pins_on_success and record_pin,
            created,
        )

    async def resolve_write(self, name: str, action: str = "push") -> Resolution:
        """Resolve a short name for a push or delete: the push registry, or Denied."""
        plan = await self.plan(name, action)
        if plan.refusal is not None:
            raise plan.refusal
        only = plan.candidates[0]
        return Resolution(
            name,
            None,
            only.repository,
            only.location,
            "push_registry",
            plan.mode,
            None,
            (only.repository,),
            (),
            False,
        )
