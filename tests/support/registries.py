"""Real CNCF Distribution registries (Debian's ``docker-registry`` 2.8) for tests.

Owns the lifecycle of one upstream registry process: writing its config, picking a free
loopback port, starting ``docker-registry serve``, waiting until ``/v2/`` answers, and
stopping it. Optionally the registry demands Bearer tokens from a ``TokenIssuer``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.processes import LoopbackProcess, log_tail, terminate
from tests.support.token_issuer import TokenIssuer

__all__ = [
    "REGISTRY_BINARY",
    "DistributionRegistry",
    "RegistryFactory",
    "RegistryStartError",
    "free_port",
]

# Debian's package path; override to use an upstream `registry` release binary.
REGISTRY_BINARY = os.environ.get("GATE_TEST_REGISTRY_BINARY", "/usr/bin/docker-registry")
START_TIMEOUT = 10.0


class RegistryStartError(RuntimeError):
    """The registry process exited or did not answer ``/v2/`` in time."""


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DistributionRegistry(LoopbackProcess):
    """One ``docker-registry serve`` process on ``127.0.0.1:<free port>``, plain HTTP.

    ``directory`` holds ``config.yml``, ``data/`` (the storage root) and ``registry.log``.
    The registry keeps its storage across ``stop()``/``start()``, on a new port.
    """

    def __init__(
        self,
        directory: Path,
        *,
        name: str = "registry",
        token_auth: TokenIssuer | None = None,
        log_level: str = "info",
        binary: str = REGISTRY_BINARY,
    ) -> None:
        self.directory = directory
        self.name = name
        self.token_auth = token_auth
        self.log_level = log_level
        self.binary = binary
        self.config_path = directory / "config.yml"
        self.storage = directory / "data"
        self.log_path = directory / "registry.log"
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- config --------------------------------------------------------------------

    def config(self, port: int) -> dict[str, Any]:
        """The Distribution 2.8 configuration (docs/configuration.md) for ``port``."""
        cfg: dict[str, Any] = {
            "version": "0.1",
            "log": {
                "level": self.log_level,
                "formatter": "text",
                # Access lines duplicate what tests see anyway and slow busy benchmarks.
                "accesslog": {"disabled": True},
                "fields": {"service": self.name},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                # Tests delete manifests/blobs to reset state and to test 404 paths.
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
                # The upload purger only adds background disk scans to short test runs.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{port}",
                # Fixed, so upload state survives a restart and no warning is logged.
                "secret": f"gate-test-secret-{self.name}",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.token_auth is not None:
            cfg["auth"] = self.token_auth.distribution_auth_config()
        return cfg

    # -- lifecycle -----------------------------------------------------------------

    def start(self, attempts: int = 3) -> DistributionRegistry:
        """Start on a fresh free port; retries when another process grabbed the port."""
        if self.running:
            return self
        if not os.access(self.binary, os.X_OK):
            raise RegistryStartError(f"{self.binary} not found or not executable")
        self.storage.mkdir(parents=True, exist_ok=True)
        error: RegistryStartError | None = None
        for _ in range(attempts):
            try:
                self._start_once(free_port())
                return self
            except RegistryStartError as exc:
                error = exc
                self.stop()
                # Only a lost port race is worth another try; a bad config is not.
                if "address already in use" not in str(exc):
                    break
        assert error is not None
        raise error

    def _start_once(self, port: int) -> None:
        # JSON is valid YAML, and needs no YAML library.
        self.config_path.write_text(json.dumps(self.config(port), indent=1))
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: a Ctrl-C in the terminal reaches pytest only, and
                # pytest's teardown then stops the registry in order.
                start_new_session=True,
            )
        self._port = port
        self._wait_ready(log_offset)

    def _wait_ready(self, log_offset: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RegistryStartError(
                    f"{self.name} exited with {self._proc.returncode}:\n"
                    + self.log_tail(since=log_offset)
                )
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise RegistryStartError(
                    f"{self.name} did not answer GET {self.url}/v2/ within "
                    f"{START_TIMEOUT:.0f} s:\n" + self.log_tail(since=log_offset)
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # 401 from a token-auth registry still means it is serving
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; idempotent."""
        proc, self._proc = self._proc, None
        self._port = None
        terminate(proc, signal.SIGTERM, timeout)

    def wipe(self) -> None:
        """Stop and delete all stored content (the next ``start()`` is empty)."""
        self.stop()
        shutil.rmtree(self.storage, ignore_errors=True)

    def log_tail(self, lines: int = 30, since: int = 0) -> str:
        return log_tail(self.log_path, lines, since)

    def __enter__(self) -> DistributionRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.host if self.running else "stopped"
        return f"DistributionRegistry({self.name!r}, {where})"


# What the ``registry_factory`` fixture yields: ``make(name=..., **DistributionRegistry kwargs)``.
RegistryFactory = Callable[..., DistributionRegistry]
