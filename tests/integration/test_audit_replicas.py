"""Several real gate processes auditing into one shared folder, verified as an auditor would.

Two gates (replicas ``gate-a`` and ``gate-b``) front the seeded upstreams with
``audit.path: <shared>/{replica}.jsonl``; each writes its own hash chain, every line
naming its replica. ``registry-gate audit verify <shared>`` verifies both chains and
reports per replica; damage to one chain (an edited record, a torn last line) is
reported for that replica only. A third gate given an id already in use is refused at
start: two writers would fork one chain.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import run_cli
from tests.support.gate import GateProcess, GateStartError, all_running, standard_upstreams
from tests.support.registry_client import MANIFEST_ACCEPT
from tests.support.upstreams import Upstreams
from tests.support.wire import request

ACCEPT_LINES: list[tuple[str, str]] = [("Accept", mt) for mt in MANIFEST_ACCEPT]
REPLICAS = ("gate-a", "gate-b")


def replica_config(upstreams: Upstreams, shared: Path, replica: str) -> dict[str, Any]:
    return {
        "upstreams": standard_upstreams(upstreams),
        "replica": {"id": replica},
        "audit": {"path": str(shared / "{replica}.jsonl")},
    }


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    folder = tmp_path / "audit"
    folder.mkdir()
    return folder


@pytest.fixture
def replicas(upstreams: Upstreams, shared: Path, tmp_path: Path) -> Iterator[list[GateProcess]]:
    gates = [
        GateProcess(tmp_path / name, replica_config(upstreams, shared, name), name=name)
        for name in REPLICAS
    ]
    with all_running(gates) as running:
        yield running


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def audited_pulls(gates: list[GateProcess], shared: Path, count: int) -> None:
    """`count` manifest pulls through each gate, waited for in its audit file."""
    for gate in gates:
        for _ in range(count):
            reply = request(
                gate.url, "GET", "/v2/docker.io/library/alpine/manifests/latest", ACCEPT_LINES
            )
            assert reply.status == 200, reply
    deadline = time.monotonic() + 10
    for gate in gates:
        path = shared / f"{gate.name}.jsonl"
        while not (path.exists() and len(lines_of(path)) >= count):
            assert time.monotonic() < deadline, f"{path}: fewer than {count} records"
            time.sleep(0.05)


def test_each_replica_writes_its_own_chain_and_verify_checks_every_one(
    replicas: list[GateProcess], shared: Path
) -> None:
    audited_pulls(replicas, shared, 3)
    for gate in replicas:
        records = lines_of(shared / f"{gate.name}.jsonl")
        # One chain per replica: it starts at 1 and every line names its replica.
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
        assert records[0]["prev"] is None
        assert {r["replica"] for r in records} == {gate.name}
    (result,) = run_cli(["audit", "verify", str(shared)])
    assert result.returncode == 0, result.stdout + result.stderr
    for name in REPLICAS:
        assert f"replica {name}:\n  OK: " in result.stdout, result.stdout
    assert result.stdout.rstrip().endswith("OK: 2 chains verify"), result.stdout


def test_damage_is_reported_for_the_damaged_replica_only(
    replicas: list[GateProcess], shared: Path, tmp_path: Path
) -> None:
    audited_pulls(replicas, shared, 3)
    for gate in replicas:
        gate.stop()  # an auditor's copy of finished files
    edited, torn = tmp_path / "edited", tmp_path / "torn"
    shutil.copytree(shared, edited)
    shutil.copytree(shared, torn)
    # gate-a: a record's client changed; gate-b: the last line cut in the middle.
    path = edited / "gate-a.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"client":"127.0.0.1"', b'"client":"10.9.9.9"')
    path.write_bytes(b"".join(lines))
    path = torn / "gate-b.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])

    edited_result, torn_result = run_cli(
        ["audit", "verify", str(edited)], ["audit", "verify", str(torn)]
    )
    assert edited_result.returncode != 0, edited_result.stdout
    assert f"replica gate-a:\n  FAILED: {edited}/gate-a.jsonl:2: edited" in edited_result.stdout
    assert "replica gate-b:\n  OK: " in edited_result.stdout, edited_result.stdout
    assert "FAILED: 1 of 2 chains: gate-a" in edited_result.stdout

    assert torn_result.returncode != 0, torn_result.stdout
    assert f"replica gate-b:\n  FAILED: {torn}/gate-b.jsonl:" in torn_result.stdout
    assert ": truncated: " in torn_result.stdout, torn_result.stdout
    assert "replica gate-a:\n  OK: " in torn_result.stdout, torn_result.stdout
    assert "FAILED: 1 of 2 chains: gate-b" in torn_result.stdout


def test_a_second_writer_of_one_chain_is_refused_at_start(
    replicas: list[GateProcess], upstreams: Upstreams, shared: Path, tmp_path: Path
) -> None:
    # Two replicas configured with one id (e.g. both defaulting to one host name).
    twin = GateProcess(tmp_path / "twin", replica_config(upstreams, shared, "gate-a"), name="twin")
    try:
        with pytest.raises(GateStartError) as refused:
            twin.start(attempts=1)
    finally:
        twin.stop()
    assert twin.returncode == 2, twin.log_tail()
    assert "audit.path" in str(refused.value) and "another process writes" in str(refused.value)
    # The running replica's chain is untouched and still verifies after more traffic.
    audited_pulls(replicas, shared, 1)
    (result,) = run_cli(["audit", "verify", str(shared)])
    assert result.returncode == 0, result.stdout + result.stderr
