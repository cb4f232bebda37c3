"""The policy in force: loading it, swapping it atomically on reload, watching its files.

Owns the current `PolicySnapshot` (a validated `Policy` and the `ShortNameResolver` built
on it). A request takes `holder.current` once at its start and uses that snapshot to the
end, so it never sees a mix of two policies; `reload()` builds a complete new snapshot
and replaces the reference in one assignment. A policy that does not validate is refused
with one error log line, the previous snapshot stays in force, and the `on_reload`
callback hears `failure` (the metrics module counts
`registry_gate_policy_reloads_total{outcome}`); a good one reports `success`.

`reload()` is synchronous (the files are small) so a SIGHUP handler can call it directly;
`watch()` is a coroutine the application runs as a task: it polls the files' inode,
mtime and size every few seconds (no extra dependency) and reloads when they change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from proxy.names.registries_conf import drop_in_dir, registries_conf_files
from proxy.names.resolver import ShortNameResolver
from proxy.policy.rules import Policy, PolicyError, load_policy
from proxy.settings import Settings
from proxy.storage.pins import PinStore

ReloadCallback = Callable[[str], None]
_Signature = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True, slots=True)
class PolicySources:
    """Where the policy comes from, and what it is checked against."""

    files: tuple[Path, ...] = ()
    registries_conf: Path | None = None
    known_registries: frozenset[str] | None = None
    push_registry: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> PolicySources:
        """The sources gate.yaml names (paths already resolved against its folder)."""
        return cls(
            files=tuple(settings.policy.files),
            registries_conf=settings.policy.registries_conf,
            known_registries=frozenset(u.registry for u in settings.upstreams),
            push_registry=settings.push_registry,
        )

    def load(self) -> Policy:
        """Load and validate; raises PolicyError."""
        return load_policy(self.files, self.registries_conf, known_registries=self.known_registries)

    def watched_paths(self) -> list[Path]:
        """Every file (and drop-in directory) whose change should trigger a reload."""
        paths = list(self.files)
        if self.registries_conf is not None:
            paths.extend(registries_conf_files(self.registries_conf))
            paths.append(drop_in_dir(self.registries_conf))
        return paths


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """One consistent policy generation: take it once per request."""

    policy: Policy
    resolver: ShortNameResolver
    generation: int

    @property
    def fingerprint(self) -> str:
        """The policy version recorded in audit lines."""
        return self.policy.fingerprint


def _signature(paths: Collection[Path]) -> _Signature:
    entries = []
    for path in paths:
        try:
            st = path.stat()
            entries.append((str(path), st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            entries.append((str(path), 0, 0, -1))
    return tuple(entries)


class PolicyHolder:
    """Holds the current policy snapshot; reloads and watches its sources."""

    def __init__(
        self,
        sources: PolicySources,
        pins: PinStore,
        *,
        on_reload: ReloadCallback | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        """Load the policy; raises PolicyError (startup fails, exit status 2)."""
        self.sources = sources
        self.pins = pins
        self._on_reload = on_reload
        self._log = logger or logging.getLogger(__name__)
        # Taken before reading, so an edit racing the load is seen by the next poll.
        self._seen = _signature(sources.watched_paths())
        self._current = self._snapshot(sources.load(), generation=1)
        self._log_warnings(self._current.policy)

    @property
    def current(self) -> PolicySnapshot:
        """The snapshot in force (grab it once per request)."""
        return self._current

    def _snapshot(self, policy: Policy, generation: int) -> PolicySnapshot:
        resolver = ShortNameResolver(policy, self.pins, self.sources.push_registry)
        return PolicySnapshot(policy, resolver, generation)

    def _log_warnings(self, policy: Policy) -> None:
        for warning in policy.warnings:
            self._log.warning("policy: %s", warning)

    def _report(self, outcome: str) -> None:
        if self._on_reload is None:
            return
        try:
            self._on_reload(outcome)
        except Exception:
            # A metrics hook must never turn a reload into a crash.
            self._log.exception("policy reload callback failed")

    def reload(self) -> bool:
        """Load the sources again and swap the snapshot; False (old one kept) if invalid."""
        self._seen = _signature(self.sources.watched_paths())
        old = self._current
        try:
            policy = self.sources.load()
        except PolicyError as exc:
            self._log.error("policy reload refused, keeping policy %s: %s", old.fingerprint, exc)
            self._report("failure")
            return False
        except Exception:
            # A loader bug must not kill the watcher or the SIGHUP handler either.
            self._log.exception("policy reload failed, keeping policy %s", old.fingerprint)
            self._report("failure")
            return False
        self._current = self._snapshot(policy, old.generation + 1)
        self._log_warnings(policy)
        self._log.info(
            "policy reloaded: %s -> %s (%d rules, search %s, short_name_mode %s)",
            old.fingerprint,
            policy.fingerprint,
            len(policy.rules),
            list(policy.search),
            policy.short_name_mode,
        )
        self._report("success")
        return True

    def changed(self) -> bool:
        """Whether any watched file changed since the last load attempt."""
        return _signature(self.sources.watched_paths()) != self._seen

    async def watch(self, interval: float = 2.0) -> None:
        """Poll the sources every `interval` seconds and reload on change; cancel to stop."""
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                self.reload()
