"""The gate on shared state, as the benchmarks run it: redis-server and SeaweedFS (S3)
started once per run, and gates on them with `serve --workers N`, each with its own Redis
database and bucket prefix (a `tests.support.replicas.ReplicaSet` of one process tree),
handed back once every worker listens.

The settings are those several workers need (redis + S3), so that a gate with one
worker and a gate with N differ in nothing but the number of processes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

# Imported by the scripts beside it, which put the repository root on sys.path.
from bench.processes import process_tree
from tests.support.engines import RedisServer, SeaweedS3
from tests.support.gate import GateProcess, deep_merge
from tests.support.replicas import ReplicaSet

# The upstream's registry name in every benchmark gate's `upstreams`.
GATE_REGISTRY = "upstream.bench"
ENGINE_TOOLS = ("redis-server", "weed")
LISTENING = "registry-gate listening"


def missing_engines() -> list[str]:
    """The engines' programs that are not installed."""
    return [tool for tool in ENGINE_TOOLS if shutil.which(tool) is None]


def upstreams(url: str) -> list[dict[str, Any]]:
    """The `upstreams` setting of a benchmark gate in front of `url`."""
    return [{"registry": GATE_REGISTRY, "url": url}]


class SharedEngines:
    """redis-server and SeaweedFS (with the bucket) for one run; `stack` stops them, and
    every gate started here, at its end."""

    def __init__(self, workdir: Path, stack: ExitStack) -> None:
        self.workdir, self.stack = workdir, stack
        self.redis = RedisServer(workdir / "redis").start()
        stack.callback(self.redis.stop)
        self.s3 = SeaweedS3(workdir / "seaweed").start()
        stack.callback(self.s3.stop)

    def pids(self) -> list[int]:
        """redis-server's processes: a warm tag costs a Redis round trip, whose server
        side is charged to the gate's requests. (SeaweedFS is not: warm manifests and
        small blobs never reach it.)"""
        return process_tree(self.redis.pid)

    def gate(
        self,
        label: str,
        upstream_url: str,
        workers: int,
        extra: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> GateProcess:
        """`serve --workers <workers>` in front of `upstream_url` (`extra` laid over its
        settings), every worker listening (the port answers as soon as the first one
        does)."""
        config = {
            "upstreams": upstreams(upstream_url),
            # Each worker is a replica with its own audit chain.
            "audit": {"path": str(self.workdir / label / "audit" / "{replica}.jsonl")},
            "replica": {"id": label},
        }
        replicas = ReplicaSet(
            self.workdir / label,
            deep_merge(config, extra or {}),
            redis_server=self.redis,
            s3=self.s3,
            count=1,
            args=["--workers", str(workers)],
        )
        self.stack.callback(replicas.stop)
        gate = replicas.start()[0]
        deadline = time.monotonic() + timeout
        while gate.log_text().count(LISTENING) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: not every worker listens:\n{gate.log_tail()}")
            time.sleep(0.1)
        return gate
