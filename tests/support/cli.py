"""Running the ``registry-gate`` command line (``python3 -m proxy``) from tests.

Owns the environment the commands see (this checkout on ``PYTHONPATH``, no inherited
``REGISTRY_GATE_*`` overrides) and running several at once: each command is mostly
interpreter start-up and imports, so a batch costs about as much as one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from tests.support.gate import PROJECT_ROOT

__all__ = ["cli_env", "run_cli"]


def cli_env() -> dict[str, str]:
    """The inherited environment without config overrides, with this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_GATE_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def run_cli(
    *commands: Sequence[str], timeout: float = 120.0
) -> list[subprocess.CompletedProcess[str]]:
    """Run ``registry-gate ARGS...`` for each of ``commands`` concurrently; results in order."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "proxy", *command],
            cwd=PROJECT_ROOT,
            env=cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    results = []
    try:
        for command, proc in zip(commands, procs, strict=True):
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(list(command), proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results
