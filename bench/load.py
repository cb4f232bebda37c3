"""Benchmark: the gate under sustained load, warm and with an expiring tag on a slow upstream.

Run from the repository root: `python3 bench/load.py [--seconds 60] [--connections 64]
[--big-mib 32] [--tag-ttl 2] [--delay 0.5] [--idle 5]`. Needs `docker-registry` (Debian's
Distribution 2.8) and `skopeo`. Prints a table and asserts nothing.

One real Distribution registry is the upstream, seeded with a small image
(`library/busybox:1.36`: a manifest and small blobs) and a big one (`bench/big:1`, one
`--big-mib` MiB layer). Each gate reaches it through its own counting pass-through proxy
(tests/support/fault_proxy.py), so every upstream request is counted. The load generator
is an aiohttp client in this process: `--connections` workers, each sending one request
after another for `--seconds`, drawn from a fixed mix (manifest by tag 4, small blob 4,
big blob 1).

Scenarios:

- **warm**: the default `tag_ttl`; every URL fetched once before the run, so the run
  should be served from the cache alone.
- **expiring tag, slow upstream**: `tag_ttl: --tag-ttl` seconds, and the proxy holds
  every manifest request `--delay` seconds before forwarding it. The tag is
  revalidated (a HEAD upstream) each time it expires; the figure to watch is upstream
  manifest HEADs per tag expiry.

Per scenario: requests, errors (status >= 400 or no answer), p50/p99/max latency, upstream
requests per client request, manifest HEADs per tag expiry, and the gate's RSS and open
file descriptors (`/proc/PID/fd`) before the run, at the peak during it, and after
`--idle` seconds idle. Issue 11's targets: 0 errors, upstream HEADs per tag expiry <= 2,
RSS and fds back to their start level when idle.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.fault_proxy import FaultProxy, LoopThread  # noqa: E402
from tests.support.gate import GateProcess  # noqa: E402
from tests.support.images import (  # noqa: E402
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    Layout,
    PushSpec,
    big_image,
    busybox_image,
    push,
)
from tests.support.registries import DistributionRegistry  # noqa: E402

MIB = 1024 * 1024
REGISTRY = "upstream.bench"
ACCEPT = f"{MT_OCI_MANIFEST}, {MT_OCI_INDEX}"
# Request mix: (weight, kind). Kinds are resolved to URLs once the images are seeded.
MIX = ((4, "manifest"), (4, "small-blob"), (1, "big-blob"))


# -- the gate's resources --------------------------------------------------------------------


@dataclass
class Resources:
    """RSS (MiB) and open file descriptors of one process."""

    rss_mib: float
    fds: int


def resources(pid: int | None) -> Resources:
    if pid is None:
        return Resources(float("nan"), -1)
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return Resources(float("nan"), -1)
    rss = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), "0")
    return Resources(int(rss) / 1024, fds)


class Sampler:
    """Samples a process's resources every `interval` seconds on a thread; keeps the peak."""

    def __init__(self, pid: int | None, interval: float = 0.25) -> None:
        self.pid, self.interval = pid, interval
        self.peak = Resources(0.0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = resources(self.pid)
            self.peak = Resources(max(self.peak.rss_mib, now.rss_mib), max(self.peak.fds, now.fds))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the load generator ----------------------------------------------------------------------


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies)

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def drive(
    base: str, urls: dict[str, list[str]], connections: int, seconds: float, seed: int = 11
) -> Outcome:
    """`connections` workers sending requests from the mix back to back for `seconds`."""
    import aiohttp

    kinds = [kind for weight, kind in MIX for _ in range(weight) if urls.get(kind)]
    outcome = Outcome()

    async def run() -> None:
        deadline = time.monotonic() + seconds
        connector = aiohttp.TCPConnector(limit=connections, force_close=False)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:

            async def worker(index: int) -> None:
                chooser = random.Random(seed + index)
                while time.monotonic() < deadline:
                    kind = chooser.choice(kinds)
                    url = chooser.choice(urls[kind])
                    headers = {"Accept": ACCEPT} if kind == "manifest" else {}
                    started = time.monotonic()
                    label: str
                    try:
                        async with session.get(url, headers=headers) as response:
                            async for _chunk in response.content.iter_chunked(MIB):
                                pass
                            label = str(response.status)
                            outcome.errors += response.status >= 400
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        label = type(exc).__name__
                        outcome.errors += 1
                    outcome.latencies.append(time.monotonic() - started)
                    outcome.statuses[label] = outcome.statuses.get(label, 0) + 1

            started = time.monotonic()
            await asyncio.gather(*(worker(i) for i in range(connections)))
            outcome.seconds = time.monotonic() - started

    asyncio.run(run())
    return outcome


def warm_up(base: str, urls: dict[str, list[str]]) -> None:
    """GET every URL once, one after another (fills the cache)."""
    import aiohttp

    async def run() -> None:
        async with aiohttp.ClientSession(base) as session:
            for url in (url for kind_urls in urls.values() for url in kind_urls):
                async with session.get(url, headers={"Accept": ACCEPT}) as response:
                    await response.read()

    asyncio.run(run())


# -- the upstream's content ------------------------------------------------------------------


def seed(
    upstream: DistributionRegistry, workdir: Path, big_mib: int
) -> tuple[dict[str, list[str]], int]:
    """Push `library/busybox:1.36` and `bench/big:1` (one `big_mib` MiB layer) to the
    upstream; the gate URLs of each request kind (as `REGISTRY`), and the big blob's size."""
    print(f"seeding {upstream.url} ...", file=sys.stderr)
    layout = Layout(workdir / "layout")
    plan = [
        PushSpec(busybox_image(layout), "library/busybox", "1.36"),
        PushSpec(big_image(layout, big_mib), "bench/big", "1"),
    ]
    seeded = push(layout, upstream.host, plan)
    small, big = seeded["library/busybox:1.36"], seeded["bench/big:1"]
    prefix = f"/v2/{REGISTRY}"
    urls = {
        "manifest": [f"{prefix}/{small.repo}/manifests/{small.tag}"],
        "small-blob": [f"{prefix}/{small.repo}/blobs/{b.digest}" for b in small.manifest.blobs],
        "big-blob": [f"{prefix}/{big.repo}/blobs/{big.manifest.layers[0].digest}"],
    }
    return urls, big.manifest.layers[0].size


# -- scenarios -------------------------------------------------------------------------------


@dataclass
class Scenario:
    label: str
    figures: dict[str, Any] = field(default_factory=dict)


def measure(
    scenario: Scenario,
    gate: GateProcess,
    proxy: FaultProxy,
    urls: dict[str, list[str]],
    args: argparse.Namespace,
    tag_ttl: float | None,
) -> None:
    # Warm-up: every URL once, so the run measures the cache (and the first fill's fds
    # and memory are in the "before" figure, not charged to the run).
    warm_up(gate.url, urls)
    time.sleep(1.0)
    before = resources(gate.pid)
    proxy.reset()
    with Sampler(gate.pid) as sampler:
        outcome = drive(gate.url, urls, args.connections, args.seconds)
    upstream = proxy.count()
    heads = proxy.count("HEAD", "manifest")
    time.sleep(args.idle)
    after = resources(gate.pid)
    expiries = outcome.seconds / tag_ttl if tag_ttl else 0.0
    scenario.figures.update(
        requests=outcome.requests,
        rps=outcome.requests / outcome.seconds if outcome.seconds else float("nan"),
        errors=outcome.errors,
        statuses=dict(sorted(outcome.statuses.items())),
        p50_ms=outcome.percentile(0.50) * 1000,
        p99_ms=outcome.percentile(0.99) * 1000,
        max_ms=max(outcome.latencies, default=float("nan")) * 1000,
        upstream_per_request=upstream / outcome.requests if outcome.requests else float("nan"),
        upstream=upstream,
        manifest_heads=heads,
        heads_per_expiry=heads / expiries if expiries else float("nan"),
        rss_before=before.rss_mib,
        rss_peak=sampler.peak.rss_mib,
        rss_idle=after.rss_mib,
        fds_before=before.fds,
        fds_peak=sampler.peak.fds,
        fds_idle=after.fds,
    )


ROWS = [
    ("client requests", "requests", "{:.0f}"),
    ("requests/s", "rps", "{:.0f}"),
    ("errors (>= 400 or no answer)", "errors", "{:.0f}"),
    ("p50 latency, ms", "p50_ms", "{:.1f}"),
    ("p99 latency, ms", "p99_ms", "{:.1f}"),
    ("max latency, ms", "max_ms", "{:.1f}"),
    ("upstream requests", "upstream", "{:.0f}"),
    ("upstream requests per client request", "upstream_per_request", "{:.4f}"),
    ("upstream manifest HEADs", "manifest_heads", "{:.0f}"),
    ("upstream HEADs per tag expiry", "heads_per_expiry", "{:.1f}"),
    ("gate RSS before / peak / idle, MiB", ("rss_before", "rss_peak", "rss_idle"), "{:.0f}"),
    ("gate open fds before / peak / idle", ("fds_before", "fds_peak", "fds_idle"), "{:.0f}"),
]


def table(scenarios: list[Scenario], args: argparse.Namespace) -> str:
    width = 40
    head = f"{'':{width}}" + "".join(f" {s.label:>26}" for s in scenarios)
    lines = [head, "-" * len(head)]
    for label, key, fmt in ROWS:
        cells = []
        for scenario in scenarios:
            keys = key if isinstance(key, tuple) else (key,)
            values = [scenario.figures.get(k, float("nan")) for k in keys]
            cells.append(" / ".join(fmt.format(v) for v in values))
        lines.append(f"{label:{width}}" + "".join(f" {c:>26}" for c in cells))
    for scenario in scenarios:
        lines.append(f"statuses, {scenario.label}: {scenario.figures.get('statuses')}")
    lines.append(
        f"{args.connections} connections x {args.seconds:g} s per scenario; mix manifest:"
        f"small blob:big blob = 4:4:1; big blob {args.big_mib} MiB; expiring scenario: "
        f"tag_ttl {args.tag_ttl:g} s, every upstream manifest request held {args.delay:g} s; "
        f"idle {args.idle:g} s; loopback; {os.cpu_count()} CPUs; load generator: aiohttp, "
        "in this process"
    )
    return "\n".join(lines)


def verdict(warm: Scenario, expiring: Scenario) -> str:
    def back(key: str, slack: float) -> bool:
        return all(
            s.figures[f"{key}_idle"] <= s.figures[f"{key}_before"] * (1 + slack) + 1
            for s in (warm, expiring)
        )

    errors = warm.figures["errors"] + expiring.figures["errors"]
    heads = expiring.figures["heads_per_expiry"]
    return (
        f"targets (issue 11): 0 errors: {'met' if errors == 0 else f'NOT met ({errors})'}; "
        f"upstream HEADs per tag expiry <= 2: {'met' if heads <= 2 else 'NOT met'} "
        f"({heads:.1f}); RSS back to start when idle (within 10%): "
        f"{'met' if back('rss', 0.10) else 'NOT met'}; fds back to start when idle: "
        f"{'met' if back('fds', 0.0) else 'NOT met'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each run")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--big-mib", type=int, default=32, help="size of the big blob")
    parser.add_argument("--tag-ttl", type=float, default=2.0, help="tag_ttl when it expires")
    parser.add_argument("--delay", type=float, default=0.5, help="slow upstream: hold, s")
    parser.add_argument("--idle", type=float, default=5.0, help="idle wait before 'after'")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: tmp)")
    args = parser.parse_args(argv)
    for tool in ("skopeo", os.environ.get("GATE_TEST_REGISTRY_BINARY", "docker-registry")):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="load-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        upstream = DistributionRegistry(workdir / "upstream", name="upstream")
        stack.callback(upstream.stop)
        upstream.start()
        urls, _ = seed(upstream, workdir, args.big_mib)

        loops = LoopThread("bench-proxies")
        stack.callback(loops.close)
        scenarios: list[Scenario] = []
        for label, ttl, delay in (
            ("warm", None, 0.0),
            ("expiring tag, slow upstream", args.tag_ttl, args.delay),
        ):
            slug = "warm" if ttl is None else "expiring"
            proxy = FaultProxy(upstream.url, name=f"{slug}-upstream", loop=loops).start()
            stack.callback(proxy.stop)
            storage: dict[str, Any] = {} if ttl is None else {"tag_ttl": ttl}
            gate = GateProcess(
                workdir / f"gate-{slug}",
                {"upstreams": [{"registry": REGISTRY, "url": proxy.url}], "storage": storage},
                name=f"bench-gate-{slug}",
            )
            stack.callback(gate.stop)
            gate.start()
            print(f"measuring {label} ...", file=sys.stderr)
            scenario = Scenario(label)
            if delay:
                # `hang` with a timeout and no release(): every manifest request waits
                # `delay` seconds, then goes through.
                proxy.set_fault("hang", kinds={"manifest"}, timeout=delay)
            measure(scenario, gate, proxy, urls, args, ttl)
            proxy.clear_fault()
            gate.stop()
            scenarios.append(scenario)
        print(table(scenarios, args))
        print(verdict(*scenarios))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
