#!/usr/bin/env python3
"""Streaming throughput and peak memory of the S3 blob store (aiobotocore) against a
real SeaweedFS on loopback, beside the filesystem store for reference.

For each store: fills an N MiB blob (1 MiB writes, as the fill coordinator makes them:
hashed, spooled, sent as 8 MiB parts, completed once verified), then reads it back
sequentially through `open_reader` (1 MiB `read_at`s, one streaming GET). Prints MiB/s
and this process's peak resident memory during each phase (VmHWM, reset between
phases), next to its resident memory before. Asserts nothing (figures scatter with the
machine's load).

    python3 bench/s3_store.py [--mib 200]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.storage.blobstore import FilesystemBlobStore  # noqa: E402
from proxy.storage.s3 import S3BlobStore  # noqa: E402
from proxy.storage.s3_client import open_bucket  # noqa: E402
from tests.contract.backends import ensure_bucket, s3_environment, s3_settings  # noqa: E402
from tests.support.engines import SeaweedS3  # noqa: E402

CHUNK = 1 << 20


BLOCK = os.urandom(CHUNK)


def chunks(mib: int) -> Iterator[bytes]:
    """`mib` distinct 1 MiB chunks, the same every time, made as needed (never all in
    memory at once)."""
    for n in range(mib):
        yield n.to_bytes(8, "big") + BLOCK[8:]


def digest_of(mib: int) -> str:
    hasher = hashlib.sha256()
    for chunk in chunks(mib):
        hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024  # MiB
    return -1


def reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")


async def phase(name: str, work: Callable[[], Awaitable[int]]) -> tuple[str, float, int, int]:
    before = _status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    moved = await work()
    seconds = time.perf_counter() - start
    return name, moved / CHUNK / seconds, before, _status("VmHWM")


async def measure(store: Any, mib: int, digest: str) -> list[tuple[str, float, int, int]]:
    async def fill() -> int:
        writer = await store.begin_fill(digest, mib * CHUNK)
        for chunk in chunks(mib):
            await writer.write(chunk)
        await writer.commit(mib * CHUNK)
        return mib * CHUNK

    async def read() -> int:
        reader = await store.open_reader(digest)
        hasher, offset = hashlib.sha256(), 0
        while data := await reader.read_at(offset, CHUNK):
            hasher.update(data)
            offset += len(data)
        await reader.aclose()
        assert "sha256:" + hasher.hexdigest() == digest
        return offset

    return [await phase("fill", fill), await phase("read", read)]


async def run(mib: int, seaweed: SeaweedS3, work: Path) -> None:
    digest = digest_of(mib)
    os.environ.update(s3_environment())
    rows: list[tuple[str, tuple[str, float, int, int]]] = []

    fs = FilesystemBlobStore(work / "fs", 4 * mib * CHUNK)
    await fs.open()
    rows += [("filesystem", row) for row in await measure(fs, mib, digest)]
    await fs.close()

    async with open_bucket(s3_settings(seaweed.endpoint, "bench"), check=False) as bucket:
        await ensure_bucket(bucket)
        store = S3BlobStore(bucket, work / "spool", 4 * mib * CHUNK)
        await store.open()
        await store.delete(digest)
        rows += [("s3 (aiobotocore)", row) for row in await measure(store, mib, digest)]
        await store.delete(digest)
        await store.close()

    print(f"\n{mib} MiB blob, 1 MiB writes/reads, SeaweedFS on loopback")
    print(f"{'store':<18} {'phase':<6} {'MiB/s':>8} {'RSS before':>11} {'peak RSS':>9}")
    for store_name, (name, rate, before, peak) in rows:
        print(f"{store_name:<18} {name:<6} {rate:>8.0f} {before:>8} MiB {peak:>5} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        work = Path(tmp)
        seaweed = SeaweedS3(work / "seaweed").start()
        try:
            asyncio.run(run(args.mib, seaweed, work))
        finally:
            seaweed.stop()


if __name__ == "__main__":
    main()
