"""Helpers shared by the test support that runs real processes (registries, the gate)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path


def terminate(
    proc: subprocess.Popen[bytes] | None, sig: signal.Signals, timeout: float
) -> int | None:
    """Send `sig` (then SIGKILL after `timeout`) unless it already exited; its status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


def log_tail(path: Path, lines: int, since: int = 0) -> str:
    """The last `lines` lines a process logged to `path` after byte offset `since`."""
    try:
        with path.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
