"""Benchmark: the gate with 1 worker against N workers (`serve --workers`), same run.

Run from the repository root: `python3 bench/workers.py [--workers 2] [--seconds 5]
[--runs 3]`. Needs `docker-registry` (Debian's Distribution 2.8), `skopeo`,
`redis-server` and `weed` (SeaweedFS); uses `wrk` when installed (else an aiohttp client).
Prints a table and asserts nothing (issue 13: "2 workers on 2 cores >= 1.7x one worker
on warm manifests"). bench/perf.py runs the same two gates in its single run beside
Distribution and its cache, every figure once; this script is the focused comparison:
warm manifests only, the median of several runs, each gate alone on the machine.

One Distribution registry is the upstream, seeded with `library/busybox:1.36`. In front
of it, one after the other and each with its own bucket prefix and Redis database:

- **gate-w1**: `serve --workers 1` on redis + S3 (the settings several workers need, so
  that the only difference is the number of processes; bench/shared_gate.py);
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
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.cache_vs_distribution import load  # noqa: E402
from bench.processes import CpuMeter, process_tree  # noqa: E402
from bench.shared_gate import GATE_REGISTRY, SharedEngines, missing_engines, upstreams  # noqa: E402
from tests.support.gate import GateProcess  # noqa: E402
from tests.support.images import MT_OCI_MANIFEST, Layout, PushSpec, busybox_image, push  # noqa: E402
from tests.support.registries import DistributionRegistry  # noqa: E402


def measure(
    label: str, gate: GateProcess, engines: list[int], args: argparse.Namespace
) -> dict[str, float]:
    """Warm manifest by tag GETs: median req/s over the runs, CPU us per request."""
    url = f"{gate.url}/v2/{GATE_REGISTRY}/library/busybox/manifests/1.36"
    headers = {"Accept": MT_OCI_MANIFEST}
    load(url, 16, min(2.0, args.seconds), headers)  # warm-up: fills the cache
    rates, errors, requests = [], 0.0, 0.0
    meter = CpuMeter(process_tree(gate.pid), engines)
    for _ in range(args.runs):
        got = load(url, 16, args.seconds, headers)
        rates.append(got["rps"])
        errors += got["errors"]
        requests += got["rps"] * args.seconds
    span = meter.stop()
    figures = {
        "manifest_rps": statistics.median(rates),
        "manifest_rps_min": min(rates),
        "manifest_rps_max": max(rates),
        "errors": errors,
        "cpu_us_per_request": span.server / requests * 1e6 if requests else math.nan,
        "redis_us_per_request": span.engines / requests * 1e6 if requests else math.nan,
        # Cores used while loaded: the gate's processes, the load tool's and the idle
        # CPU left on the machine (what a second worker could have had).
        "gate_cores": span.server_cores,
        "load_tool_cores": span.load_tool_cores,
        "idle_cores": span.idle_cores,
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
    missing = [t for t in ("skopeo", "docker-registry") if shutil.which(t) is None]
    if missing := missing + missing_engines():
        print(f"bench: not installed: {', '.join(missing)}", file=sys.stderr)
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
        engines = SharedEngines(workdir, stack)
        # One after the other: a gate waiting idle would still take memory and wake-ups.
        for label, workers in (("gate-w1", 1), (f"gate-w{args.workers}", args.workers)):
            gate = engines.gate(label, upstream.url, workers)
            results[label] = measure(label, gate, engines.pids(), args)
            gate.stop()
        if args.fs:
            fs = GateProcess(workdir / "gate-fs", {"upstreams": upstreams(upstream.url)})
            stack.callback(fs.stop)
            results["gate-fs"] = measure("gate-fs", fs.start(), [], args)
            fs.stop()
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
