"""The gate under test as a real process: ``python3 -m proxy serve --config gate.yaml``.

Owns one gate's lifecycle for integration and end-to-end tests: writing its
``gate.yaml`` (and a policy file) into its own directory, picking a free loopback port,
starting the subprocess with a clean environment, waiting until ``GET /v2/`` answers,
and stopping it (SIGTERM, or SIGKILL to simulate a crash). Also the standard upstream
table the shared ``gate`` fixture fronts, so ad-hoc gates can reuse it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.processes import LoopbackProcess, log_tail, terminate
from tests.support.registries import free_port
from tests.support.upstreams import TOKEN_USER, TokenUpstream, Upstreams

__all__ = [
    "PRIVATE_PASSWORD_ENV",
    "PRIVATE_REGISTRY",
    "GateFactory",
    "GateProcess",
    "GateStartError",
    "deep_merge",
    "policy_document",
    "standard_upstreams",
]

START_TIMEOUT = 20.0
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The token-auth upstream's name in gate configs, and where its password comes from.
PRIVATE_REGISTRY = "private.example"
PRIVATE_PASSWORD_ENV = "GATE_TEST_PRIVATE_PASSWORD"
# Inherited variables that would change what the gate does (config overrides, proxies).
_SCRUBBED_PREFIXES = ("REGISTRY_GATE_",)
_SCRUBBED = frozenset(
    {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    | {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"}
)


class GateStartError(RuntimeError):
    """The gate exited or did not answer ``/v2/`` in time (the message has its log)."""


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base``: mappings merge recursively, anything else
    (lists included) replaces."""
    result: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def policy_document(
    search: Sequence[str], default: str = "allow", rules: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """The simple policy file the pull-path tests use: a search order, no rules."""
    return {"search": list(search), "default": default, "rules": [dict(r) for r in rules]}


def standard_upstreams(
    upstreams: Upstreams, token_upstream: TokenUpstream | None = None
) -> list[dict[str, Any]]:
    """docker.io -> hub, registry.corp.example -> corp, quay.io -> quay (in that order),
    plus the token upstream as ``private.example`` with its password from the
    environment variable ``PRIVATE_PASSWORD_ENV``."""
    table: list[dict[str, Any]] = [
        {"registry": seeded.stands_in_for, "url": seeded.url}
        for seeded in (upstreams.hub, upstreams.corp, upstreams.quay)
    ]
    if token_upstream is not None:
        table.append(
            {
                "registry": PRIVATE_REGISTRY,
                "url": token_upstream.url,
                "username": TOKEN_USER,
                "password_env": PRIVATE_PASSWORD_ENV,
            }
        )
    return table


class GateProcess(LoopbackProcess):
    """One gate subprocess on ``127.0.0.1:<port>``, configured from a dict.

    ``directory`` holds ``gate.yaml``, ``policy.yaml`` (when ``policy`` is given),
    ``storage/``, ``audit.jsonl`` and ``gate.log`` (stdout and stderr). ``config`` is
    laid over those defaults with ``deep_merge``; ``listen`` is always set here.
    """

    def __init__(
        self,
        directory: Path,
        config: Mapping[str, Any],
        *,
        policy: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "gate",
        launcher: Sequence[str] = (),
        args: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        # More `serve` arguments (e.g. ``--workers 2``).
        self.args = list(args)
        # A command prefix that execs the gate (e.g. ``unshare --mount ... sh -c`` to give
        # it a small private file system); the process id stays the gate's.
        self.launcher = list(launcher)
        self.name = name
        self.config_path = directory / "gate.yaml"
        self.policy_path = directory / "policy.yaml"
        self.log_path = directory / "gate.log"
        defaults: dict[str, Any] = {
            "storage": {"path": str(directory / "storage")},
            "audit": {"path": str(directory / "audit.jsonl")},
        }
        if policy is not None:
            defaults["policy"] = {"files": [str(self.policy_path)]}
        self.config: dict[str, Any] = deep_merge(defaults, config)
        self.policy = dict(policy) if policy is not None else None
        self.env = dict(env or {})
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- addresses are LoopbackProcess's ---------------------------------------------

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    # -- lifecycle -----------------------------------------------------------------

    def start(self, attempts: int = 3) -> GateProcess:
        """Start on a free port (the same port again after a stop)."""
        if self.running:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        keep_port = self._port is not None
        error: GateStartError | None = None
        for _ in range(attempts):
            port = self._port if keep_port and self._port is not None else free_port()
            try:
                self._start_once(port)
                return self
            except GateStartError as exc:
                error = exc
                self._terminate(signal.SIGKILL, 5.0)
                if "address already in use" not in str(exc).lower():
                    break
                time.sleep(0.2)
        assert error is not None
        raise error

    def _environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _SCRUBBED and not k.startswith(_SCRUBBED_PREFIXES)
        }
        # The gate runs from this checkout even when the test runs elsewhere.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        return env

    def write_config(self, port: int) -> None:
        config = {**self.config, "listen": f"127.0.0.1:{port}"}
        # JSON is YAML; the gate reads it with yaml.safe_load.
        self.config_path.write_text(json.dumps(config, indent=1))
        if self.policy is not None:
            self.policy_path.write_text(json.dumps(self.policy, indent=1))

    def _start_once(self, port: int) -> None:
        self.write_config(port)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    *self.launcher,
                    sys.executable,
                    "-m",
                    "proxy",
                    "serve",
                    "--config",
                    str(self.config_path),
                    *self.args,
                ],
                cwd=self.directory,
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: a Ctrl-C reaches pytest, whose teardown stops us.
                start_new_session=True,
            )
        self._port = port
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise GateStartError(
                    f"{self.name} exited with {self._proc.returncode}:\n"
                    + self.log_tail(since=self._log_offset)
                )
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise GateStartError(
                    f"{self.name} did not answer GET {self.url}/v2/ within "
                    f"{START_TIMEOUT:.0f} s:\n" + self.log_tail(since=self._log_offset)
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError as err:
            err.close()
            return err.code == 401  # token auth on: serving, and asking for a login
        except OSError:
            return False

    def _terminate(self, sig: signal.Signals, timeout: float) -> int | None:
        return terminate(self._proc, sig, timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (SIGKILL after ``timeout``); returns the exit status. Idempotent."""
        return self._terminate(signal.SIGTERM, timeout)

    def kill9(self) -> int | None:
        """SIGKILL: a crash, no shutdown handlers run."""
        return self._terminate(signal.SIGKILL, 10.0)

    def restart(self) -> GateProcess:
        """Stop, then start again with the same configuration on the same port."""
        self.stop()
        return self.start()

    # -- what tests read -------------------------------------------------------------

    def log_text(self) -> str:
        """Everything the gate wrote to stdout/stderr, over all its starts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40, since: int = 0) -> str:
        return log_tail(self.log_path, lines, since)

    def __enter__(self) -> GateProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.host if self.running else "stopped"
        return f"GateProcess({self.name!r}, {where})"


# What the ``gate_factory`` fixture yields:
# ``make(config, *, policy=None, env=None, name="gate") -> GateProcess`` (started).
GateFactory = Callable[..., GateProcess]


@contextlib.contextmanager
def all_running(gates: Sequence[GateProcess]) -> Iterator[list[GateProcess]]:
    """Start every gate (in order), yield them, stop every one of them after."""
    try:
        for gate in gates:
            gate.start()
        yield list(gates)
    finally:
        for gate in gates:
            gate.stop()
