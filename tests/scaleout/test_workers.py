"""`serve --workers 2`: one gate process tree on one port, on real SeaweedFS and Redis,
in front of a real Distribution registry reached through a counting `FaultProxy`.

What is proved (issue 13, "use every core"): the two workers share the one public port
(SO_REUSEPORT) and serve pulls; 20 concurrent cold GETs of one blob through that port
make one upstream GET (the workers are replicas: fill leases in Redis, peer streams to
the worker that holds the lease, on its own port); `/metrics` from either worker counts
the requests of both; SIGHUP reloads the policy in every worker; a worker killed with
SIGKILL is restarted and the gate keeps serving; every request is audited once, in the
chain of the worker that served it, and `audit verify` passes for every chain; SIGTERM
stops every worker and the supervisor exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import workers
from tests.integration.test_cache import (
    MIB,
    ORIGIN,
    Fetched,
    blob_path,
    fetch,
    get,
    manifest_path,
    push_blob,
    push_image,
    unique_repo,
    upstream_table,
    wait_for,
)
from tests.support.cli import run_cli
from tests.support.engines import RedisServer, SeaweedS3
from tests.support.fault_proxy import FaultProxy
from tests.support.metrics import scrape, wait_for_value
from tests.support.registries import DistributionRegistry
from tests.support.registry_client import RegistryClient
from tests.support.replicas import ReplicaSet, ensure_bucket

pytestmark = pytest.mark.slow

WORKERS = 2
REQUESTS = "registry_gate_requests_total"
RELOADS = "registry_gate_policy_reloads_total"


def policy(default: str) -> dict[str, Any]:
    return {"search": [ORIGIN], "default": default, "rules": []}


@pytest.fixture
def gate(
    tmp_path: Path, proxy: FaultProxy, redis_server: RedisServer, seaweed_s3: SeaweedS3
) -> Iterator[ReplicaSet]:
    """One gate started with `--workers 2` (a `ReplicaSet` of one process tree)."""
    config = {
        "upstreams": upstream_table({ORIGIN: proxy}, 30.0),
        "audit": {"path": str(tmp_path / "audit" / "{replica}.jsonl")},
        "replica": {"id": "gate", "fill_lease": 2.0},
    }
    replicas = ReplicaSet(
        tmp_path / "set",
        config,
        redis_server=redis_server,
        s3=seaweed_s3,
        count=1,
        policy=policy("allow"),
        args=["--workers", str(WORKERS)],
    )
    with replicas:
        # The port answers once the first worker listens: wait for every one.
        wait_for(
            lambda: replicas[0].log_text().count("registry-gate listening") >= WORKERS,
            "every worker to listen",
        )
        yield replicas


def workers_of(pid: int) -> set[int]:
    """The process ids of the supervisor's children (its workers)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


def supervisor(replicas: ReplicaSet) -> int:
    pid = replicas[0].pid
    assert pid is not None
    return pid


def audit_records(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Each chain's records, by file name."""
    return {
        path.name: [json.loads(line) for line in path.read_text().splitlines() if line]
        for path in sorted(folder.glob("*.jsonl"))
    }


def test_two_workers_share_one_port_and_make_one_upstream_get_for_20_cold_gets(
    gate: ReplicaSet, proxy: FaultProxy, origin: DistributionRegistry, tmp_path: Path
) -> None:
    pid = supervisor(gate)
    assert len(workers_of(pid)) == WORKERS
    repo, data = unique_repo("workers"), os.urandom(8 * MIB)
    digest = push_blob(RegistryClient(origin.host), repo, data)
    # The upstream body is held after 2 MiB until every client has its headers: all 20
    # requests are attached to the fill (or to a peer stream of it) before it can end.
    proxy.set_fault("stall", keep=2 * MIB, contains=digest)
    before = scrape(gate[0].url).value(REQUESTS, route="blob")
    clients = 20
    headers = threading.Semaphore(0)
    barrier = threading.Barrier(clients)

    def one() -> Fetched:
        barrier.wait()
        # A connection each: the kernel spreads them over both workers' sockets.
        return fetch(gate[0].url, blob_path(ORIGIN, repo, digest), on_headers=headers.release)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one) for _ in range(clients)]
        for _ in range(clients):
            assert headers.acquire(timeout=60), "a client got no headers"
        proxy.release()
        results = [f.result() for f in futures]
    for result in results:
        assert result.status == 200, result
        assert result.complete and result.digest == digest, result
    assert proxy.count("GET", "blob", digest) == 1, proxy.summary()
    # Whichever worker answers /metrics counts the requests of both (a request is counted
    # once its response is written: the last may trail the client by a moment).
    wait_for_value(gate[0].url, REQUESTS, lambda v: v - before >= clients, route="blob")
    for _ in range(4):
        after = scrape(gate[0].url).value(REQUESTS, route="blob")
        assert after - before == clients


def test_every_request_is_audited_once_in_its_workers_chain_and_every_chain_verifies(
    gate: ReplicaSet, origin: DistributionRegistry, tmp_path: Path
) -> None:
    image = push_image(RegistryClient(origin.host), unique_repo("workers"), "v1", [b"layer"])
    path = manifest_path(ORIGIN, image.repo, "v1")
    pulls = 20
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: get(gate[0], path).status, range(pulls)))
    assert set(statuses) == {200}, statuses
    # Stopped: every worker has flushed its chain.
    assert gate[0].stop(timeout=30) == 0
    chains = audit_records(tmp_path / "audit")
    assert sorted(chains) == [f"gate-w{i}.jsonl" for i in range(WORKERS)]
    served = {
        name: [r for r in chain if r["event"] == "manifest_pull" and image.repo in r["name"]]
        for name, chain in chains.items()
    }
    assert sum(len(records) for records in served.values()) == pulls, served
    # Both workers served (20 connections over two sockets) and wrote their own chain.
    assert all(served.values()), {name: len(records) for name, records in served.items()}
    for name, chain in chains.items():
        assert {r["replica"] for r in chain} == {name.removesuffix(".jsonl")}
    (verified,) = run_cli(["audit", "verify", str(tmp_path / "audit")])
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.rstrip().endswith(f"OK: {WORKERS} chains verify"), verified.stdout


def test_sighup_reloads_the_policy_in_every_worker(
    gate: ReplicaSet, origin: DistributionRegistry
) -> None:
    image = push_image(RegistryClient(origin.host), unique_repo("workers"), "v1", [b"layer"])
    path = manifest_path(ORIGIN, image.repo, "v1")
    assert get(gate[0], path).status == 200
    before = scrape(gate[0].url).value(RELOADS, outcome="success")
    gate[0].policy_path.write_text(json.dumps(policy("deny")))
    os.kill(supervisor(gate), signal.SIGHUP)
    wait_for_value(gate[0].url, RELOADS, lambda v: v >= before + WORKERS, outcome="success")
    # A connection each, over both workers: every one denies now.
    statuses = [get(gate[0], path).status for _ in range(12)]
    assert set(statuses) == {403}, statuses


def test_a_killed_worker_is_restarted_and_the_gate_keeps_serving(
    gate: ReplicaSet, origin: DistributionRegistry
) -> None:
    image = push_image(RegistryClient(origin.host), unique_repo("workers"), "v1", [b"layer"])
    path = manifest_path(ORIGIN, image.repo, "v1")
    pid = supervisor(gate)
    first = workers_of(pid)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    # Connections the kernel had queued on the victim's socket die with it (a limit of
    # SO_REUSEPORT, see README); once it is gone, the survivor holds the port alone.
    wait_for(
        lambda: f"(pid {victim}) exited with status -9" in gate[0].log_text(),
        "the supervisor to see the worker die",
    )
    statuses = [get(gate[0], path).status for _ in range(10)]
    assert set(statuses) == {200}, statuses
    wait_for(lambda: len(workers_of(pid) - first) == 1, "a new worker", timeout=30)
    replacement = (workers_of(pid) - first).pop()
    assert workers_of(pid) == (first - {victim}) | {replacement}
    # The replacement serves too (it announces itself in the log when it listens).
    wait_for(lambda: gate[0].log_text().count("registry-gate listening") >= 3, "it listens")
    statuses = [get(gate[0], path).status for _ in range(10)]
    assert set(statuses) == {200}, statuses


def test_sigterm_stops_every_worker_and_the_supervisor_exits_0(gate: ReplicaSet) -> None:
    pid = supervisor(gate)
    children = workers_of(pid)
    assert len(children) == WORKERS
    assert gate[0].stop(timeout=30) == 0, gate[0].log_tail()
    for child in children:
        wait_for(lambda c=child: not Path(f"/proc/{c}").exists(), f"worker {child} to exit")
    assert "registry-gate stopped (2 workers)" in gate[0].log_text()


def test_sigkill_of_the_supervisor_takes_its_workers_down(gate: ReplicaSet) -> None:
    children = workers_of(supervisor(gate))
    gate[0].kill9()
    for child in children:
        wait_for(lambda c=child: not Path(f"/proc/{c}").exists(), f"worker {child} to exit")


def test_workers_that_keep_failing_at_start_stop_the_gate_with_their_status(
    tmp_path: Path, proxy: FaultProxy, redis_server: RedisServer, seaweed_s3: SeaweedS3
) -> None:
    replicas = ReplicaSet(
        tmp_path / "set",
        {
            "upstreams": upstream_table({ORIGIN: proxy}, 30.0),
            "audit": {"path": str(tmp_path / "audit" / "{replica}.jsonl")},
        },
        redis_server=redis_server,
        s3=seaweed_s3,
        count=1,
    )
    ensure_bucket(seaweed_s3)
    gate = replicas[0]
    # A listener without SO_REUSEPORT holds the port: every worker fails to listen, while
    # the supervisor's own checks (which do not bind) pass.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        gate.directory.mkdir(parents=True, exist_ok=True)
        gate.write_config(taken.getsockname()[1])
        command = ["serve", "--config", str(gate.config_path), "--workers", str(WORKERS)]
        result = subprocess.run(
            [sys.executable, "-m", "proxy", *command],
            env=gate._environment(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert f"failed {workers.MAX_START_FAILURES} times at start" in result.stderr
    assert "restarting in" in result.stderr
    assert "listen: cannot listen on 127.0.0.1" in result.stderr
