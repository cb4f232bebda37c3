#!/usr/bin/env python3
"""Memory and throughput of the gate with one large blob, pushed and pulled through it.

Starts a real Distribution registry and a gate in front of it (both on loopback), then:
pushes an N MiB blob through the gate in one streamed PATCH, pulls it cold (upstream ->
cache -> client) and warm (sendfile), and pulls it straight from Distribution for
comparison, while sampling the gate's resident memory every 0.1 s. Prints a table; no
assertions (figures scatter with the machine's load).

    python3 bench/large_blob_memory.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.gate import GateProcess  # noqa: E402
from tests.support.registries import DistributionRegistry  # noqa: E402

CHUNK = 1 << 20


class RssSampler:
    """Samples a process's resident memory (VmRSS) in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while not self._stop.is_set():
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append(int(line.split()[1]) * 1024)
            time.sleep(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.samples)


def blob_chunks(mib: int, digest: hashlib._Hash) -> Iterator[bytes]:
    seed = os.urandom(CHUNK)
    for index in range(mib):
        chunk = seed[:-8] + index.to_bytes(8, "big")
        digest.update(chunk)
        yield chunk


def push(host: str, port: int, repo: str, mib: int) -> tuple[str, float]:
    connection = http.client.HTTPConnection(host, port, timeout=600)
    connection.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
    reply = connection.getresponse()
    reply.read()
    location = reply.getheader("Location") or ""
    hasher = hashlib.sha256()
    started = time.monotonic()
    connection.putrequest("PATCH", location)
    connection.putheader("Content-Type", "application/octet-stream")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    for chunk in blob_chunks(mib, hasher):
        connection.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    connection.send(b"0\r\n\r\n")
    reply = connection.getresponse()
    reply.read()
    location = reply.getheader("Location") or ""
    digest = "sha256:" + hasher.hexdigest()
    separator = "&" if "?" in location else "?"
    connection.request(
        "PUT", f"{location}{separator}digest={digest}", headers={"Content-Length": "0"}
    )
    reply = connection.getresponse()
    reply.read()
    if reply.status != 201:
        raise SystemExit(f"push failed: {reply.status}")
    return digest, time.monotonic() - started


def pull(host: str, port: int, path: str) -> tuple[int, float]:
    connection = http.client.HTTPConnection(host, port, timeout=600)
    started = time.monotonic()
    connection.request("GET", path)
    reply = connection.getresponse()
    received = 0
    while chunk := reply.read(CHUNK):
        received += len(chunk)
    return received, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="blob size in MiB")
    args = parser.parse_args()
    size = args.mib * CHUNK
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        registry = DistributionRegistry(Path(tmp) / "registry")
        registry.start()
        stack.callback(registry.stop)
        policy = {"search": ["docker.io"], "default": "allow", "rules": []}
        config = {
            "upstreams": [{"registry": "docker.io", "url": registry.url}],
            "push_registry": "docker.io",
        }
        gate = GateProcess(Path(tmp) / "gate", config, policy=policy).start()
        stack.callback(gate.stop)
        assert gate.pid is not None
        sampler = RssSampler(gate.pid)
        time.sleep(0.3)
        idle = min(sampler.samples)
        digest, push_seconds = push("127.0.0.1", gate.port, "bench/huge", args.mib)
        after_push = max(sampler.samples)
        path = f"/v2/bench/huge/blobs/{digest}"
        cold, cold_seconds = pull("127.0.0.1", gate.port, path)
        warm, warm_seconds = pull("127.0.0.1", gate.port, path)
        peak = sampler.stop()
        direct, direct_seconds = pull("127.0.0.1", registry.port, path)
        assert cold == warm == direct == size, (cold, warm, direct, size)

    mb = 1e6
    print(f"{args.mib} MiB blob through registry-gate (RSS sampled every 0.1 s)")
    print(f"{'figure':44} {'value':>12}")
    print(f"{'gate RSS idle, MB':44} {idle / mb:12.1f}")
    print(f"{'gate RSS peak during push, MB':44} {after_push / mb:12.1f}")
    print(f"{'gate RSS peak overall, MB':44} {peak / mb:12.1f}")
    print(f"{'push (one streamed PATCH), MB/s':44} {size / push_seconds / mb:12.0f}")
    print(f"{'pull cold through the gate, MB/s':44} {size / cold_seconds / mb:12.0f}")
    print(f"{'pull warm through the gate (sendfile), MB/s':44} {size / warm_seconds / mb:12.0f}")
    print(f"{'pull straight from Distribution, MB/s':44} {size / direct_seconds / mb:12.0f}")


if __name__ == "__main__":
    main()
