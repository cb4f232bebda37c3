"""Benchmark: the gate against plain Distribution and Distribution's pull-through cache,
and the gate with one worker against N workers, in one run.

Run from the repository root: `python3 bench/perf.py [--quick] [--seconds 5] [--runs 3]
[--cold-mib 1024] [--big-mib 100] [--only manifest,blob,cold] [--gate-config JSON]
[--workers N] [--no-workers] [--no-uvloop]`. Needs `docker-registry` (Debian's
Distribution 2.8), `skopeo` and `curl`; uses `wrk` when installed (else an aiohttp
client, much slower: then compare nothing but ratios) and ApacheBench `ab` for HEAD (wrk
cannot send HEAD; without ab that row stays empty); the workers subjects need
`redis-server` and `weed` (SeaweedFS) and are skipped, with the reason on stderr, without
them. Prints a table and asserts nothing (issue 13).

In one invocation, over the same content:

- **plain**: one real Distribution registry serving from its own disk. It is also the
  upstream of all the others, seeded with `library/busybox:1.36` (a manifest and a
  331 B-class config blob) and `bench/big:1` (one `--big-mib` MiB layer); a
  `--cold-mib` MiB blob is written into its storage (`bench/cold`) for the cold pull.
- **cache**: Distribution in proxy mode (`proxy.remoteurl`) in front of plain.
- **gate**: registry-gate, one process, in front of plain (`upstream.bench`), its
  default settings (filesystem cache, no Redis, audit on, metrics on) plus `--gate-config`;
- **gate-uvloop**: the same on `event_loop: uvloop`, its own cache (`--no-uvloop` skips it);
- **gate-w1** and **gate-wN**: `serve --workers 1` and `serve --workers N` (N: `--workers`,
  by default the cores this process may use, at least 2) on the settings several workers
  need, redis-server and SeaweedFS (S3) started for the run, each gate with its own Redis
  database and bucket prefix (bench/shared_gate.py), so that the two differ in nothing
  but the number of processes; measured once every worker listens (`--no-workers` skips
  both).

Figures, per subject (warm ones after one warm-up run that fills the caches): manifest by
tag GET and HEAD at 16 connections (req/s), the config blob GET at 16 connections (req/s),
the big blob GET at 2 connections (MB/s); under the manifest GET load, the server's own
CPU per request (user+system from /proc, summed over a supervisor and its workers; the
cache's upstream work is not charged to it), redis-server's CPU per request (workers
subjects), the cores the server's processes used and the idle cores left on the whole
machine (bench/processes.py); its RSS after the run and at its peak (summed over its
processes). Then the cold pull: `curl` fetches the cold blob straight from plain (which
warms plain's page cache, so both reads come from memory), then through the gate, whose
cache has never seen it (MB/s each); the same for gate-uvloop and gate-wN (into S3).
Ratios printed: gate/cache, gate/plain, gate-wN/cache and gate-wN/gate-w1 (for the cold
pull, against plain: the upstream).

Ceilings measured in the same run: sha256 on one core, and buffered writes into the gate's
storage file system (a cold fill hashes and writes every byte).

`--quick` (about two minutes): 2 s load runs, a 16 MiB big blob, a 256 MiB cold blob.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.cache_vs_distribution import PullThroughCache, load  # noqa: E402
from bench.processes import (  # noqa: E402
    CpuMeter,
    process_tree,
    tree_cpu,
    tree_peak_rss_mib,
    tree_rss_mib,
)
from bench.shared_gate import GATE_REGISTRY, SharedEngines, missing_engines, upstreams  # noqa: E402
from proxy.cli.workers import usable_cores  # noqa: E402
from tests.support.gate import GateProcess  # noqa: E402
from tests.support.images import (  # noqa: E402
    MT_OCI_MANIFEST,
    Layout,
    PushedRef,
    PushSpec,
    big_image,
    busybox_image,
    push,
)
from tests.support.registries import DistributionRegistry  # noqa: E402

MIB = 1024 * 1024
COLD_REPO = "bench/cold"
SECTIONS = ("manifest", "blob", "cold")
MANIFEST_ACCEPT = MT_OCI_MANIFEST


@dataclass
class Subject:
    """One server under test: where clients reach it, its repository prefix, its process
    (a supervisor's workers are its children) and the engines it uses (redis-server)."""

    label: str
    base: str
    prefix: str
    pid: Callable[[], int | None]
    engines: list[int] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    def processes(self) -> list[int]:
        return process_tree(self.pid())

    def url(self, repo: str, kind: str, ref: str) -> str:
        return f"{self.base}/v2/{self.prefix}{repo}/{kind}/{ref}"


# -- load -------------------------------------------------------------------------------------


def head_load(url: str, connections: int, seconds: float, headers: dict[str, str]) -> float:
    """HEAD requests/s, from ApacheBench (`ab -i`, keep-alive): wrk cannot send HEAD (its
    parser then waits for the body the Content-Length announces). NaN without ab."""
    if shutil.which("ab") is None:
        return math.nan
    cmd = ["ab", "-q", "-k", "-i", "-c", str(connections), "-t", f"{seconds:g}", "-n", "10000000"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run([*cmd, url], check=True, capture_output=True, text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("Requests per second:"))
    return float(line.split()[3])


def warm(subject: Subject, small: PushedRef, big: PushedRef, seconds: float, runs: int = 1) -> None:
    """The warm figures: manifest GET/HEAD, config blob, big blob; CPU and RSS. The
    manifest GET (the targets' figure) is the median of `runs` runs; CPU, cores and
    idle are measured over all of them."""
    headers = {"Accept": MANIFEST_ACCEPT}
    manifest = subject.url(small.repo, "manifests", small.tag)
    config = subject.url(small.repo, "blobs", small.manifest.blobs[0].digest)
    layer = subject.url(big.repo, "blobs", big.manifest.layers[0].digest)
    # Warm-up: each URL once through the load tool (fills the caches, opens connections).
    for url, conns in ((manifest, 16), (config, 16), (layer, 2)):
        load(url, conns, min(1.0, seconds), headers if url == manifest else {})
    pids = subject.processes()
    meter = CpuMeter(pids, subject.engines)
    rounds = [load(manifest, 16, seconds, headers) for _ in range(max(1, runs))]
    span = meter.stop()
    requests = sum(got["rps"] for got in rounds) * seconds
    subject.figures.update(
        manifest_rps=statistics.median(got["rps"] for got in rounds),
        manifest_errors=sum(got["errors"] for got in rounds),
        cpu_us_per_request=span.server / requests * 1e6 if requests else math.nan,
        engines_us_per_request=(
            span.engines / requests * 1e6 if requests and subject.engines else math.nan
        ),
        cores=span.server_cores,
        idle_cores=span.idle_cores,
        processes=len(pids),
        head_rps=head_load(manifest, 16, seconds, headers),
        config_rps=load(config, 16, seconds, {})["rps"],
        blob_mb_s=load(layer, 2, seconds, {})["bytes_per_s"] / 1e6,
        rss_mib=tree_rss_mib(pids),
        peak_rss_mib=tree_peak_rss_mib(pids),
    )


# -- the cold blob ------------------------------------------------------------------------------


def seed_cold_blob(registry: DistributionRegistry, mib: int) -> str:
    """Write a `mib` MiB blob of random bytes into the registry's storage, linked into
    COLD_REPO (Distribution's filesystem layout: a blob file and a layer link). Faster and
    lighter than pushing it over HTTP; Distribution reads both on the first GET."""
    v2 = registry.storage / "docker" / "registry" / "v2"
    staging = registry.directory / "cold.partial"
    hasher = hashlib.sha256()
    chunk = 64 * MIB
    with staging.open("wb") as out:
        for _ in range(max(1, mib * MIB // chunk)):
            data = os.urandom(min(chunk, mib * MIB))
            hasher.update(data)
            out.write(data)
    hexdigest = hasher.hexdigest()
    blob_dir = v2 / "blobs" / "sha256" / hexdigest[:2] / hexdigest
    blob_dir.mkdir(parents=True, exist_ok=True)
    staging.rename(blob_dir / "data")
    link = v2 / "repositories" / COLD_REPO / "_layers" / "sha256" / hexdigest / "link"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.write_text(f"sha256:{hexdigest}")
    return f"sha256:{hexdigest}"


def curl_mb_s(url: str) -> tuple[float, int, int]:
    """(MB/s, bytes, status) of one GET with curl, the body thrown away."""
    fmt = "%{speed_download} %{size_download} %{http_code}"
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", fmt, url],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    speed, size, status = out.stdout.split()
    return float(speed) / 1e6, int(float(size)), int(status)


def cold(plain: Subject, gate: Subject, digest: str, size: int) -> None:
    """The cold pull: straight from plain (warming its page cache), then through `gate`
    (CPU and peak RSS summed over its processes)."""
    speed, got, status = curl_mb_s(plain.url(COLD_REPO, "blobs", digest))
    upstream = speed if (status, got) == (200, size) else math.nan
    # plain's column keeps the pull paired with the gate's (the first), as gate/plain does.
    plain.figures.setdefault("cold_mb_s", upstream)
    pids = gate.processes()
    cpu_before = tree_cpu(pids)
    started = time.monotonic()
    speed, got, status = curl_mb_s(gate.url(COLD_REPO, "blobs", digest))
    speed = speed if (status, got) == (200, size) else math.nan
    gate.figures.update(
        cold_mb_s=speed,
        cold_x_upstream=speed / upstream if upstream else math.nan,
        cold_cpu_s_per_gib=(tree_cpu(pids) - cpu_before) / (size / 1024**3),
        cold_wall_s=time.monotonic() - started,
        cold_peak_rss_mib=tree_peak_rss_mib(pids),
    )
    if (status, got) != (200, size):
        print(
            f"cold pull through {gate.label}: status {status}, {got} of {size} bytes",
            file=sys.stderr,
        )


# -- output -----------------------------------------------------------------------------------

ROWS: list[tuple[str, str | tuple[str, ...], str]] = [
    ("warm manifest by tag GET, req/s (16 conns, median)", "manifest_rps", "{:.0f}"),
    ("  ... non-2xx responses", "manifest_errors", "{:.0f}"),
    ("warm manifest by tag HEAD, req/s (16 conns)", "head_rps", "{:.0f}"),
    ("warm config blob GET, req/s (16 conns)", "config_rps", "{:.0f}"),
    ("warm big blob GET, MB/s (2 conns)", "blob_mb_s", "{:.0f}"),
    ("CPU per manifest GET (all its processes), us", "cpu_us_per_request", "{:.0f}"),
    ("  ... redis-server's CPU per manifest GET, us", "engines_us_per_request", "{:.0f}"),
    ("  ... cores its processes used under that load", "cores", "{:.2f}"),
    ("  ... idle cores left on the machine", "idle_cores", "{:.2f}"),
    ("  ... processes (a supervisor and its workers)", "processes", "{:.0f}"),
    ("RSS after the warm runs / peak (all processes), MiB", ("rss_mib", "peak_rss_mib"), "{:.0f}"),
    ("cold blob pull, MB/s (gates: cold cache; plain: upstream)", "cold_mb_s", "{:.0f}"),
    ("  ... x the same pull straight from plain, just before", "cold_x_upstream", "{:.2f}"),
    ("  ... gate CPU seconds per GiB", "cold_cpu_s_per_gib", "{:.2f}"),
    ("  ... gate peak RSS, MiB", "cold_peak_rss_mib", "{:.0f}"),
]
# Rows whose ratio says nothing (counts, what is left over).
NO_RATIO = {"manifest_errors", "idle_cores", "processes", "cold_x_upstream"}


def _cell(subject: Subject, key: str | tuple[str, ...], fmt: str) -> str:
    keys = key if isinstance(key, tuple) else (key,)
    values = [subject.figures.get(k, math.nan) for k in keys]
    if all(math.isnan(v) for v in values):
        return "-"
    return " / ".join(fmt.format(v) for v in values)


def _ratio(a: Subject, b: Subject, key: str | tuple[str, ...]) -> str:
    if isinstance(key, tuple) or key in NO_RATIO:
        return "-"
    x, y = a.figures.get(key, math.nan), b.figures.get(key, math.nan)
    return "-" if math.isnan(x) or math.isnan(y) or not y else f"{x / y:.2f}x"


def table(
    subjects: list[Subject], ratios: list[tuple[Subject, Subject]], args: argparse.Namespace
) -> str:
    """The figures of `subjects`, then one column per (a, b) of `ratios`: a/b."""
    width = 58
    head = f"{'':{width}}" + "".join(f" {s.label:>12}" for s in subjects)
    head += "".join(f" {a.label + '/' + b.label:>15}" for a, b in ratios)
    lines = [head, "-" * len(head)]
    for label, key, fmt in ROWS:
        cells = "".join(f" {_cell(s, key, fmt):>12}" for s in subjects)
        cells += "".join(f" {_ratio(a, b, key):>15}" for a, b in ratios)
        lines.append(f"{label:{width}}{cells}")
    gate = next(s for s in subjects if s.label == "gate")
    lines.append("")
    lines.append(
        "ceilings, same run: sha256 on one core "
        f"{gate.figures.get('sha256_mb_s', math.nan):.0f} MB/s; buffered writes of the cold "
        f"blob's size into the gate's storage file system "
        f"{gate.figures.get('disk_write_mb_s', math.nan):.0f} MB/s"
    )
    lines.append(
        "targets (issue 13): warm manifest GET gate/cache >= 20x and gate/plain >= 3x; "
        "2 workers on 2 cores >= 1.7x one worker on warm manifests; warm big blob >= 1.0x "
        "the cache; cold pull >= 0.7x the upstream"
    )
    lines.append(
        f"single run, {time.strftime('%Y-%m-%d %H:%M %Z')}: compare ratios, not figures across "
        f"days; {args.seconds:g} s per load run (manifest GET: median of {args.runs}); "
        f"big blob {args.big_mib} MiB; cold blob "
        f"{args.cold_mib} MiB; loopback; {len(os.sched_getaffinity(0))} CPUs shared by every "
        f"server, redis-server, SeaweedFS and the load tool: "
        f"{'wrk' if shutil.which('wrk') else 'aiohttp'} (HEAD: ab); gate config extra: "
        f"{args.gate_config or '{}'}"
    )
    return "\n".join(lines)


def ceilings(gate: Subject, storage: Path, mib: int) -> None:
    """What no cold fill can beat on this machine: hashing every byte on one core, and
    writing every byte into the cache's file system (buffered, as the gate writes)."""
    data = os.urandom(MIB)
    hasher = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(256):
        hasher.update(data)
    gate.figures["sha256_mb_s"] = 256 * MIB / (time.perf_counter() - started) / 1e6
    storage.mkdir(parents=True, exist_ok=True)
    probe = storage / "bench-write-probe"
    started = time.perf_counter()
    with probe.open("wb", buffering=0) as out:
        for _ in range(mib):
            out.write(data)
    gate.figures["disk_write_mb_s"] = mib * MIB / (time.perf_counter() - started) / 1e6
    probe.unlink()


def default_workers() -> int:
    """N of gate-wN: the cores this process may use, at least 2 (a comparison)."""
    return max(2, usable_cores())


def workers_skipped(args: argparse.Namespace) -> str | None:
    """Why gate-w1 and gate-wN are not run, or None when they are."""
    if not args.workers_on:
        return "--no-workers"
    if missing := missing_engines():
        return f"not installed: {', '.join(missing)}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, small blobs")
    parser.add_argument("--seconds", type=float, help="length of each load run (5; quick 2)")
    parser.add_argument(
        "--runs", type=int, help="manifest GET runs per subject, median taken (3; quick 1)"
    )
    parser.add_argument("--big-mib", type=int, help="size of the warm big blob (100; quick 16)")
    parser.add_argument("--cold-mib", type=int, help="size of the cold blob (1024; quick 256)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections to run")
    parser.add_argument(
        "--no-uvloop", dest="uvloop", action="store_false", help="skip the gate on uvloop"
    )
    parser.add_argument("--workers", type=int, help="N of gate-wN (the usable cores, at least 2)")
    parser.add_argument(
        "--no-workers", dest="workers_on", action="store_false", help="skip gate-w1 and gate-wN"
    )
    parser.add_argument("--gate-config", default="", help="JSON laid over every gate's config")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: tmp)")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.runs = args.runs or (1 if args.quick else 3)
    args.big_mib = args.big_mib or (16 if args.quick else 100)
    args.cold_mib = args.cold_mib or (256 if args.quick else 1024)
    args.workers = args.workers or default_workers()
    if args.workers < 2:
        parser.error("--workers: at least 2 (gate-w1 is the one-worker side)")
    only = set(args.only.split(","))
    binary = os.environ.get("GATE_TEST_REGISTRY_BINARY", "docker-registry")
    for tool in ("skopeo", "curl", binary):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
    skipped = workers_skipped(args)
    if skipped is not None:
        print(f"bench: skipping gate-w1 and gate-w{args.workers}: {skipped}", file=sys.stderr)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="perf-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = json.loads(args.gate_config) if args.gate_config else {}
    with ExitStack() as stack:
        upstream = DistributionRegistry(workdir / "plain", name="plain")
        stack.callback(upstream.stop)
        upstream.start()
        print(f"seeding {upstream.url} ...", file=sys.stderr)
        layout = Layout(workdir / "layout")
        plan = [
            PushSpec(busybox_image(layout), "library/busybox", "1.36"),
            PushSpec(big_image(layout, args.big_mib), "bench/big", "1"),
        ]
        seeded = push(layout, upstream.host, plan)
        small, big = seeded["library/busybox:1.36"], seeded["bench/big:1"]
        cold_digest = seed_cold_blob(upstream, args.cold_mib) if "cold" in only else ""

        cache_server = PullThroughCache(workdir / "cache", upstream.url)
        stack.callback(cache_server.stop)
        cache_server.start()
        config = {"upstreams": upstreams(upstream.url), **extra}
        gate_server = GateProcess(workdir / "gate", config, name="bench-gate")
        stack.callback(gate_server.stop)
        gate_server.start()

        plain = Subject("plain", upstream.url, "", lambda: upstream.pid)
        cache = Subject("cache", cache_server.url, "", lambda: cache_server.pid)
        gate = Subject("gate", gate_server.url, f"{GATE_REGISTRY}/", lambda: gate_server.pid)
        subjects = [plain, cache, gate]
        ratios = [(gate, cache), (gate, plain)]
        # The subjects that also pull the cold blob, each into its own (cold) cache.
        cold_gates = [gate]
        if args.uvloop:
            uv_server = GateProcess(
                workdir / "gate-uvloop", {**config, "event_loop": "uvloop"}, name="bench-uv"
            )
            stack.callback(uv_server.stop)
            uv_server.start()
            uv = Subject("gate-uvloop", uv_server.url, f"{GATE_REGISTRY}/", lambda: uv_server.pid)
            subjects.append(uv)
            cold_gates.append(uv)
        if skipped is None:
            print("starting redis-server, SeaweedFS and the workers gates ...", file=sys.stderr)
            engines = SharedEngines(workdir / "shared", stack)
            one_server = engines.gate("gate-w1", upstream.url, 1, extra)
            label = f"gate-w{args.workers}"
            many_server = engines.gate(label, upstream.url, args.workers, extra)
            prefix, engine_pids = f"{GATE_REGISTRY}/", engines.pids()
            one = Subject("gate-w1", one_server.url, prefix, lambda: one_server.pid, engine_pids)
            many = Subject(label, many_server.url, prefix, lambda: many_server.pid, engine_pids)
            subjects += [one, many]
            ratios += [(many, cache), (many, one)]
            cold_gates.append(many)
        if only & {"manifest", "blob"}:
            for subject in subjects:
                print(f"measuring {subject.label} (warm) ...", file=sys.stderr)
                warm(subject, small, big, args.seconds, args.runs)
        if "cold" in only:
            for subject in cold_gates:
                print(f"measuring the cold pull through {subject.label} ...", file=sys.stderr)
                cold(plain, subject, cold_digest, args.cold_mib * MIB)
            ceilings(gate, gate_server.directory / "storage", args.cold_mib)
        print(table(subjects, ratios, args))
        figures = {s.label: s.figures for s in subjects}
        print("figures: " + json.dumps(figures, default=str))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
