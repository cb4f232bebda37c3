"""Benchmark: the gate against plain Distribution and Distribution's pull-through cache.

Run from the repository root: `python3 bench/perf.py [--quick] [--seconds 5]
[--cold-mib 1024] [--big-mib 100] [--only manifest,blob,cold] [--gate-config JSON]`.
Needs `docker-registry` (Debian's Distribution 2.8), `skopeo` and `curl`; uses `wrk`
when installed (else an aiohttp client, much slower: then compare nothing but ratios) and
ApacheBench `ab` for HEAD (wrk cannot send HEAD; without ab that row stays empty).
Prints a table and asserts nothing (issue 13).

In one invocation, over the same content:

- **plain**: one real Distribution registry serving from its own disk. It is also the
  upstream of the two others, seeded with `library/busybox:1.36` (a manifest and a
  331 B-class config blob) and `bench/big:1` (one `--big-mib` MiB layer); a
  `--cold-mib` MiB blob is written into its storage (`bench/cold`) for the cold pull.
- **cache**: Distribution in proxy mode (`proxy.remoteurl`) in front of plain.
- **gate**: registry-gate, one process, in front of plain (`upstream.bench`), its
  default settings (audit on, metrics on) plus `--gate-config`;
- **gate-uvloop**: the same on `event_loop: uvloop`, its own cache (`--no-uvloop` skips it).

Figures, per subject (warm ones after one warm-up run that fills the caches): manifest by
tag GET and HEAD at 16 connections (req/s), the config blob GET at 16 connections (req/s),
the big blob GET at 2 connections (MB/s), the server's own CPU per request (manifest
GETs; user+system from /proc, so the cache's upstream work is not charged to it) and its
RSS after the run and at its peak. Then the cold pull: `curl` fetches the cold blob
straight from plain (which warms plain's page cache, so both reads come from memory),
then through the gate, whose cache has never seen it (MB/s each). Ratios printed:
gate/cache, gate/plain and, for the cold pull, gate/upstream.

Ceilings measured in the same run: sha256 on one core, and buffered writes into the gate's
storage file system (a cold fill hashes and writes every byte).

`--quick` (about a minute): 2 s load runs, a 16 MiB big blob, a 256 MiB cold blob.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
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

from bench.cache_vs_distribution import PullThroughCache, load, peak_rss_mib  # noqa: E402
from bench.load import resources  # noqa: E402
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
GATE_REGISTRY = "upstream.bench"
COLD_REPO = "bench/cold"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SECTIONS = ("manifest", "blob", "cold")
MANIFEST_ACCEPT = MT_OCI_MANIFEST


@dataclass
class Subject:
    """One server under test: where clients reach it and its repository prefix."""

    label: str
    base: str
    prefix: str
    pid: Callable[[], int | None]
    figures: dict[str, float] = field(default_factory=dict)

    def url(self, repo: str, kind: str, ref: str) -> str:
        return f"{self.base}/v2/{self.prefix}{repo}/{kind}/{ref}"


# -- the server's own resources ---------------------------------------------------------------


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


def warm(subject: Subject, small: PushedRef, big: PushedRef, seconds: float) -> None:
    """The warm figures: manifest GET/HEAD, config blob, big blob; CPU and RSS."""
    headers = {"Accept": MANIFEST_ACCEPT}
    manifest = subject.url(small.repo, "manifests", small.tag)
    config = subject.url(small.repo, "blobs", small.manifest.blobs[0].digest)
    layer = subject.url(big.repo, "blobs", big.manifest.layers[0].digest)
    # Warm-up: each URL once through the load tool (fills the caches, opens connections).
    for url, conns in ((manifest, 16), (config, 16), (layer, 2)):
        load(url, conns, min(1.0, seconds), headers if url == manifest else {})
    pid = subject.pid()
    cpu_before = cpu_seconds(pid)
    got = load(manifest, 16, seconds, headers)
    cpu = cpu_seconds(pid) - cpu_before
    subject.figures.update(
        manifest_rps=got["rps"],
        manifest_errors=got["errors"],
        cpu_us_per_request=cpu / (got["rps"] * seconds) * 1e6 if got["rps"] else math.nan,
        head_rps=head_load(manifest, 16, seconds, headers),
        config_rps=load(config, 16, seconds, {})["rps"],
        blob_mb_s=load(layer, 2, seconds, {})["bytes_per_s"] / 1e6,
        rss_mib=resources(pid).rss_mib,
        peak_rss_mib=peak_rss_mib(pid),
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
    """The cold pull: straight from plain (warming its page cache), then through the gate."""
    speed, got, status = curl_mb_s(plain.url(COLD_REPO, "blobs", digest))
    plain.figures.update(cold_mb_s=speed if (status, got) == (200, size) else math.nan)
    cpu_before = cpu_seconds(gate.pid())
    started = time.monotonic()
    speed, got, status = curl_mb_s(gate.url(COLD_REPO, "blobs", digest))
    gate.figures.update(
        cold_mb_s=speed if (status, got) == (200, size) else math.nan,
        cold_cpu_s_per_gib=(cpu_seconds(gate.pid()) - cpu_before) / (size / 1024**3),
        cold_wall_s=time.monotonic() - started,
        cold_peak_rss_mib=peak_rss_mib(gate.pid()),
    )
    if (status, got) != (200, size):
        print(
            f"cold pull through the gate: status {status}, {got} of {size} bytes", file=sys.stderr
        )


# -- output -----------------------------------------------------------------------------------

ROWS = [
    ("warm manifest by tag GET, req/s (16 conns)", "manifest_rps", "{:.0f}"),
    ("  ... non-2xx responses", "manifest_errors", "{:.0f}"),
    ("warm manifest by tag HEAD, req/s (16 conns)", "head_rps", "{:.0f}"),
    ("warm config blob GET, req/s (16 conns)", "config_rps", "{:.0f}"),
    ("warm big blob GET, MB/s (2 conns)", "blob_mb_s", "{:.0f}"),
    ("CPU per manifest GET, us", "cpu_us_per_request", "{:.0f}"),
    ("RSS after the warm runs / peak, MiB", ("rss_mib", "peak_rss_mib"), "{:.0f}"),
    ("cold blob pull, MB/s (gate: cold cache; plain: upstream)", "cold_mb_s", "{:.0f}"),
    ("  ... gate CPU seconds per GiB", "cold_cpu_s_per_gib", "{:.2f}"),
    ("  ... gate peak RSS, MiB", "cold_peak_rss_mib", "{:.0f}"),
]


def _cell(subject: Subject, key: str | tuple[str, ...], fmt: str) -> str:
    keys = key if isinstance(key, tuple) else (key,)
    values = [subject.figures.get(k, math.nan) for k in keys]
    if all(math.isnan(v) for v in values):
        return "-"
    return " / ".join(fmt.format(v) for v in values)


def _ratio(a: Subject, b: Subject, key: str | tuple[str, ...]) -> str:
    if isinstance(key, tuple):
        return "-"
    x, y = a.figures.get(key, math.nan), b.figures.get(key, math.nan)
    return "-" if math.isnan(x) or math.isnan(y) or not y else f"{x / y:.2f}x"


def table(
    plain: Subject, cache: Subject, gate: Subject, extra: list[Subject], args: argparse.Namespace
) -> str:
    width = 58
    columns = [plain, cache, gate, *extra]
    head = f"{'':{width}}" + "".join(f" {s.label:>12}" for s in columns)
    head += f" {'gate/cache':>11} {'gate/plain':>11}"
    lines = [head, "-" * len(head)]
    for label, key, fmt in ROWS:
        cells = "".join(f" {_cell(s, key, fmt):>12}" for s in columns)
        ratios = f" {_ratio(gate, cache, key):>11} {_ratio(gate, plain, key):>11}"
        lines.append(f"{label:{width}}{cells}{ratios}")
    lines.append("")
    lines.append(
        "ceilings, same run: sha256 on one core "
        f"{gate.figures.get('sha256_mb_s', math.nan):.0f} MB/s; buffered writes of the cold "
        f"blob's size into the gate's storage file system "
        f"{gate.figures.get('disk_write_mb_s', math.nan):.0f} MB/s"
    )
    lines.append(
        f"single run, {time.strftime('%Y-%m-%d %H:%M %Z')}: compare ratios, not figures across "
        f"days; {args.seconds:g} s per load run; big blob {args.big_mib} MiB; cold blob "
        f"{args.cold_mib} MiB; loopback; {os.cpu_count()} CPUs; load tool: "
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, small blobs")
    parser.add_argument("--seconds", type=float, help="length of each load run (5; quick 2)")
    parser.add_argument("--big-mib", type=int, help="size of the warm big blob (100; quick 16)")
    parser.add_argument("--cold-mib", type=int, help="size of the cold blob (1024; quick 256)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections to run")
    parser.add_argument(
        "--no-uvloop", dest="uvloop", action="store_false", help="skip the gate on uvloop"
    )
    parser.add_argument("--gate-config", default="", help="JSON laid over the gate's config")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: tmp)")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.big_mib = args.big_mib or (16 if args.quick else 100)
    args.cold_mib = args.cold_mib or (256 if args.quick else 1024)
    only = set(args.only.split(","))
    binary = os.environ.get("GATE_TEST_REGISTRY_BINARY", "docker-registry")
    for tool in ("skopeo", "curl", binary):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
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
        config = {"upstreams": [{"registry": GATE_REGISTRY, "url": upstream.url}], **extra}
        gate_server = GateProcess(workdir / "gate", config, name="bench-gate")
        stack.callback(gate_server.stop)
        gate_server.start()

        plain = Subject("plain", upstream.url, "", lambda: upstream.pid)
        cache = Subject("cache", cache_server.url, "", lambda: cache_server.pid)
        gate = Subject("gate", gate_server.url, f"{GATE_REGISTRY}/", lambda: gate_server.pid)
        extra_subjects: list[Subject] = []
        if args.uvloop:
            uv_server = GateProcess(
                workdir / "gate-uvloop", {**config, "event_loop": "uvloop"}, name="bench-uv"
            )
            stack.callback(uv_server.stop)
            uv_server.start()
            uv = Subject("gate-uvloop", uv_server.url, f"{GATE_REGISTRY}/", lambda: uv_server.pid)
            extra_subjects.append(uv)
        if only & {"manifest", "blob"}:
            for subject in (plain, cache, gate, *extra_subjects):
                print(f"measuring {subject.label} (warm) ...", file=sys.stderr)
                warm(subject, small, big, args.seconds)
        if "cold" in only:
            print("measuring the cold pull ...", file=sys.stderr)
            cold(plain, gate, cold_digest, args.cold_mib * MIB)
            ceilings(gate, gate_server.directory / "storage", args.cold_mib)
            if extra_subjects:
                # Its own (cold) cache: the same blob, on the other loop.
                cold(plain, extra_subjects[0], cold_digest, args.cold_mib * MIB)
        print(table(plain, cache, gate, extra_subjects, args))
        figures = {s.label: s.figures for s in (plain, cache, gate, *extra_subjects)}
        print("figures: " + json.dumps(figures, default=str))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
