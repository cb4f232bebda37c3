"""Audit chains of several replicas: lines naming the replica, one writer per chain, and
sorting a folder of files (rotated ones included) into chains verified one by one."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.observability.audit import AuditLog, AuditLogError, AuditRecord, Event, StreamSink
from proxy.observability.audit_chains import chains_in, format_chains_result, verify_chains
from proxy.settings import AuditSettings, ConfigError, Settings, load_settings

UPSTREAMS = [{"registry": "docker.io", "url": "https://registry-1.docker.io"}]


def record(number: int) -> AuditRecord:
    return AuditRecord(event=Event.MANIFEST_PULL, action="pull", name=f"app/{number}")


async def write(log: AuditLog, count: int) -> None:
    for number in range(count):
        await log.write(record(number))
    await log.flush()


def documents(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line]


async def test_lines_name_the_replica_in_the_file_and_on_stdout(tmp_path: Path) -> None:
    stdout = io.BytesIO()
    path = tmp_path / "r1.jsonl"
    async with AuditLog(path=path, sinks=[StreamSink(stdout)], replica="r1") as log:
        await write(log, 3)
    on_file, on_stdout = documents(path.read_bytes()), documents(stdout.getvalue())
    assert on_file == on_stdout and len(on_file) == 3
    assert {d["replica"] for d in on_file} == {"r1"}
    # Without a replica (one gate), lines are as they always were.
    single = tmp_path / "audit.jsonl"
    async with AuditLog(path=single) as log:
        await write(log, 1)
    assert "replica" not in documents(single.read_bytes())[0]


async def test_a_second_writer_of_a_replica_chain_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r1.jsonl"
    first = AuditLog(path=path, replica="r1")
    await first.start()
    second = AuditLog(path=path, replica="r1")
    with pytest.raises(AuditLogError, match="another process writes this audit log"):
        await second.start()
    await write(first, 2)
    await first.close()
    async with AuditLog(path=path, replica="r1") as third:
        await write(third, 2)
    result = verify_chains([tmp_path])
    assert result.ok, format_chains_result(result, [tmp_path])
    assert result.chains[0][1].records == 4


def renumber_like_logrotate(folder: Path, name: str) -> None:
    """Rotated files renamed `.1` (newest), `.2`, ...: their names sort newest first."""
    rotated = sorted(folder.glob(f"{name}.*"))
    assert len(rotated) >= 2
    for number, path in enumerate(reversed(rotated), start=1):
        path.rename(folder / f"{name}.{number}")


async def test_a_folder_sorts_into_chains_oldest_file_first_whatever_the_names(
    tmp_path: Path,
) -> None:
    for replica in ("a", "b"):
        async with AuditLog(
            path=tmp_path / f"{replica}.jsonl", replica=replica, rotate_bytes=600, batch_size=1
        ) as log:
            await write(log, 12)
    renumber_like_logrotate(tmp_path, "a.jsonl")
    # A single gate's file in the same folder is a chain of its own.
    async with AuditLog(path=tmp_path / "audit.jsonl") as log:
        await write(log, 2)

    chains, notes = chains_in([tmp_path])
    assert [chain.name for chain in chains] == ["a", "audit", "b"]
    assert chains[0].files[-1] == tmp_path / "a.jsonl"
    assert not notes
    result = verify_chains([tmp_path])
    report = format_chains_result(result, [tmp_path])
    assert result.ok, report
    assert [r.records for _, r in result.chains] == [12, 2, 12]
    assert report.endswith("OK: 3 chains verify")

    # A rotated file lost from the middle of a's chain: a fails, b does not.
    chains[0].files[1].unlink()
    result = verify_chains([tmp_path])
    report = format_chains_result(result, [tmp_path])
    assert not result.ok
    assert "deleted" in report and "FAILED: 1 of 3 chains: a" in report, report


def test_an_empty_folder_does_not_verify(tmp_path: Path) -> None:
    result = verify_chains([tmp_path])
    assert not result.ok
    assert "no audit files" in format_chains_result(result, [tmp_path])


def test_a_replica_that_wrote_nothing_yet_is_named_after_its_file(tmp_path: Path) -> None:
    (tmp_path / "gate-c.jsonl").touch()
    (tmp_path / ".gate-c.jsonl.lock").write_text("pid 1")
    result = verify_chains([tmp_path])
    report = format_chains_result(result, [tmp_path])
    assert result.ok and [chain.name for chain, _ in result.chains] == ["gate-c"], report
    assert "replica gate-c:\n  note: " in report and "empty" in report


def test_replica_in_the_audit_path_is_replaced_by_the_replica_id(tmp_path: Path) -> None:
    config = tmp_path / "gate.yaml"
    config.write_text(
        json.dumps(
            {
                "upstreams": UPSTREAMS,
                "replica": {"id": "gate-0"},
                "audit": {"path": "{replica}.jsonl"},
            }
        )
    )
    settings = load_settings(config, {})
    assert settings.audit.per_replica
    assert settings.audit_file == tmp_path / "gate-0.jsonl"
    overridden = load_settings(config, {"REGISTRY_GATE_REPLICA__ID": "gate-1"})
    assert overridden.audit_file == tmp_path / "gate-1.jsonl"
    config.write_text(json.dumps({"upstreams": UPSTREAMS, "audit": {"path": "{pod}.jsonl"}}))
    with pytest.raises(ConfigError, match=r"audit\.path: only \{replica\}"):
        load_settings(config, {})


def test_the_gate_names_its_replica_only_when_it_runs_as_several(tmp_path: Path) -> None:
    base: dict[str, Any] = {"upstreams": UPSTREAMS, "replica": {"id": "r"}}
    single = Settings.model_validate({**base, "audit": {"path": str(tmp_path / "a.jsonl")}})
    assert AuditLog.for_gate(single)._replica is None
    shared = Settings.model_validate(
        {
            **base,
            "audit": {"stdout": True},
            "redis": {"url": "redis://127.0.0.1:6379/0"},
            "upload_secret": "s" * 32,
        }
    )
    assert AuditLog.for_gate(shared)._replica == "r"
    with pytest.raises(ValueError, match="replica"):
        AuditLog.from_settings(AuditSettings(path=tmp_path / "{replica}.jsonl"))
