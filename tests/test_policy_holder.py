"""Holding, reloading and watching the policy (proxy/policy/holder.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.names.references import Repository
from proxy.policy.holder import PolicyHolder, PolicySources
from proxy.policy.principal import ANONYMOUS
from proxy.policy.rules import PolicyError
from proxy.settings import Settings
from proxy.storage.pins import MemoryPinStore

UBUNTU = Repository.of("docker.io", "ubuntu")
ALLOW = "search: [docker.io]\nrules:\n  - {name: hub, match: docker.io, allow: true}\n"
DENY = "search: [docker.io]\nrules:\n  - {name: hub, match: docker.io, allow: false}\n"


def write(path: Path, text: str) -> None:
    """Write and move the mtime forward, so coarse timestamps still show a change."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    write(path, ALLOW)
    return path


def holder_for(path: Path, outcomes: list[str] | None = None, **kwargs: object) -> PolicyHolder:
    sources = PolicySources(files=(path,), **kwargs)  # type: ignore[arg-type]
    callback = outcomes.append if outcomes is not None else None
    return PolicyHolder(sources, MemoryPinStore(), on_reload=callback)


def allowed(holder: PolicyHolder) -> bool:
    return holder.current.policy.decide(ANONYMOUS, "pull", UBUNTU, "1").allowed


def test_initial_load(policy_file: Path) -> None:
    holder = holder_for(policy_file)
    snapshot = holder.current
    assert snapshot.generation == 1
    assert snapshot.resolver.policy is snapshot.policy
    assert allowed(holder)


def test_invalid_policy_at_start_is_an_error(policy_file: Path) -> None:
    write(policy_file, "rules:\n  - {name: x, match: 'a b', allow: true}\n")
    with pytest.raises(PolicyError, match=r"policy.yaml: rules\[0\].match: whitespace"):
        holder_for(policy_file)


def test_reload_swaps_the_snapshot(policy_file: Path) -> None:
    outcomes: list[str] = []
    holder = holder_for(policy_file, outcomes)
    in_flight = holder.current
    write(policy_file, DENY)
    assert holder.reload()
    assert outcomes == ["success"]
    assert holder.current.generation == 2
    assert holder.current.fingerprint != in_flight.fingerprint
    assert not allowed(holder)
    # A request that took its snapshot before the reload finishes on the old policy.
    assert in_flight.policy.decide(ANONYMOUS, "pull", UBUNTU, "1").allowed
    assert in_flight.resolver.policy is in_flight.policy


def test_invalid_reload_is_refused_and_the_old_policy_stays(
    policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes: list[str] = []
    holder = holder_for(policy_file, outcomes)
    before = holder.current
    write(policy_file, "rules:\n  - {name: x, match: '**', allow: true, actons: [pull]}\n")
    with caplog.at_level(logging.ERROR, logger="proxy.policy.holder"):
        assert not holder.reload()
    assert outcomes == ["failure"]
    assert holder.current is before
    assert allowed(holder)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    line = record.getMessage()
    assert f"keeping policy {before.fingerprint}" in line
    assert "policy.yaml: rules[0].actons: unknown key" in line
    assert "\n" not in line


def test_deleted_file_is_refused(policy_file: Path) -> None:
    outcomes: list[str] = []
    holder = holder_for(policy_file, outcomes)
    policy_file.unlink()
    assert not holder.reload()
    assert outcomes == ["failure"] and allowed(holder)


def test_a_failing_callback_does_not_break_reload(policy_file: Path) -> None:
    def explode(outcome: str) -> None:
        raise RuntimeError("metrics broke")

    holder = PolicyHolder(PolicySources(files=(policy_file,)), MemoryPinStore(), on_reload=explode)
    write(policy_file, DENY)
    assert holder.reload()
    assert not allowed(holder)


async def test_watch_reloads_on_change(policy_file: Path) -> None:
    outcomes: list[str] = []
    holder = holder_for(policy_file, outcomes)
    assert not holder.changed()
    task = asyncio.create_task(holder.watch(interval=0.01))
    try:
        await asyncio.sleep(0.05)
        assert outcomes == []  # nothing changed, nothing reloaded
        write(policy_file, DENY)
        await _until(lambda: holder.current.generation == 2)
        assert not allowed(holder)
        write(policy_file, "rules: [")
        await _until(lambda: outcomes == ["success", "failure"])
        assert holder.current.generation == 2
        await asyncio.sleep(0.05)
        assert outcomes == ["success", "failure"]  # a refused file is not retried in a loop
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_watch_sees_registries_conf_drop_ins(tmp_path: Path, policy_file: Path) -> None:
    conf = tmp_path / "registries.conf"
    write(conf, "")
    holder = holder_for(policy_file, registries_conf=conf)
    assert allowed(holder)
    drop_ins = tmp_path / "registries.conf.d"
    drop_ins.mkdir()
    write(drop_ins / "50-block.conf", '[[registry]]\nlocation = "docker.io"\nblocked = true\n')
    assert holder.changed()
    assert holder.reload()
    decision = holder.current.policy.decide(ANONYMOUS, "pull", UBUNTU, "1")
    assert not decision.allowed and decision.rule_name == "blocked docker.io"


def test_sources_from_settings(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "upstreams": [
                {"registry": "docker.io", "url": "https://registry-1.docker.io"},
                {"registry": "registry.corp.example", "url": "http://127.0.0.1:5003"},
            ],
            "push_registry": "registry.corp.example",
            "policy": {"files": [str(tmp_path / "a.yaml")]},
        }
    )
    sources = PolicySources.from_settings(settings)
    assert sources.files == (tmp_path / "a.yaml",)
    assert sources.known_registries == frozenset({"docker.io", "registry.corp.example"})
    assert sources.push_registry == "registry.corp.example"
    write(tmp_path / "a.yaml", "search: [quay.io]\n")
    with pytest.raises(PolicyError, match=r"quay\.io is not an upstream"):
        sources.load()


async def _until(condition: Callable[[], bool]) -> None:
    """Poll (the watcher offers no event to wait on) for up to five seconds."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 5 s")
