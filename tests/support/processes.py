"""Helpers shared by the test support that runs real processes (registries, the gate)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path


class LoopbackProcess:
    """Addresses of a process serving HTTP on ``127.0.0.1:<port>`` (gate, registry)."""

    name: str
    _port: int | None
    _proc: subprocess.Popen[bytes] | None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} has no port: it is not started")
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the process as a registry name in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


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
