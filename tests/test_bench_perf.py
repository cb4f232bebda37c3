"""Smoke run of bench/perf.py (not a benchmark: tiny, so the script cannot rot unnoticed).

Plain Distribution, its pull-through cache and the gate, one second per load run, a
1 MiB big blob and an 8 MiB cold blob; the table must be printed with every subject
measured. No figure is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import require_tools
from tests.support.gate import PROJECT_ROOT


@pytest.mark.slow
def test_perf_bench_runs_and_prints_its_table() -> None:
    require_tools()
    command = [sys.executable, "bench/perf.py", "--quick", "--seconds", "1"]
    command += ["--big-mib", "1", "--cold-mib", "8", "--no-uvloop"]
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warm manifest by tag GET, req/s" in result.stdout
    assert "ceilings, same run" in result.stdout
    figures = json.loads(result.stdout.split("figures: ", 1)[1])
    assert set(figures) == {"plain", "cache", "gate"}
    # Every subject answered its manifest requests, and the cold pull got every byte.
    assert all(f["manifest_rps"] > 0 and f["manifest_errors"] == 0 for f in figures.values())
    assert figures["gate"]["cold_mb_s"] > 0 and figures["plain"]["cold_mb_s"] > 0
