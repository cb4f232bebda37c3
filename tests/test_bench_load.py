"""Smoke run of bench/load.py (not a benchmark: tiny, so the script cannot rot unnoticed).

It runs both scenarios for a second each against real Distribution and gate processes
and must print its table and its verdict line; no figure is asserted.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import require_tools
from tests.support.gate import PROJECT_ROOT


@pytest.mark.slow
def test_load_bench_runs_and_prints_its_table() -> None:
    require_tools()
    command = [sys.executable, "bench/load.py", "--seconds", "1", "--connections", "4"]
    command += ["--big-mib", "1", "--tag-ttl", "0.5", "--delay", "0.1", "--idle", "0.5"]
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "upstream HEADs per tag expiry" in result.stdout
    assert "targets (issue 11):" in result.stdout
