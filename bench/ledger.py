"""Benchmark: the blob cache's accounting, in one process and shared through Redis.

Run from the repository root: `python3 bench/ledger.py [--seconds 3] [--blobs 2000]`.
Starts its own redis-server on loopback (Debian's `redis-server`). Prints a table and
asserts nothing.

Per ledger (MemoryLedger; RedisLedger with one replica; RedisLedger with three replica
objects, each on its own connection, sharing one key prefix), with the cache full so
every fill evicts:

- fill cycles/s: reserve (evicting), release the victims' drain, publish; 16 concurrent
  fillers spread over the replicas;
- hit lookups/s: `size_of` + `touched`, what a cache hit costs the ledger (16 concurrent);
- touch cost: `touched` alone (µs per call; the Redis ledger applies them in batches).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from proxy.storage.ledger import BlobLedger, MemoryLedger  # noqa: E402
from proxy.storage.redis_ledger import RedisLedger  # noqa: E402
from tests.support.engines import RedisServer  # noqa: E402

BLOB = 1000


async def rate(seconds: float, workers: int, step: Callable[[int], Awaitable[None]]) -> float:
    """Operations per second of `workers` concurrent loops of `step` for `seconds`."""
    done = 0
    deadline = time.monotonic() + seconds
    counter = itertools.count()

    async def loop(worker: int) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await step(next(counter))
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(loop(w) for w in range(workers)))
    return done / (time.monotonic() - started)


async def measure(name: str, ledgers: list[BlobLedger], args: argparse.Namespace) -> None:
    cap = args.blobs * BLOB
    await ledgers[0].seed((f"seed-{i}", BLOB, float(i)) for i in range(args.blobs))

    async def fill(n: int) -> None:
        ledger = ledgers[n % len(ledgers)]
        reservation, eviction = await ledger.reserve(BLOB, max_size=cap)
        await ledger.release(eviction.draining)
        await ledger.published(f"{name}-{n}", BLOB, reservation)

    fills = await rate(args.seconds, 16, fill)
    held = [digest for digest, _ in await ledgers[0].entries()]

    async def hit(n: int) -> None:
        ledger = ledgers[n % len(ledgers)]
        digest = held[n % len(held)]
        if await ledger.size_of(digest) is not None:
            ledger.touched(digest)

    hits = await rate(args.seconds, 16, hit)
    started = time.perf_counter()
    for n in range(100_000):
        ledgers[0].touched(held[n % len(held)])
    touch_us = (time.perf_counter() - started) / 100_000 * 1e6
    usage = await ledgers[0].usage()
    print(
        f"{name:<22} {fills:>12,.0f} {hits:>14,.0f} {touch_us:>10.2f}"
        f"   used {usage.used:,} of {cap:,}"
    )


async def main(args: argparse.Namespace) -> None:
    print(f"{'ledger':<22} {'fill cycles/s':>12} {'hit lookups/s':>14} {'touch µs':>10}")
    await measure("memory", [MemoryLedger()], args)
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder)).start()
        clients: list[Redis] = []
        try:
            for replicas in (1, 3):
                prefix = f"bench-{uuid.uuid4().hex}:"
                ledgers: list[BlobLedger] = []
                for _ in range(replicas):
                    client = Redis.from_url(server.redis_url)
                    clients.append(client)
                    ledgers.append(RedisLedger(client, key_prefix=prefix))
                await measure(f"redis, {replicas} replica(s)", ledgers, args)
                for ledger in ledgers:
                    await ledger.close()
        finally:
            for client in clients:
                await client.aclose()
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--blobs", type=int, default=2000, help="blobs the full cache holds")
    asyncio.run(main(parser.parse_args()))
