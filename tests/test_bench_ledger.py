"""Smoke run of bench/ledger.py (not a benchmark: tiny, so the script cannot rot unnoticed)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import require_engine
from tests.support.gate import PROJECT_ROOT


def test_ledger_bench_runs_and_prints_its_table() -> None:
    require_engine("redis-server", "apt install redis-server")
    command = [sys.executable, "bench/ledger.py", "--seconds", "0.2", "--blobs", "50"]
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("memory", "redis, 1 replica(s)", "redis, 3 replica(s)"):
        assert row in result.stdout
