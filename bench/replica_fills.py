"""Benchmark: cold blob fills through several replicas, with and without fill leases.

Run from the repository root: `python3 bench/replica_fills.py [--mib 256] [--clients 12]
[--replicas 3]`. Needs `docker-registry` (Debian's Distribution 2.8) and `redis-server`.
Prints a table and asserts nothing.

One real Distribution registry is the upstream, behind a counting pass-through
(tests/support/fault_proxy.py, no fault set). For each scenario a fresh random blob of
`--mib` MiB is pushed, and `--clients` simultaneous cold GETs are spread round-robin over
the gates:

- `1 gate`: one gate, no Redis (single flight in one process);
- `N gates, no redis`: N gates, each its own cache, no Redis (each fetches on its own);
- `N gates, redis`: the same N gates' configuration plus a shared redis-server (one
  fetch in all; the others stream from the replica holding the fill lease).

Figures: wall time until every client had the whole blob, MiB/s delivered to clients,
upstream GETs and MiB fetched from the upstream, and the median and worst time to first
byte and to last byte of the clients.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.integration.test_cache import push_blob  # noqa: E402
from tests.support.engines import RedisServer  # noqa: E402
from tests.support.fault_proxy import FaultProxy  # noqa: E402
from tests.support.gate import GateProcess  # noqa: E402
from tests.support.registries import DistributionRegistry  # noqa: E402
from tests.support.registry_client import RegistryClient  # noqa: E402

MIB = 1024 * 1024
REGISTRY = "origin.bench"
SECRET = "bench-shared-secret-0123456789abcdef"


@dataclass
class Timed:
    first_byte: float
    last_byte: float
    received: int
    digest: str


def timed_get(host: str, port: int, path: str, started: float) -> Timed:
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        hasher, received, first = hashlib.sha256(), 0, None
        while chunk := response.read(MIB):
            if first is None:
                first = time.monotonic() - started
            hasher.update(chunk)
            received += len(chunk)
        return Timed(
            first or 0.0, time.monotonic() - started, received, "sha256:" + hasher.hexdigest()
        )
    finally:
        conn.close()


def run(
    gates: list[GateProcess], proxy: FaultProxy, client: RegistryClient, mib: int, clients: int
) -> dict[str, Any]:
    data = os.urandom(mib * MIB)
    repo = f"bench/{os.urandom(4).hex()}"
    digest = push_blob(client, repo, data)
    proxy.reset()
    barrier = threading.Barrier(clients)

    def one(index: int) -> Timed:
        gate = gates[index % len(gates)]
        host, port = gate.host.split(":")
        barrier.wait()
        path = f"/v2/{REGISTRY}/{repo}/blobs/{digest}"
        return timed_get(host, int(port), path, time.monotonic())

    wall_start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    wall = time.monotonic() - wall_start
    bad = [r for r in results if r.digest != digest or r.received != len(data)]
    firsts = [r.first_byte for r in results]
    lasts = [r.last_byte for r in results]
    return {
        "wall": wall,
        "mibs": clients * mib / wall,
        "gets": proxy.count("GET", "blob", digest),
        "upstream_mib": proxy.body_bytes("blob") / MIB,
        "ttfb": (statistics.median(firsts), max(firsts)),
        "ttlb": (statistics.median(lasts), max(lasts)),
        "bad": len(bad),
    }


def gate_config(proxy: FaultProxy, redis_url: str | None, name: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstreams": [{"registry": REGISTRY, "url": proxy.url}],
        "log_level": "warning",
    }
    if redis_url is not None:
        config.update(redis={"url": redis_url}, replica={"id": name}, upload_secret=SECRET)
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of each cold blob")
    parser.add_argument("--clients", type=int, default=12, help="simultaneous cold clients")
    parser.add_argument("--replicas", type=int, default=3, help="gates in the replica runs")
    args = parser.parse_args()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="replica-bench-")))
        origin = stack.enter_context(DistributionRegistry(work / "origin", name="origin"))
        proxy = stack.enter_context(FaultProxy(origin.url, name="bench-proxy"))
        redis = RedisServer(work / "redis").start()
        stack.callback(redis.stop)
        client = RegistryClient(origin.host)

        def gates(count: int, redis_url: str | None, label: str) -> list[GateProcess]:
            made = []
            for i in range(count):
                name = f"{label}-{i}"
                gate = GateProcess(work / name, gate_config(proxy, redis_url, name), name=name)
                stack.callback(gate.stop)
                made.append(gate.start())
            return made

        scenarios = [
            ("1 gate", gates(1, None, "single")),
            (f"{args.replicas} gates, no redis", gates(args.replicas, None, "apart")),
            (f"{args.replicas} gates, redis", gates(args.replicas, redis.redis_url, "shared")),
        ]
        print(
            f"\n{args.clients} simultaneous cold GETs of a {args.mib} MiB blob, "
            "spread round-robin over the gates\n"
        )
        header = (
            f"{'scenario':<22} {'wall s':>7} {'MiB/s':>7} {'up GETs':>7} {'up MiB':>8} "
            f"{'TTFB med/max s':>15} {'TTLB med/max s':>15} {'bad':>4}"
        )
        print(header)
        print("-" * len(header))
        for label, group in scenarios:
            r = run(group, proxy, client, args.mib, args.clients)
            print(
                f"{label:<22} {r['wall']:>7.2f} {r['mibs']:>7.0f} {r['gets']:>7} "
                f"{r['upstream_mib']:>8.0f} {r['ttfb'][0]:>7.2f}/{r['ttfb'][1]:<7.2f} "
                f"{r['ttlb'][0]:>7.2f}/{r['ttlb'][1]:<7.2f} {r['bad']:>4}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
