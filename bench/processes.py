"""What a server under benchmark costs, read from /proc: its processes (one, or a
supervisor and its workers), their CPU and resident memory summed, and over one span of
load the cores they used, the CPU of engines beside them (redis-server), the CPU of the
load tool and the idle CPU left on the machine.

Linux only (`/proc`); a process that is gone reads as NaN, never as zero.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Imported by the scripts beside it, which put the repository root on sys.path.
from bench.cache_vs_distribution import peak_rss_mib
from bench.load import resources

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int | None) -> list[int]:
    """`pid` and its children (a supervisor's workers); [] for no process."""
    if pid is None:
        return []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *(int(c) for c in children)]


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds the process has used (threads included)."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    # Fields 14 and 15 of proc_pid_stat(5) (utime, stime); the text after the command
    # name's closing parenthesis starts at field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu(pids: Sequence[int]) -> float:
    """CPU seconds of all of `pids` (0 for none)."""
    return sum(cpu_seconds(p) for p in pids)


def tree_rss_mib(pids: Sequence[int]) -> float:
    """Resident memory of all of `pids` now, MiB (NaN for none)."""
    return sum(resources(p).rss_mib for p in pids) if pids else float("nan")


def tree_peak_rss_mib(pids: Sequence[int]) -> float:
    """The sum of each process's own peak (VmHWM), MiB: an upper bound of the tree's
    peak, as the processes need not have peaked together (NaN for none)."""
    return sum(peak_rss_mib(p) for p in pids) if pids else float("nan")


def idle_seconds() -> float:
    """Idle CPU seconds of the whole machine since boot (all cores, /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[4]) / CLOCK_TICKS


def children_cpu() -> float:
    """CPU seconds of this process's children that have exited (the load tool's runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Span:
    """CPU seconds used over one span of load, and its wall-clock length."""

    server: float
    engines: float
    load_tool: float
    idle: float
    wall: float

    @property
    def server_cores(self) -> float:
        return self.server / self.wall

    @property
    def load_tool_cores(self) -> float:
        return self.load_tool / self.wall

    @property
    def idle_cores(self) -> float:
        """The idle CPU left on the machine: what another worker could have had."""
        return self.idle / self.wall


class CpuMeter:
    """Counts from its creation to `stop()`: the server's processes (`pids`), the
    engines beside it (`engines`), the load tool (this process's children that exited
    meanwhile: wrk and ab run as children and exit after each run) and the machine's idle
    CPU."""

    def __init__(self, pids: Sequence[int], engines: Sequence[int] = ()) -> None:
        self.pids, self.engines = list(pids), list(engines)
        self._server, self._engines = tree_cpu(self.pids), tree_cpu(self.engines)
        self._load_tool, self._idle = children_cpu(), idle_seconds()
        self._started = time.monotonic()

    def stop(self) -> Span:
        return Span(
            server=tree_cpu(self.pids) - self._server,
            engines=tree_cpu(self.engines) - self._engines,
            load_tool=children_cpu() - self._load_tool,
            idle=idle_seconds() - self._idle,
            wall=time.monotonic() - self._started,
        )
