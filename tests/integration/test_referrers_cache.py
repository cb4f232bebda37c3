"""Referrers from an upstream WITH the API, through the real gate process: cached like a
tag (fresh for tag_ttl, revalidated, stale within stale_limit), shared by concurrent
requests, verified before caching, filtered by `artifactType` only when the upstream did
not, per repository, and only for a principal who may pull.

The upstream is ``tests/support/referrers_upstream.py`` (Distribution 2.8 has no referrers
API), counting every referrers request it gets. Three gates front it, differing only in
their storage times: ``cached`` (tag_ttl one hour), ``expiring`` (tag_ttl 0: every request
revalidates; stale_limit one hour) and ``strict`` (tag_ttl 0, stale_limit 0: nothing is
served stale).
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from tests.support.fault_proxy import LoopThread
from tests.support.gate import GateProcess, policy_document
from tests.support.metrics import scrape, wait_for_value
from tests.support.referrers_upstream import (
    BROKEN,
    INDEX,
    MANIFEST,
    ReferrersUpstream,
    descriptor,
    sha256,
)
from tests.support.wire import Reply, request

REGISTRY = "referrers.example"
SIGNATURE = "application/vnd.example.signature"
SBOM = "application/vnd.example.sbom"
STALE_WARNING = '110 registry-gate "Response is stale: upstream unavailable"'
MISSES = "registry_gate_cache_misses_total"
STALE = "registry_gate_stale_served_total"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ReferrersUpstream]:
    loop = LoopThread("referrers-upstream")
    fake = ReferrersUpstream()
    try:
        yield fake.start(loop)
    finally:
        fake.stop()
        loop.close()


def _policy(*denied: str) -> dict[str, Any]:
    rules = [
        {"name": f"deny-{i}", "match": f"{REGISTRY}/{repo}", "actions": ["pull"], "allow": False}
        for i, repo in enumerate(denied)
    ]
    return policy_document([REGISTRY], "allow", rules)


def _gate(upstream: ReferrersUpstream, directory: Path, name: str, **storage: float) -> GateProcess:
    config = {
        "upstreams": [
            {
                "registry": REGISTRY,
                "url": upstream.url,
                "timeouts": {"connect": 2.0, "read": 5.0},
                # Failures are what these tests cause: the circuit must not add its own.
                "circuit": {"failures": 1000, "cooldown": 0},
            }
        ],
        "storage": storage,
    }
    return GateProcess(directory, config, policy=_policy("secret/**"), name=name)


@pytest.fixture(scope="module")
def cached(
    upstream: ReferrersUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GateProcess]:
    with _gate(
        upstream,
        tmp_path_factory.mktemp("cached"),
        "cached",
        tag_ttl=3600,
        stale_limit=7200,
        revalidate_grace=0,
    ) as gate:
        yield gate


@pytest.fixture(scope="module")
def expiring(
    upstream: ReferrersUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GateProcess]:
    with _gate(
        upstream,
        tmp_path_factory.mktemp("expiring"),
        "expiring",
        tag_ttl=0,
        stale_limit=3600,
        revalidate_grace=0,
    ) as gate:
        yield gate


@pytest.fixture(scope="module")
def strict(
    upstream: ReferrersUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GateProcess]:
    with _gate(
        upstream,
        tmp_path_factory.mktemp("strict"),
        "strict",
        tag_ttl=0,
        stale_limit=0,
        revalidate_grace=0,
    ) as gate:
        yield gate


@pytest.fixture(autouse=True)
def upstream_up(upstream: ReferrersUpstream) -> Iterator[None]:
    upstream.up()
    yield
    upstream.up()


def repository() -> str:
    """A repository no other test used: nothing cached for it."""
    return f"team/r{uuid.uuid4().hex[:10]}"


def subject() -> str:
    return sha256(uuid.uuid4().bytes)


def referrers(gate: GateProcess, repo: str, digest: str, artifact_type: str | None = None) -> Reply:
    path = f"/v2/{REGISTRY}/{repo}/referrers/{digest}"
    if artifact_type is not None:
        path += f"?artifactType={quote(artifact_type, safe='')}"
    return request(gate.url, "GET", path)


def listed(reply: Reply) -> list[dict[str, Any]]:
    """The descriptors of a 200 referrers answer (checked to be an OCI index)."""
    assert reply.status == 200, reply
    assert reply.header("Content-Type") == INDEX, reply
    document = reply.json()
    assert document["schemaVersion"] == 2 and document["mediaType"] == INDEX, document
    return list(document["manifests"])


def seeded(upstream: ReferrersUpstream, repo: str, digest: str) -> list[dict[str, Any]]:
    """A signature and an SBOM of `digest` in `repo` upstream."""
    found = [descriptor(f"{repo}-sig", SIGNATURE), descriptor(f"{repo}-sbom", SBOM)]
    for item in found:
        upstream.add(repo, digest, item)
    return found


def assert_unavailable(reply: Reply) -> None:
    assert reply.status == 502, reply
    assert reply.error_codes == ["UNAVAILABLE"], reply
    assert any(REGISTRY in message for message in reply.error_messages), reply
    assert reply.header("Warning") is None, reply
    assert "127.0.0." not in reply.body.decode(), reply


# -- cached like a tag -------------------------------------------------------------------


def test_the_first_request_fetches_and_the_next_within_tag_ttl_is_the_cached_answer(
    cached: GateProcess, upstream: ReferrersUpstream
) -> None:
    repo, digest = repository(), subject()
    expected = seeded(upstream, repo, digest)
    first = referrers(cached, repo, digest)
    assert listed(first) == expected
    assert len(upstream.referrers_requests(repo)) == 1
    # A referrer added upstream is not seen within tag_ttl: the answer is the cached one.
    upstream.add(repo, digest, descriptor(f"{repo}-new", SIGNATURE))
    second = referrers(cached, repo, digest)
    assert second.body == first.body
    assert len(upstream.referrers_requests(repo)) == 1
    assert second.header("OCI-Filters-Applied") is None


def test_after_tag_ttl_the_answer_is_revalidated(
    expiring: GateProcess, upstream: ReferrersUpstream
) -> None:
    repo, digest = repository(), subject()
    expected = seeded(upstream, repo, digest)
    assert listed(referrers(expiring, repo, digest)) == expected
    added = descriptor(f"{repo}-new", SIGNATURE)
    upstream.add(repo, digest, added)
    assert listed(referrers(expiring, repo, digest)) == [*expected, added]
    assert len(upstream.referrers_requests(repo)) == 2


def test_upstream_down_serves_the_stale_answer_with_a_warning_within_stale_limit(
    expiring: GateProcess, upstream: ReferrersUpstream
) -> None:
    repo, digest = repository(), subject()
    expected = seeded(upstream, repo, digest)
    fresh = referrers(expiring, repo, digest)
    assert listed(fresh) == expected and fresh.header("Warning") is None
    before = scrape(expiring.url).value(STALE, upstream=REGISTRY, kind="referrers")
    upstream.down()
    stale = referrers(expiring, repo, digest)
    assert stale.status == 200, stale
    assert stale.body == fresh.body
    assert stale.header("Warning") == STALE_WARNING
    after = scrape(expiring.url).value(STALE, upstream=REGISTRY, kind="referrers")
    assert after == before + 1
    audit = Path(expiring.config["audit"]["path"]).read_text().splitlines()
    records = [json.loads(line) for line in audit if line.strip()]
    stale_serves = [r for r in records if r.get("event") == "stale_serve"]
    assert stale_serves and stale_serves[-1]["digest"] == digest, records[-3:]
    assert stale_serves[-1]["upstream"] == REGISTRY
    # Never cached: nothing to serve stale.
    assert_unavailable(referrers(expiring, repository(), digest))


def test_upstream_down_beyond_stale_limit_is_a_clear_502(
    strict: GateProcess, upstream: ReferrersUpstream
) -> None:
    repo, digest = repository(), subject()
    expected = seeded(upstream, repo, digest)
    assert listed(referrers(strict, repo, digest)) == expected
    upstream.down()
    assert_unavailable(referrers(strict, repo, digest))
    upstream.up()
    assert len(listed(referrers(strict, repo, digest))) == 2


def test_concurrent_identical_requests_share_one_upstream_fetch(
    cached: GateProcess, upstream: ReferrersUpstream
) -> None:
    repo, digest = repository(), subject()
    expected = seeded(upstream, repo, digest)
    held = upstream.hold(repo)
    clients = 8
    before = scrape(cached.url).value(MISSES, kind="referrers")
    with ThreadPoolExecutor(clients) as pool:
        replies = [pool.submit(referrers, cached, repo, digest) for _ in range(clients)]
        try:
            # Every request has missed the cache and joined (or started) the fetch, which
            # the upstream holds: only then is it answered.
            wait_for_value(cached.url, MISSES, lambda v: v >= before + clients, kind="referrers")
        finally:
            upstream.release(held)
        bodies = {future.result().body for future in replies}
    assert len(upstream.referrers_requests(repo)) == 1
    assert len(bodies) == 1
    assert json.loads(bodies.pop())["manifests"] == expected


def test_each_repository_has_its_own_answer_for_one_subject(
    cached: GateProcess, upstream: ReferrersUpstream
) -> None:
    first, second, digest = repository(), repository(), subject()
    in_first = seeded(upstream, first, digest)
    answer = referrers(cached, first, digest)
    assert listed(answer) == in_first
    # The cached answer is no manifest of the repository (the upstream has none such).
    as_manifest = request(
        cached.url, "GET", f"/v2/{REGISTRY}/{first}/manifests/{sha256(answer.body)}"
    )
    assert as_manifest.status == 404 and as_manifest.error_codes == ["MANIFEST_UNKNOWN"]
    # The same subject digest in another repository: its own upstream request and list.
    assert listed(referrers(cached, second, digest)) == []
    in_second = descriptor(f"{second}-only", SIGNATURE)
    upstream.add(second, digest, in_second)
    assert listed(referrers(cached, first, digest)) == in_first
    assert len(upstream.referrers_requests(second)) == 1


def test_a_referrer_pushed_through_the_gate_drops_the_cached_answers(
    cached: GateProcess, upstream: ReferrersUpstream
) -> None:
    repo, digest = repository(), subject()
    expected = seeded(upstream, repo, digest)
    assert listed(referrers(cached, repo, digest)) == expected
    assert len(listed(referrers(cached, repo, digest, SIGNATURE))) == 1
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "artifactType": SIGNATURE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest, "size": 2},
        "layers": [],
        "subject": {"mediaType": MANIFEST, "digest": digest, "size": 10},
    }
    raw = json.dumps(manifest).encode()
    pushed = request(
        cached.url,
        "PUT",
        f"/v2/{REGISTRY}/{repo}/manifests/{sha256(raw)}",
        {"Content-Type": MANIFEST},
        raw,
    )
    assert pushed.status == 201, pushed
    assert pushed.header("OCI-Subject") == digest
    assert sha256(raw) in [m["digest"] for m in listed(referrers(cached, repo, digest))]
    signatures = listed(referrers(cached, repo, digest, SIGNATURE))
    assert [m["digest"] for m in signatures] == [expected[0]["digest"], sha256(raw)]
    assert len(upstream.referrers_requests(repo)) == 4


# -- artifactType ------------------------------------------------------------------------


def test_artifact_type_is_filtered_by_the_gate_when_the_upstream_ignores_it(
    cached: GateProcess, upstream: ReferrersUpstream
) -> None:
    repo, digest = repository(), subject()
    upstream.behave(repo, filters=False)
    signature, _sbom = seeded(upstream, repo, digest)
    reply = referrers(cached, repo, digest, SIGNATURE)
    assert listed(reply) == [signature]
    assert reply.header("OCI-Filters-Applied") == "artifactType"
    asked = upstream.referrers_requests(repo)
    assert len(asked) == 1
    assert parse_qs(urlsplit(asked[0].path_qs).query) == {"artifactType": [SIGNATURE]}
    # Cached with its filter: again, no upstream request, same answer and header.
    again = referrers(cached, repo, digest, SIGNATURE)
    assert again.body == reply.body and again.header("OCI-Filters-Applied") == "artifactType"
    # The unfiltered list is another answer, cached on its own.
    assert len(listed(referrers(cached, repo, digest))) == 2
    assert len(upstream.referrers_requests(repo)) == 2


def test_artifact_type_applied_by_the_upstream_is_passed_through(
    cached: GateProcess, upstream: ReferrersUpstream
) -> None:
    repo, digest = repository(), subject()
    # The upstream matches by the referrer's config type; its descriptor does not say it.
    untyped = descriptor(f"{repo}-untyped", None)
    upstream.add(repo, digest, untyped, matched_type=SIGNATURE)
    upstream.add(repo, digest, descriptor(f"{repo}-sbom", SBOM))
    reply = referrers(cached, repo, digest, SIGNATURE)
    # Filtered again by the gate, the answer would be empty.
    assert listed(reply) == [untyped]
    assert reply.header("OCI-Filters-Applied") == "artifactType"


# -- policy ------------------------------------------------------------------------------


def test_a_principal_who_may_not_pull_is_denied_and_the_upstream_not_asked(
    cached: GateProcess, upstream: ReferrersUpstream
) -> None:
    secret, digest = f"secret/r{uuid.uuid4().hex[:10]}", subject()
    seeded(upstream, secret, digest)
    reply = referrers(cached, secret, digest)
    assert reply.status == 403 and reply.error_codes == ["DENIED"], reply
    assert upstream.referrers_requests(secret) == []


def test_a_cached_answer_is_not_served_once_policy_denies_the_repository(
    cached: GateProcess, upstream: ReferrersUpstream
) -> None:
    repo, digest = repository(), subject()
    seeded(upstream, repo, digest)
    assert len(listed(referrers(cached, repo, digest))) == 2
    cached.policy_path.write_text(json.dumps(_policy("secret/**", repo)))
    assert cached.pid is not None
    os.kill(cached.pid, signal.SIGHUP)
    try:
        deadline = time.monotonic() + 15
        reply = referrers(cached, repo, digest)
        while reply.status == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
            reply = referrers(cached, repo, digest)
        assert reply.status == 403 and reply.error_codes == ["DENIED"], reply
        assert len(upstream.referrers_requests(repo)) == 1
    finally:
        cached.policy_path.write_text(json.dumps(_policy("secret/**")))
        os.kill(cached.pid, signal.SIGHUP)


# -- what is not an answer ---------------------------------------------------------------


@pytest.mark.parametrize("broken", BROKEN)
def test_a_malformed_upstream_answer_is_a_clear_502_and_not_cached(
    cached: GateProcess, upstream: ReferrersUpstream, broken: str
) -> None:
    repo, digest = repository(), subject()
    expected = seeded(upstream, repo, digest)
    upstream.behave(repo, broken=broken)
    assert_unavailable(referrers(cached, repo, digest))
    asked = len(upstream.referrers_requests(repo))
    upstream.behave(repo, broken=None)
    assert listed(referrers(cached, repo, digest)) == expected
    assert len(upstream.referrers_requests(repo)) == asked + 1


def test_paginated_upstream_answers_are_followed_and_merged(
    cached: GateProcess, upstream: ReferrersUpstream
) -> None:
    repo, digest = repository(), subject()
    upstream.behave(repo, page_size=2, filters=False)
    expected = [descriptor(f"{repo}-{n}", SIGNATURE if n % 2 else SBOM) for n in range(5)]
    for item in expected:
        upstream.add(repo, digest, item)
    assert listed(referrers(cached, repo, digest)) == expected
    asked = upstream.referrers_requests(repo)
    assert [seen.path_qs.partition("?")[2] for seen in asked] == ["", "next=2", "next=4"]
    filtered = referrers(cached, repo, digest, SIGNATURE)
    assert listed(filtered) == [expected[1], expected[3]]
