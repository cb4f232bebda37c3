"""`serve --workers N`: several gate processes on one machine that are one gate.

Owns the supervisor (the parent process: it starts N worker processes, forwards
SIGTERM/SIGINT/SIGHUP to them, restarts one that dies, and gives up when they keep
failing at start) and what makes a worker one replica of the scale-out design (issue 12):
its `replica.id` (`<id>-w<i>`: its own audit chain and fill leases), its own peer address
(a private port, so that another worker streaming a fill this one holds reaches this one:
`SO_REUSEPORT` on the public port would hand the connection to any worker), and its own
local folder (the S3 store's spool). Everything else the workers share the way replicas
do: tags, pins, fill leases and cache accounting in Redis, the content in the S3 bucket.

Why not the filesystem backend: its accounting, leases and eviction live in one process
(and it locks its folder to keep it so); sharing it would be a second, cross-process
implementation of what Redis and S3 already give several replicas. Without both, the
default is one worker, and asking for more is a configuration error.

The workers are spawned (a fresh interpreter each), not forked: the parent never opens
what a worker opens, and prometheus-client chooses its multiprocess mode when it is
imported, from `PROMETHEUS_MULTIPROC_DIR`, which the parent sets for its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import multiprocess

from proxy.observability.metrics import MULTIPROC_DIR_ENV
from proxy.settings import ConfigError, Settings, host_port
from proxy.storage.pins import PINS_FILE_NAME

log = logging.getLogger("registry_gate.workers")

# The default number of workers is the cores this process may run on, at most this.
WORKER_CAP = 8
# cgroup v2: "<quota> <period>" (microseconds) or "max <period>".
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# A worker that ran less than this before it died failed "at start".
STABLE_AFTER = 10.0
# This many failures at start in a row of one worker: the gate stops (exit 1).
MAX_START_FAILURES = 5
# Restart delays double from the first to the last.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
# Seconds past shutdown_timeout before a worker that has not exited is killed.
KILL_GRACE = 5.0
EXIT_CONFIG = 2
_PR_SET_PDEATHSIG = 1


def why_single(settings: Settings) -> str | None:
    """Why these settings cannot run several workers (None: they can)."""
    if settings.redis is None or settings.storage.backend != "s3":
        return "workers share the cache through redis and storage.backend s3 (see README)"
    if settings.audit.path is not None and not settings.audit.per_replica:
        return "audit.path: each worker writes its own chain: put {replica} in the path"
    return None


def worker_count(settings: Settings, asked: int | None) -> int:
    """How many workers to run: `asked`, or the cores (capped) when the settings allow
    several, else 1. ConfigError when `asked` > 1 and the settings cannot share."""
    reason = why_single(settings)
    if asked is None:
        if reason is not None:
            return 1
        return max(1, min(usable_cores(), WORKER_CAP))
    if asked < 1:
        raise ConfigError(f"--workers {asked}: at least 1")
    if asked > 1 and reason is not None:
        raise ConfigError(f"--workers {asked}: {reason}")
    return asked


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, lowered to the cgroup's CPU
    limit (a container's `resources.limits.cpu`; rounded up) when there is one."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    try:
        limit = math.ceil(int(quota) / int(period))
    except (ValueError, ZeroDivisionError):
        return cores
    return max(1, min(cores, limit))


def worker_settings(settings: Settings, index: int, peer_url: str) -> Settings:
    """The settings of worker `index`: a replica named `<id>-w<index>`, announcing
    `peer_url`, with its own local folder, sharing the one pin archive."""
    replica = settings.replica.model_copy(
        update={"id": f"{settings.replica.id[:59]}-w{index}", "peer_url": peer_url}
    )
    base = settings.storage.path
    storage = settings.storage.model_copy(update={"path": base / "workers" / f"w{index}"})
    # The pin archive must be the same for every replica (redis_pins.py).
    policy = settings.policy.model_copy(
        update={"pins_path": settings.policy.pins_path or base / PINS_FILE_NAME}
    )
    return settings.model_copy(update={"replica": replica, "storage": storage, "policy": policy})


def peer_socket(settings: Settings) -> tuple[socket.socket, str]:
    """A socket bound to a free port on the peer host (that of `replica.peer_url`, else
    of `listen`), and the URL other workers and replicas reach it at."""
    scheme = "https" if settings.tls else "http"
    host = host_port(settings.listen)[0]
    if settings.replica.peer_url is not None:
        parts = urlsplit(settings.replica.peer_url)
        scheme, host = parts.scheme, parts.hostname or host
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ConfigError(f"replica.peer_url: cannot listen on {host}: {exc.strerror}") from exc
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return sock, f"{scheme}://{shown}:{port}"


def die_with_parent(supervisor: int | None) -> None:
    """Have the kernel SIGTERM this worker when its supervisor dies (Linux), so a
    `kill -9` of the parent leaves no worker serving unsupervised; and ignore SIGHUP until
    the worker's own handler is in place (it reads the policy as it starts anyway)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if supervisor is not None and os.getppid() != supervisor:
        # It died before the request above took effect: nobody would stop this worker.
        raise SystemExit(1)


class Supervisor:
    """The parent of `count` workers, each `command + ["--worker-index", i, ...]`."""

    def __init__(self, command: Sequence[str], count: int, shutdown_timeout: float) -> None:
        self.command = list(command)
        self.count = count
        self.shutdown_timeout = shutdown_timeout
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = asyncio.Event()
        self._failed_code = 0
        self._env = dict(os.environ)
        self._own_dir: str | None = None

    def _metrics_dir(self) -> None:
        # An operator's folder is used as given (and must start empty); ours is removed.
        given = os.environ.get(MULTIPROC_DIR_ENV)
        if given:
            os.makedirs(given, exist_ok=True)
            return
        self._own_dir = tempfile.mkdtemp(prefix="registry-gate-metrics-")
        self._env[MULTIPROC_DIR_ENV] = self._own_dir

    async def run(self) -> int:
        """Run the workers until a stop signal (0) or until one keeps failing at start
        (1, or 2 when it said the configuration is wrong)."""
        self._metrics_dir()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        log.info("starting %d workers", self.count)
        try:
            slots = [asyncio.create_task(self._slot(i)) for i in range(self.count)]
            codes = await asyncio.gather(*slots)
        finally:
            if self._own_dir is not None:
                shutil.rmtree(self._own_dir, ignore_errors=True)
        if self._failed_code:
            return self._failed_code
        if any(codes):
            log.warning("workers exited with %s", sorted(set(codes)))
            return 1
        log.info("registry-gate stopped (%d workers)", self.count)
        return 0

    def _stop(self, signum: int) -> None:
        if not self._stopping.is_set():
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(self._procs))
            self._stopping.set()
        self._forward(signal.SIGTERM)

    def _forward(self, signum: int) -> None:
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    async def _slot(self, index: int) -> int:
        """Keep worker `index` running until the gate stops; its last exit status."""
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            started = loop.time()
            proc = await asyncio.create_subprocess_exec(
                *self.command,
                "--worker-index",
                str(index),
                "--supervisor",
                str(os.getpid()),
                env=self._env,
            )
            self._procs[index] = proc
            log.info("worker %d started (pid %d)", index, proc.pid)
            if self._stopping.is_set():
                # A stop signal came while it was being spawned: it missed the forward.
                proc.send_signal(signal.SIGTERM)
            code = await self._wait(proc)
            del self._procs[index]
            # Its live gauges (in-flight fills) no longer count; its counters still do.
            multiprocess.mark_process_dead(proc.pid, self._env[MULTIPROC_DIR_ENV])  # type: ignore[no-untyped-call]
            if self._stopping.is_set():
                # Still starting when told to stop (no handler yet): nothing to drain.
                return 0 if code == -signal.SIGTERM else code
            failures = failures + 1 if loop.time() - started < STABLE_AFTER else 1
            if failures >= MAX_START_FAILURES:
                log.error(
                    "worker %d failed %d times at start (last exit status %d): stopping",
                    index,
                    failures,
                    code,
                )
                self._failed_code = EXIT_CONFIG if code == EXIT_CONFIG else 1
                self._stop(signal.SIGTERM)
                return code
            delay = min(FIRST_BACKOFF * 2 ** (failures - 1), MAX_BACKOFF)
            log.warning(
                "worker %d (pid %d) exited with status %d: restarting in %g s",
                index,
                proc.pid,
                code,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return code

    async def _wait(self, proc: asyncio.subprocess.Process) -> int:
        """The worker's exit status; once the gate stops, it is killed when it outlives
        shutdown_timeout."""
        waiting = asyncio.create_task(proc.wait())
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                try:
                    async with asyncio.timeout(self.shutdown_timeout + KILL_GRACE):
                        await asyncio.shield(waiting)
                except TimeoutError:
                    log.error("worker pid %d outlived shutdown_timeout: killed", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            return await waiting
        finally:
            stopping.cancel()
