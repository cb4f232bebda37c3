"""Benchmark: the gate's cache against Distribution's own pull-through cache, side by side.

Run from the repository root: `python3 bench/cache_vs_distribution.py [--big-mib 100]
[--seconds 5] [--clients 20]`. Needs `docker-registry` (Debian's Distribution 2.8) and
`skopeo`; uses `wrk` when installed (else an aiohttp client). Prints a table and asserts
nothing.

One real Distribution registry is the upstream, seeded with a small image
(`library/busybox:1.36`), a big one (`bench/big:1`, one `--big-mib` MiB layer) and a
second big layer (`bench/concurrent:1`) that nothing has pulled yet. In front of it, each
behind its own counting pass-through proxy (tests/support/fault_proxy.py, no fault set),
so every byte either cache fetches from the upstream is counted:

- Distribution in proxy mode (`proxy: remoteurl:`), its storage empty;
- the gate (`upstreams: [{registry: upstream.bench, url: <proxy>}]`), its cache empty.

Figures, per cache: cold `skopeo copy` of `bench/big:1` (wall time, bytes fetched from the
upstream, as a multiple of the image); `--clients` simultaneous cold GETs of the
`bench/concurrent` layer (wall time, upstream GETs and bytes); warm manifest GET by tag
(16 connections, requests/s and p99, upstream requests per client request); warm big-blob
GETs (2 connections, MB/s); the server's peak RSS (VmHWM). Issue 4's targets: manifest by
tag at least 5x Distribution's cache, blob throughput at least equal, cold upstream bytes
1x the image (Distribution moves 2x).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
MANIFEST_ACCEPT = MT_OCI_MANIFEST


class PullThroughCache(DistributionRegistry):
    """Distribution as a pull-through cache of `remote` (docs: `proxy.remoteurl`)."""

    def __init__(self, directory: Path, remote: str) -> None:
        super().__init__(directory, name="distribution-cache")
        self.remote = remote

    def config(self, port: int) -> dict[str, Any]:
        cfg = super().config(port)
        cfg["proxy"] = {"remoteurl": self.remote}
        return cfg


@dataclass
class Subject:
    """One cache under test: where clients reach it and the proxy before its upstream."""

    label: str
    base: str  # http://127.0.0.1:PORT
    prefix: str  # repository prefix clients use ("" or "upstream.bench/")
    proxy: FaultProxy
    pid: Callable[[], int | None]
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.base.removeprefix("http://")

    def path(self, repo: str, kind: str, ref: str) -> str:
        return f"/v2/{self.prefix}{repo}/{kind}/{ref}"


# -- measuring ----------------------------------------------------------------------------


def settle(proxy: FaultProxy, quiet: float = 1.5, limit: float = 60.0) -> None:
    """Wait until the proxy has relayed nothing new for `quiet` seconds (Distribution
    stores a cold blob with a second, background fetch)."""
    deadline = time.monotonic() + limit
    last, since = proxy.body_bytes(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = proxy.body_bytes()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def fetch_digest(base: str, path: str) -> tuple[int, int, str]:
    """GET, streaming into sha256: (status, bytes, digest)."""
    host, _, port = base.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        hasher, size = hashlib.sha256(), 0
        while chunk := response.read(MIB):
            hasher.update(chunk)
            size += len(chunk)
        return response.status, size, "sha256:" + hasher.hexdigest()
    finally:
        conn.close()


def skopeo_copy(subject: Subject, reference: str, dest: Path) -> float:
    conf = dest.parent / "registries.conf"
    conf.write_text("# empty on purpose\n")
    env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}
    started = time.monotonic()
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{subject.host}/{subject.prefix}{reference}",
            f"oci:{dest}:x",
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=600,
    )
    return time.monotonic() - started


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def wrk(url: str, connections: int, seconds: float, headers: dict[str, str]) -> dict[str, float]:
    """requests/s, p99 seconds and bytes/s from one wrk run."""
    cmd = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds:g}s"]
    cmd += ["--latency", "--timeout", "30s"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run([*cmd, url], check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s|m)\b", out)
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB|TB)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p99": float(p99.group(1)) * _UNITS[p99.group(2)] if p99 else float("nan"),
        "bytes_per_s": float(transfer.group(1)) * _BYTES[transfer.group(2)] if transfer else 0.0,
        "errors": float(errors.group(1)) if errors else 0.0,
    }


def aiohttp_load(
    url: str, connections: int, seconds: float, headers: dict[str, str]
) -> dict[str, float]:
    """The wrk figures from an aiohttp client (when wrk is not installed)."""
    import aiohttp

    async def run() -> dict[str, float]:
        latencies: list[float] = []
        received = errors = 0
        deadline = time.monotonic() + seconds
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

            async def worker() -> None:
                nonlocal received, errors
                while time.monotonic() < deadline:
                    started = time.monotonic()
                    async with session.get(url) as response:
                        async for chunk in response.content.iter_chunked(MIB):
                            received += len(chunk)
                        errors += response.status >= 400
                    latencies.append(time.monotonic() - started)

            started = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(connections)))
            elapsed = time.monotonic() - started
        latencies.sort()
        return {
            "rps": len(latencies) / elapsed,
            "p99": latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan"),
            "bytes_per_s": received / elapsed,
            "errors": float(errors),
        }

    return asyncio.run(run())


def load(url: str, connections: int, seconds: float, headers: dict[str, str]) -> dict[str, float]:
    if shutil.which("wrk"):
        return wrk(url, connections, seconds, headers)
    return aiohttp_load(url, connections, seconds, headers)


def peak_rss_mib(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


# -- the scenarios --------------------------------------------------------------------------


def cold_pull(subject: Subject, image: PushedRef, workdir: Path) -> None:
    proxy = subject.proxy
    proxy.reset()
    seconds = skopeo_copy(subject, f"{image.repo}:{image.tag}", workdir / f"cold-{subject.label}")
    settle(proxy)
    image_bytes = len(image.raw) + sum(b.size for b in image.manifest.blobs)
    subject.figures.update(
        cold_seconds=seconds,
        cold_upstream_mib=proxy.body_bytes() / MIB,
        cold_upstream_x=proxy.body_bytes() / image_bytes,
        cold_blob_gets=proxy.count("GET", "blob"),
    )


def concurrent_misses(subject: Subject, image: PushedRef, clients: int) -> None:
    layer = image.manifest.layers[0]
    path = subject.path(image.repo, "blobs", layer.digest)
    proxy = subject.proxy
    proxy.reset()
    barrier = threading.Barrier(clients)

    def one(_: int) -> tuple[int, int, str]:
        barrier.wait()
        return fetch_digest(subject.base, path)

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    seconds = time.monotonic() - started
    settle(proxy)
    good = sum(1 for r in results if r == (200, layer.size, layer.digest))
    subject.figures.update(
        concurrent_seconds=seconds,
        concurrent_ok=good,
        concurrent_gets=proxy.count("GET", "blob", layer.digest),
        concurrent_upstream_x=proxy.body_bytes("blob") / layer.size,
    )


def warm_manifest(subject: Subject, image: PushedRef, seconds: float) -> None:
    path = subject.path(image.repo, "manifests", image.tag)
    headers = {"Accept": MANIFEST_ACCEPT}
    url = subject.base + path
    load(url, 16, 1.0, headers)  # warm-up: the cache fills, connections open
    subject.proxy.reset()
    result = load(url, 16, seconds, headers)
    requests = result["rps"] * seconds
    subject.figures.update(
        tag_rps=result["rps"],
        tag_p99_ms=result["p99"] * 1000,
        tag_errors=result["errors"],
        tag_upstream_per_request=subject.proxy.count() / requests if requests else float("nan"),
    )


def warm_blob(subject: Subject, image: PushedRef, seconds: float) -> None:
    layer = image.manifest.layers[0]
    url = subject.base + subject.path(image.repo, "blobs", layer.digest)
    subject.proxy.reset()
    result = load(url, 2, seconds, {})
    subject.figures.update(
        blob_mb_s=result["bytes_per_s"] / 1e6,
        blob_errors=result["errors"],
        blob_upstream_gets=subject.proxy.count("GET", "blob"),
    )


# -- output -----------------------------------------------------------------------------------

ROWS = [
    ("cold pull (skopeo copy), s", "cold_seconds", "{:.2f}"),
    ("cold pull: bytes from upstream, MiB", "cold_upstream_mib", "{:.1f}"),
    ("cold pull: upstream bytes / image size", "cold_upstream_x", "{:.2f}x"),
    ("cold pull: upstream blob GETs", "cold_blob_gets", "{:.0f}"),
    ("{clients} concurrent cold GETs of one blob, s", "concurrent_seconds", "{:.2f}"),
    ("  ... clients with correct bytes", "concurrent_ok", "{:.0f}"),
    ("  ... upstream GETs", "concurrent_gets", "{:.0f}"),
    ("  ... upstream bytes / blob size", "concurrent_upstream_x", "{:.2f}x"),
    ("warm manifest by tag, req/s (16 conns)", "tag_rps", "{:.0f}"),
    ("warm manifest by tag, p99 ms", "tag_p99_ms", "{:.2f}"),
    ("  ... upstream requests per request", "tag_upstream_per_request", "{:.2f}"),
    ("  ... non-2xx responses", "tag_errors", "{:.0f}"),
    ("warm blob GET, MB/s (2 conns)", "blob_mb_s", "{:.0f}"),
    ("  ... upstream blob GETs", "blob_upstream_gets", "{:.0f}"),
    ("peak RSS, MiB", "peak_rss_mib", "{:.0f}"),
]


def table(peer: Subject, gate: Subject, clients: int, big_mib: int) -> str:
    width = 46
    head = f"{'':{width}} {'Distribution':>14} {'registry-gate':>14} {'gate/peer':>10}"
    lines = [head, "-" * len(head)]
    for label, key, fmt in ROWS:
        a, b = peer.figures.get(key, float("nan")), gate.figures.get(key, float("nan"))
        ratio = f"{b / a:.2f}" if a and not math.isnan(a) and not math.isnan(b) else "-"
        name = label.format(clients=clients)
        lines.append(f"{name:{width}} {fmt.format(a):>14} {fmt.format(b):>14} {ratio:>10}")
    lines.append("")
    lines.append(
        "single run: compare ratios, not absolute figures across machines or days; "
        f"image: 1 layer of {big_mib} MiB; loopback; {os.cpu_count()} CPUs; load tool: "
        f"{'wrk' if shutil.which('wrk') else 'aiohttp'}; Distribution "
        f"{Path(os.environ.get('GATE_TEST_REGISTRY_BINARY', '/usr/bin/docker-registry'))}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=100, help="size of the big layer")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load run")
    parser.add_argument("--clients", type=int, default=20, help="simultaneous cold clients")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: tmp)")
    args = parser.parse_args()
    for tool in ("skopeo", os.environ.get("GATE_TEST_REGISTRY_BINARY", "docker-registry")):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cache-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        upstream = DistributionRegistry(workdir / "upstream", name="upstream")
        stack.callback(upstream.stop)
        upstream.start()
        print(f"seeding {upstream.url} ...", file=sys.stderr)
        layout = Layout(workdir / "layout")
        concurrent_mib = max(1, args.big_mib // 2)
        plan = [
            PushSpec(busybox_image(layout), "library/busybox", "1.36"),
            PushSpec(big_image(layout, args.big_mib), "bench/big", "1"),
            PushSpec(big_image(layout, concurrent_mib), "bench/concurrent", "1"),
        ]
        seeded = push(layout, upstream.host, plan)
        small, big, fresh = (seeded[f"{s.repo}:{s.tag}"] for s in plan)

        loops = LoopThread("bench-proxies")
        stack.callback(loops.close)
        peer_proxy = FaultProxy(upstream.url, name="peer-upstream", loop=loops).start()
        stack.callback(peer_proxy.stop)
        gate_proxy = FaultProxy(upstream.url, name="gate-upstream", loop=loops).start()
        stack.callback(gate_proxy.stop)

        peer_cache = PullThroughCache(workdir / "distribution-cache", peer_proxy.url)
        stack.callback(peer_cache.stop)
        peer_cache.start()
        gate = GateProcess(
            workdir / "gate",
            {"upstreams": [{"registry": GATE_REGISTRY, "url": gate_proxy.url}]},
            name="bench-gate",
        )
        stack.callback(gate.stop)
        gate.start()

        peer = Subject("distribution", peer_cache.url, "", peer_proxy, lambda: peer_cache.pid)
        ours = Subject("gate", gate.url, f"{GATE_REGISTRY}/", gate_proxy, lambda: gate.pid)
        for subject in (peer, ours):
            print(f"measuring {subject.label} ...", file=sys.stderr)
            cold_pull(subject, big, workdir)
            concurrent_misses(subject, fresh, args.clients)
            warm_manifest(subject, small, args.seconds)
            warm_blob(subject, big, args.seconds)
            subject.figures["peak_rss_mib"] = peak_rss_mib(subject.pid())
        print(table(peer, ours, args.clients, args.big_mib))
        tag_ratio = ours.figures["tag_rps"] / peer.figures["tag_rps"]
        blob_ratio = ours.figures["blob_mb_s"] / peer.figures["blob_mb_s"]
        print(
            f"targets (issue 4): manifest by tag >= 5x: {tag_ratio:.1f}x; "
            f"blob throughput >= 1x: {blob_ratio:.2f}x; cold upstream bytes 1x: "
            f"{ours.figures['cold_upstream_x']:.2f}x (Distribution "
            f"{peer.figures['cold_upstream_x']:.2f}x)"
        )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
