"""A real Docker daemon (Debian ``docker.io`` 20.10) as a client of the gate.

Owns one private ``dockerd``'s lifecycle for end-to-end tests and the rules that keep it
harmless on a shared machine:

- it starts only inside a loopback-only network namespace (``tests/run``): a daemon
  falls back to ``https://registry-1.docker.io`` whenever its mirror fails, and there
  that fallback must fail ("network is unreachable") instead of leaving the machine;
- its ``daemon.json`` starts from what ``registry-gate client-config docker --url URL``
  prints (the JSON part), so a passing test proves the generated configuration works;
  only paths and the private trust-key location are added;
- it runs in its own mount namespace (``unshare --mount``) with a tmpfs on ``/run``, so
  the host's ``/run/docker`` and ``/run/containerd`` (and any system containerd, which
  dockerd would otherwise adopt) stay out of reach, and it starts its own containerd;
- all state is under one directory: ``--data-root``, ``--exec-root``, ``--pidfile``,
  the API socket, the trust key, the CLI's ``DOCKER_CONFIG``; vfs storage, no bridge,
  no iptables, no IP forwarding or masquerading: nothing on the host network changes.

The ``docker`` CLI (``/usr/bin/docker``, the matching 20.10 client) talks to it with
``DOCKER_HOST=unix://...`` and a private ``DOCKER_CONFIG``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.netns import in_private_netns

__all__ = [
    "DOCKERD",
    "DOCKER_CLI",
    "DockerDaemon",
    "DockerError",
    "DockerdStartError",
    "client_config_docker",
    "docker_missing",
    "loopback_only_netns",
    "short_state_dir",
]

DOCKERD = "/usr/sbin/dockerd"
# The 20.10 CLI of the docker.io package, by path: another `docker` may come first on PATH.
DOCKER_CLI = "/usr/bin/docker"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 120.0
# unix socket paths are limited to 108 bytes; containerd's live under the exec root.
MAX_STATE_PATH = 64
# A mirror must be a loopback URL: a name resolved by DNS could leave the machine.
_LOOPBACK_URL = re.compile(r"https?://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?/?")
_PROXY_VARIABLES = frozenset(
    {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    | {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"}
)
# `exec "$0" "$@"` replaces sh with dockerd: the Popen pid is dockerd's pid.
_MOUNT_NS_PREFIX = (
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "--",
    "sh",
    "-c",
    'mount -t tmpfs -o mode=755,size=16m dockerd-run /run && exec "$0" "$@"',
)


class DockerdStartError(RuntimeError):
    """dockerd refused to start, exited, or its API did not answer in time."""


class DockerError(AssertionError):
    """A ``docker`` CLI command failed (the message has its output)."""

    def __init__(self, argv: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        super().__init__(
            f"docker {' '.join(argv)} failed ({proc.returncode}):\n"
            f"{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}"
        )


def docker_missing() -> str | None:
    """Why a Docker daemon cannot run here (None: it can)."""
    missing = [p for p in (DOCKERD, DOCKER_CLI) if not os.access(p, os.X_OK)]
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if missing:
        return (
            f"missing {', '.join(missing)} "
            "(apt-get install --no-install-recommends docker.io util-linux)"
        )
    return None


def loopback_only_netns() -> bool:
    """Only ``lo``, up, and no route in the main table: no address off this machine is
    reachable, so the daemon's fallback to Docker Hub cannot leave it."""
    if not in_private_netns():
        return False
    try:
        with open("/proc/self/net/route") as f:
            routes = f.read().splitlines()[1:]
    except OSError:
        return False
    return not [line for line in routes if line.strip()]


def _clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without proxies (dockerd honours them) and without any
    ``DOCKER_*`` variable that would point the CLI somewhere else."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _PROXY_VARIABLES and not k.startswith(("DOCKER_", "REGISTRY_GATE_"))
    }
    env.update(extra or {})
    return env


def client_config_docker(gate_url: str) -> tuple[dict[str, Any], str]:
    """Run ``registry-gate client-config docker --url gate_url`` (this checkout) as an
    operator installs it, ``> daemon.json``, and return that document and the warning
    printed on stderr."""
    env = _clean_environment(
        {
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
            )
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "client-config", "docker", "--url", gate_url],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"client-config docker failed ({proc.returncode}):\n{proc.stderr}")
    try:
        document = json.loads(proc.stdout)
    except ValueError as exc:
        raise RuntimeError(f"client-config docker printed no JSON:\n{proc.stdout}") from exc
    if not isinstance(document, dict):
        raise RuntimeError(f"daemon.json is not an object: {document!r}")
    return document, proc.stderr


def _ping(sock: Path, timeout: float = 1.0) -> bool:
    """``GET /_ping`` on the daemon's unix socket answers 200."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return False
    return data.startswith(b"HTTP/1.1 200")


class DockerDaemon:
    """A private ``dockerd`` whose only registry mirror is ``mirror_url`` (the gate).

    ``directory`` holds everything: ``daemon.json``, ``data/``, ``exec/``, ``docker.sock``,
    ``dockerd.pid``, ``key.json``, ``cli/`` (``DOCKER_CONFIG``) and ``dockerd.log``.
    ``daemon_json`` is laid over the generated document (tests of the generator leave
    it empty).
    """

    def __init__(
        self,
        directory: Path,
        mirror_url: str,
        *,
        max_download_attempts: int = 5,
        daemon_json: Mapping[str, Any] | None = None,
        name: str = "dockerd",
    ) -> None:
        if len(str(directory)) > MAX_STATE_PATH:
            raise ValueError(f"{directory}: longer than {MAX_STATE_PATH} characters")
        if not _LOOPBACK_URL.fullmatch(mirror_url):
            raise ValueError(f"refusing mirror {mirror_url!r}: loopback http(s)://HOST:PORT only")
        self.directory = directory
        self.mirror_url = mirror_url
        self.name = name
        self.max_download_attempts = max_download_attempts
        self.extra_json = dict(daemon_json or {})
        self.config_path = directory / "daemon.json"
        self.socket = directory / "docker.sock"
        self.log_path = directory / "dockerd.log"
        self.cli_config = directory / "cli"
        self.generated: dict[str, Any] = {}
        self.warning = ""
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _write_config(self) -> None:
        self.generated, self.warning = client_config_docker(self.mirror_url)
        document = {
            **self.generated,
            # JSON only (no such flag in 20.10): otherwise the trust key goes to
            # /etc/docker/key.json.
            "deprecated-key-path": str(self.directory / "key.json"),
            **self.extra_json,
        }
        self.config_path.write_text(json.dumps(document, indent=2) + "\n")

    def argv(self) -> list[str]:
        """The dockerd command line (settings that are flags are not in daemon.json:
        dockerd refuses a directive given both ways)."""
        d = self.directory
        return [
            DOCKERD,
            "--config-file",
            str(self.config_path),
            "--data-root",
            str(d / "data"),
            "--exec-root",
            str(d / "exec"),
            "--pidfile",
            str(d / "dockerd.pid"),
            "--host",
            f"unix://{self.socket}",
            "--storage-driver",
            "vfs",
            "--bridge",
            "none",
            "--iptables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--containerd-namespace",
            "registry-gate-test",
            "--containerd-plugins-namespace",
            "registry-gate-test-plugins",
            "--max-download-attempts",
            str(self.max_download_attempts),
            "--log-level",
            "info",
        ]

    def start(self) -> DockerDaemon:
        if self.running:
            return self
        if not loopback_only_netns():
            raise DockerdStartError(
                "refusing to start dockerd outside a loopback-only network namespace "
                "(it falls back to registry-1.docker.io): run the tests with tests/run"
            )
        reason = docker_missing()
        if reason:
            raise DockerdStartError(reason)
        for sub in ("data", "exec", "cli"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        self._write_config()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [*_MOUNT_NS_PREFIX, *self.argv()],
                env=_clean_environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(self.socket):
            if self._proc.poll() is not None:
                raise DockerdStartError(
                    f"dockerd exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise DockerdStartError(
                    f"dockerd API did not answer within {START_TIMEOUT:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        return self

    def _containerd_pid(self) -> int | None:
        """The pid of the containerd this daemon started (from its pidfile), if alive
        and really ours (its command line names our exec root)."""
        pidfile = self.directory / "exec" / "containerd" / "containerd.pid"
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError):
            return None
        return pid if str(self.directory / "exec").encode() in cmdline else None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (SIGKILL after ``timeout``); then the containerd it started, if a
        killed dockerd left it behind. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        containerd = self._containerd_pid()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if containerd is not None and self._containerd_pid() == containerd:
            with contextlib.suppress(ProcessLookupError):
                os.kill(containerd, signal.SIGTERM)

    def wipe(self) -> None:
        """Stop and delete the state directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> DockerDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the CLI -----------------------------------------------------------------------

    def cli_env(self) -> dict[str, str]:
        return _clean_environment(
            {"DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(self.cli_config)}
        )

    def docker(
        self,
        *args: str,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker ARGS`` against this daemon; raises DockerError when ``check``
        and it fails. ``input`` (text or bytes) goes to its stdin."""
        data = input.encode() if isinstance(input, str) else input
        raw = subprocess.run(
            [DOCKER_CLI, *args],
            check=False,
            capture_output=True,
            input=data,
            env=self.cli_env(),
            timeout=timeout,
            stdin=None if data is not None else subprocess.DEVNULL,
        )
        proc = subprocess.CompletedProcess(
            raw.args,
            raw.returncode,
            raw.stdout.decode(errors="replace"),
            raw.stderr.decode(errors="replace"),
        )
        if check and proc.returncode != 0:
            raise DockerError(args, proc)
        return proc

    def pull(self, reference: str) -> subprocess.CompletedProcess[str]:
        return self.docker("pull", reference)

    def inspect(self, reference: str) -> dict[str, Any]:
        """``docker image inspect`` of one image."""
        out = self.docker("image", "inspect", reference).stdout
        images = json.loads(out)
        assert isinstance(images, list) and len(images) == 1, out
        image = images[0]
        assert isinstance(image, dict)
        return image

    def label(self, reference: str, key: str) -> str | None:
        labels = (self.inspect(reference).get("Config") or {}).get("Labels") or {}
        value = labels.get(key)
        return None if value is None else str(value)

    def mirrors(self) -> list[str]:
        """The registry mirrors the running daemon reports (``docker info``)."""
        out = self.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
        return list(json.loads(out) or [])

    # -- what tests read ---------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"

    def __repr__(self) -> str:
        return f"DockerDaemon({self.name!r}, mirror={self.mirror_url}, pid={self.pid})"


def short_state_dir(preferred: Path) -> Path:
    """``preferred`` when short enough for unix socket paths under it, else a fresh
    directory under the system temp dir (the caller removes it)."""
    if len(str(preferred)) <= MAX_STATE_PATH:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    return Path(tempfile.mkdtemp(prefix="rg-dockerd-"))
