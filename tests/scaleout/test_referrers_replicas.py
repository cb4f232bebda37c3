"""Referrers pushed through several replicas at once to an upstream without the referrers
API: the fallback tag index the replicas maintain loses none of them (issue 14).

Real gate processes on real SeaweedFS and redis-server in front of a real Distribution 2.8
registry (no referrers API) behind a counting `FaultProxy`, which holds the reads of a
referrers fallback tag (`sha256-<hex>`) so that two replicas' read-modify-writes would
overlap. Inside one process pushes of one subject are serialised by a lock; across
replicas the lock is in Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conformance.test_distribution_spec import MT_ARTIFACT, MT_MANIFEST, Target
from tests.integration.test_cache import ORIGIN, unique_repo, wait_for
from tests.support.fault_proxy import FaultProxy
from tests.support.replicas import ReplicaSet

pytestmark = pytest.mark.slow


@pytest.fixture
def replicas(push_replicas: Callable[[int], ReplicaSet]) -> ReplicaSet:
    return push_replicas(2)


def test_referrers_pushed_through_two_replicas_at_once_are_all_listed(
    replicas: ReplicaSet, proxy: FaultProxy
) -> None:
    targets = [Target(f"replica-{i}", gate.url, f"{ORIGIN}/") for i, gate in enumerate(replicas)]
    name = f"{ORIGIN}/{unique_repo('referrers')}"
    subject_raw, subject_digest, _ = targets[0].push_image(name, "subject", seed=70)
    subject = {"mediaType": MT_MANIFEST, "digest": subject_digest, "size": len(subject_raw)}
    fallback_reads = "/manifests/sha256-"

    def push_referrer(seed: int) -> str:
        target = targets[seed % len(targets)]
        _, digest, _ = target.push_image(
            name, None, seed=seed, subject=subject, artifactType=MT_ARTIFACT
        )
        return digest

    # The first two referrers, one through each replica, reach the read of the fallback
    # index together: the upstream holds those reads. Unserialised, both replicas read
    # the same index and the second PUT drops the first referrer; serialised, the second
    # replica cannot read before the first one wrote, and the hold is let go after a
    # bounded wait for a second read that never comes.
    proxy.set_fault("hang", methods={"GET"}, contains=fallback_reads)
    with ThreadPoolExecutor(2) as pool:
        first = [pool.submit(push_referrer, seed) for seed in (71, 72)]
        wait_for(lambda: proxy.count("GET", contains=fallback_reads) >= 1, "the first read")
        deadline = time.monotonic() + 3.0
        while proxy.count("GET", contains=fallback_reads) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proxy.clear_fault()
        digests = {future.result() for future in first}
    # Then a crowd: six more at once, spread over both replicas.
    seeds = list(range(73, 79))
    with ThreadPoolExecutor(len(seeds)) as pool:
        digests |= set(pool.map(push_referrer, seeds))
    assert len(digests) == 8
    for target in targets:
        reply = target.req("GET", f"/v2/{name}/referrers/{subject_digest}")
        assert reply.status == 200, reply
        assert {entry["digest"] for entry in reply.json()["manifests"]} == digests
