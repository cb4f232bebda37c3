"""Benchmark: the gate with 1 worker against N workers (`serve --workers`), same run.

Run from the repository root: `python3 bench/workers.py [--workers 2] [--seconds 5]
[--runs 3]`. Needs `docker-registry` (Debian's Distribution 2.8), `skopeo`,
`redis-server` and `weed` (SeaweedFS); uses `wrk` when installed (else an aiohttp client).
Prints a table and asserts nothing (issue 13: "2 workers on 2 cores >= 1.7x one worker
on warm manifests").

One Distribution registry is the upstream, seeded with `library/busybox:1.36`. In front
of it, one after the other and each with its own bucket prefix and Redis database:

- **gate-w1**: `serve --workers 1` on redis + S3 (the settings several workers need, so
  that the only difference is the number of processes);
- **gate-wN**: `serve --workers N`, the same settings;
- **gate-fs**: the embedded default (filesystem, no Redis), one process: what a warm hit
  costs without shared state, for reference.

Figures: warm manifest by tag GET at 16 connections (req/s; the median of `--runs` runs
after a warm-up), the CPU the gate's processes (supervisor and workers) and Redis used
per request (us), and the idle CPU left on the machine under that load (cores). Redis
and SeaweedFS run on the same cores as the gate and the load tool: on a 2-core machine
everything competes for the same two cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.cache_vs_distribution import load  # noqa: E402
from bench.perf import CLOCK_TICKS, GATE_REGISTRY, MANIFEST_ACCEPT, cpu_seconds  # noqa: E402
from tests.support.engines import S3_ACCESS_KEY, S3_SECRET_KEY, RedisServer, SeaweedS3  # noqa: E402
from tests.support.gate import GateProcess  # noqa: E402
from tests.support.images import Layout, PushSpec, busybox_image, push  # noqa: E402
from tests.support.registries import DistributionRegistry  # noqa: E402
from tests.support.replicas import (  # noqa: E402
    BUCKET,
    S3_ACCESS_ENV,
    S3_REGION,
    S3_SECRET_ENV,
    ensure_bucket,
)


def process_tree(pid: int | None) -> list[int]:
    """`pid` and its children (a supervisor's workers)."""
    if pid is None:
        return []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *(int(c) for c in children)]


def idle_seconds() -> float:
    """Idle CPU seconds of the whole machine since boot (all cores, /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[4]) / CLOCK_TICKS


def children_cpu() -> float:
    """CPU seconds of this process's children that have exited (the load tool's runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def measure(
    label: str, gate: GateProcess, extra_pids: list[int], args: argparse.Namespace
) -> dict[str, float]:
    """Warm manifest by tag GETs: median req/s over the runs, CPU us per request."""
    url = f"{gate.url}/v2/{GATE_REGISTRY}/library/busybox/manifests/1.36"
    headers = {"Accept": MANIFEST_ACCEPT}
    load(url, 16, min(2.0, args.seconds), headers)  # warm-up: fills the cache
    pids = process_tree(gate.pid)
    rates, errors = [], 0.0
    cpu_before, engines_before, requests = tree_cpu(pids), tree_cpu(extra_pids), 0.0
    idle_before, load_tool_before = idle_seconds(), children_cpu()
    for _ in range(args.runs):
        got = load(url, 16, args.seconds, headers)
        rates.append(got["rps"])
        errors += got["errors"]
        requests += got["rps"] * args.seconds
    cpu = tree_cpu(pids) - cpu_before
    engines = tree_cpu(extra_pids) - engines_before
    idle = idle_seconds() - idle_before
    load_tool = children_cpu() - load_tool_before
    loaded = args.runs * args.seconds
    figures = {
        "manifest_rps": statistics.median(rates),
        "manifest_rps_min": min(rates),
        "manifest_rps_max": max(rates),
        "errors": errors,
        "cpu_us_per_request": cpu / requests * 1e6 if requests else math.nan,
        "redis_us_per_request": engines / requests * 1e6 if requests else math.nan,
        # Cores used while loaded (CPU seconds per second of load): the gate's processes,
        # the load tool's (wrk runs as a child and exits after each run) and the idle
        # CPU left on the machine: what a second worker could have had.
        "gate_cores": cpu / loaded,
        "load_tool_cores": load_tool / loaded,
        "idle_cores": idle / loaded,
        "processes": float(len(process_tree(gate.pid))),
    }
    print(f"{label}: {json.dumps(figures)}", file=sys.stderr)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="N of gate-wN (2)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load run")
    parser.add_argument("--runs", type=int, default=3, help="load runs per subject (median)")
    parser.add_argument("--no-fs", dest="fs", action="store_false", help="skip gate-fs")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: tmp)")
    args = parser.parse_args(argv)
    for tool in ("skopeo", "redis-server", "weed", "docker-registry"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="workers-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        upstream = DistributionRegistry(workdir / "plain", name="plain")
        stack.callback(upstream.stop)
        upstream.start()
        layout = Layout(workdir / "layout")
        push(layout, upstream.host, [PushSpec(busybox_image(layout), "library/busybox", "1.36")])
        redis_server = RedisServer(workdir / "redis").start()
        stack.callback(redis_server.stop)
        seaweed = SeaweedS3(workdir / "seaweed").start()
        stack.callback(seaweed.stop)
        ensure_bucket(seaweed)
        env = {S3_ACCESS_ENV: S3_ACCESS_KEY, S3_SECRET_ENV: S3_SECRET_KEY}
        upstreams = [{"registry": GATE_REGISTRY, "url": upstream.url}]
        engines = process_tree(redis_server.pid)

        def shared(index: int) -> dict[str, Any]:
            return {
                "upstreams": upstreams,
                "storage": {
                    "backend": "s3",
                    "s3": {
                        "endpoint": seaweed.endpoint,
                        "bucket": BUCKET,
                        "region": S3_REGION,
                        "prefix": f"bench-{index}-{os.getpid()}/",
                        "access_key_env": S3_ACCESS_ENV,
                        "secret_key_env": S3_SECRET_ENV,
                    },
                },
                "redis": {"url": f"redis://127.0.0.1:{redis_server.port}/{index}"},
                "upload_secret": "bench-upload-secret-0123456789abcdef",
                "audit": {"path": str(workdir / f"audit-{index}" / "{replica}.jsonl")},
                "replica": {"id": f"bench-{index}"},
            }

        subjects: list[tuple[str, dict[str, Any], list[str]]] = [
            ("gate-w1", shared(1), ["--workers", "1"]),
            (f"gate-w{args.workers}", shared(2), ["--workers", str(args.workers)]),
        ]
        if args.fs:
            subjects.append(("gate-fs", {"upstreams": upstreams}, []))
        for label, config, extra_args in subjects:
            gate = GateProcess(workdir / label, config, env=env, name=label, args=extra_args)
            gate.start()
            try:
                # Every worker listening (the port answers once the first one does).
                deadline = time.monotonic() + 30
                want = max(1, int(extra_args[1]) if extra_args else 1)
                while gate.log_text().count("registry-gate listening") < want:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{label}: not every worker listens")
                    time.sleep(0.1)
                uses_redis = "redis" in config
                results[label] = measure(label, gate, engines if uses_redis else [], args)
            finally:
                gate.stop()
    one, many = results["gate-w1"], results[f"gate-w{args.workers}"]
    print(
        f"{'warm manifest by tag GET, 16 connections':44} {'req/s (median)':>15} "
        f"{'min-max':>13} {'gate CPU us/req':>16} {'redis us/req':>13} {'gate cores':>11} "
        f"{'wrk cores':>10} {'idle cores':>11}"
    )
    for label, figures in results.items():
        spread = f"{figures['manifest_rps_min']:.0f}-{figures['manifest_rps_max']:.0f}"
        print(
            f"{label:44} {figures['manifest_rps']:15.0f} {spread:>13} "
            f"{figures['cpu_us_per_request']:16.0f} {figures['redis_us_per_request']:13.0f} "
            f"{figures['gate_cores']:11.2f} {figures['load_tool_cores']:10.2f} "
            f"{figures['idle_cores']:11.2f}"
        )
    ratio = many["manifest_rps"] / one["manifest_rps"] if one["manifest_rps"] else math.nan
    print(f"gate-w{args.workers} / gate-w1: {ratio:.2f}x (target for 2 workers: >= 1.7x)")
    print(
        f"single run, {time.strftime('%Y-%m-%d %H:%M %Z')}; {args.runs} x {args.seconds:g} s per "
        f"subject; {len(os.sched_getaffinity(0))} CPUs shared by the gate, redis-server, "
        f"SeaweedFS and the load tool ({'wrk' if shutil.which('wrk') else 'aiohttp'})"
    )
    print("figures: " + json.dumps(results))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
