"""The `s3` storage backend in real gate processes: content filled through one gate is
served by a second gate with its own local folder and the same bucket, with no upstream
GET; ranges and HEAD on an S3-held blob; the `cache` commands on S3; a missing bucket is
a start-up error naming it.

Real components only: SeaweedFS (S3), a Distribution origin behind a counting
pass-through (tests/support/fault_proxy.py), gate subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from proxy.storage.s3 import BLOBS, MANIFESTS, PART_SIZE
from proxy.storage.s3_client import open_bucket
from tests.contract.backends import ensure_bucket, s3_environment, s3_settings
from tests.integration.test_cache import (
    ORIGIN,
    Image,
    blob_path,
    cache_cli,
    get,
    manifest_path,
    metric,
    push_image,
    sha256,
    unique_repo,
    upstream_table,
    wait_for,
)
from tests.support.cli import run_cli
from tests.support.engines import SeaweedS3
from tests.support.fault_proxy import FaultProxy, LoopThread
from tests.support.gate import GateFactory, GateProcess, GateStartError
from tests.support.registries import DistributionRegistry
from tests.support.registry_client import RegistryClient

BUCKET = "gate-shared"


@pytest.fixture
def s3_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The S3 keys in this process's environment (for the `cache` commands it runs)."""
    for name, value in s3_environment().items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    registry = DistributionRegistry(tmp_path_factory.mktemp("s3-origin"), name="s3-origin")
    with registry:
        yield registry


@pytest.fixture(scope="module")
def origin_proxy(origin: DistributionRegistry) -> Iterator[FaultProxy]:
    loops = LoopThread("s3-backend-proxies")
    try:
        with FaultProxy(lambda: origin.url, name="s3-origin-proxy", loop=loops) as proxy:
            yield proxy
    finally:
        loops.close()


def bucket_keys(seaweed: SeaweedS3, prefix: str) -> list[str]:
    """Every key under `prefix` in the shared bucket (creating the bucket first, as an
    operator would before starting the gates); the keys come from `s3_keys`."""

    async def listing() -> list[str]:
        settings = s3_settings(seaweed.endpoint, BUCKET, prefix)
        async with open_bucket(settings, check=False) as bucket:
            await ensure_bucket(bucket)
            answer = await bucket.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
            return [item["Key"] for item in answer.get("Contents", [])]

    return asyncio.run(listing())


class S3Gates(Protocol):
    def __call__(self, prefix: str, name: str, **s3: Any) -> GateProcess: ...


@pytest.fixture
def s3_gate(
    gate_factory: GateFactory, seaweed_s3: SeaweedS3, origin_proxy: FaultProxy, s3_keys: None
) -> S3Gates:
    """Starts a gate on the shared bucket under `prefix`, with the origin behind
    `origin_proxy` (more `storage.s3` settings as keywords)."""

    def start(prefix: str, name: str, **s3: Any) -> GateProcess:
        settings = s3_settings(seaweed_s3.endpoint, BUCKET, prefix)
        storage = {"backend": "s3", "s3": settings.model_dump(mode="json", exclude_none=True) | s3}
        config = {"upstreams": upstream_table({ORIGIN: origin_proxy}, 10.0), "storage": storage}
        return gate_factory(config, env=s3_environment(), name=name)

    return start


def pull_all(gate: GateProcess, image: Image) -> None:
    reply = get(gate, manifest_path(ORIGIN, image.repo, image.tag))
    assert reply.status == 200, reply
    assert reply.body == image.manifest
    reply = get(gate, manifest_path(ORIGIN, image.repo, image.digest))
    assert reply.status == 200 and reply.body == image.manifest, reply
    for digest, data in image.blobs.items():
        reply = get(gate, blob_path(ORIGIN, image.repo, digest))
        assert reply.status == 200, reply
        assert sha256(reply.body) == digest == sha256(data)


def test_a_second_gate_on_the_same_bucket_serves_without_upstream_gets(
    s3_gate: S3Gates, seaweed_s3: SeaweedS3, origin: DistributionRegistry, origin_proxy: FaultProxy
) -> None:
    prefix = f"run-{uuid.uuid4().hex[:8]}/"
    assert bucket_keys(seaweed_s3, prefix) == []
    # A small layer (one PutObject) and one of several parts (a multipart upload).
    big = os.urandom(2 * PART_SIZE + 12345)
    image = push_image(
        RegistryClient(origin.host), unique_repo("s3"), "v1", [os.urandom(5000), big]
    )

    first = s3_gate(prefix, "s3-gate-a")
    origin_proxy.reset()
    pull_all(first, image)
    assert origin_proxy.count("GET", "blob") == len(image.blobs), origin_proxy.summary()
    assert origin_proxy.count("GET", "manifest") == 1, origin_proxy.summary()

    # Published in the bucket (a client has its last byte once the content verified, a
    # moment before the upload completes).
    wanted = {f"{prefix}{BLOBS}/sha256/{d.removeprefix('sha256:')}" for d in image.blobs}
    wanted.add(f"{prefix}{MANIFESTS}/sha256/{image.digest.removeprefix('sha256:')}")
    wait_for(lambda: wanted <= set(bucket_keys(seaweed_s3, prefix)), "objects in the bucket")
    assert set(bucket_keys(seaweed_s3, prefix)) == wanted  # nothing else (no partial)

    second = s3_gate(prefix, "s3-gate-b")
    assert second.config["storage"]["path"] != first.config["storage"]["path"]
    origin_proxy.reset()
    pull_all(second, image)
    assert origin_proxy.count("GET") == 0, origin_proxy.summary()

    # Range and HEAD on the S3-held blob, through the second gate.
    big_digest = sha256(big)
    path = blob_path(ORIGIN, image.repo, big_digest)
    head = get(second, path, "HEAD")
    assert head.status == 200
    assert head.header("Content-Length") == str(len(big))
    assert head.header("Docker-Content-Digest") == big_digest
    first_byte, last_byte = PART_SIZE - 1000, PART_SIZE + 999_999
    ranged = get(second, path, Range=f"bytes={first_byte}-{last_byte}")
    assert ranged.status == 206, ranged
    assert ranged.header("Content-Range") == f"bytes {first_byte}-{last_byte}/{len(big)}"
    assert ranged.body == big[first_byte : last_byte + 1]
    suffix = get(second, path, Range="bytes=-100")
    assert (suffix.status, suffix.body) == (206, big[-100:])
    beyond = get(second, path, Range=f"bytes={len(big)}-")
    assert beyond.status == 416
    assert origin_proxy.count("GET") == 0, origin_proxy.summary()

    # The cache commands open the same stores (the bucket), beside running gates.
    done = cache_cli(second, "stats")
    assert done.returncode == 0, done.stderr + done.stdout
    stats = json.loads(done.stdout)
    assert (stats["backend"], stats["bucket"], stats["prefix"]) == ("s3", BUCKET, prefix)
    assert (stats["blobs"], stats["manifests"]) == (len(image.blobs), 1)
    assert stats["blob_bytes"] == sum(len(b) for b in image.blobs.values())
    done = cache_cli(second, "verify")
    assert done.returncode == 0 and "0 corrupt entries" in done.stdout, done.stdout


def test_a_missing_bucket_or_wrong_key_is_a_start_up_error_naming_it(
    tmp_path: Path,
    seaweed_s3: SeaweedS3,
    origin_proxy: FaultProxy,
    s3_keys: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = {
        "backend": "s3",
        "s3": s3_settings(seaweed_s3.endpoint, "no-such-bucket").model_dump(
            mode="json", exclude_none=True
        ),
    }
    gate = GateProcess(
        tmp_path,
        {"upstreams": upstream_table({ORIGIN: origin_proxy}, 10.0), "storage": storage},
        env=s3_environment(),
    )
    with pytest.raises(GateStartError) as excinfo:
        gate.start(attempts=1)
    assert gate.returncode == 2
    assert "storage.s3.bucket" in str(excinfo.value), excinfo.value
    assert "'no-such-bucket' does not exist" in gate.log_text()

    # check-config asks the object store too; a wrong secret key is named as such.
    wrong = tmp_path / "wrong.yaml"
    config = yaml.safe_load(gate.config_path.read_text())
    config["storage"]["s3"] = s3_settings(seaweed_s3.endpoint, BUCKET).model_dump(
        mode="json", exclude_none=True
    ) | {"secret_key_env": "GATE_TEST_WRONG_SECRET"}
    wrong.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("GATE_TEST_WRONG_SECRET", "not-the-secret")
    missing, refused = run_cli(
        ["check-config", "--config", str(gate.config_path)],
        ["check-config", "--config", str(wrong)],
    )
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "storage.s3.bucket: bucket 'no-such-bucket' does not exist" in missing.stderr
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "check the access and secret keys" in refused.stderr, refused.stderr


def test_redirect_answers_307_to_a_presigned_url_serving_the_blob(
    s3_gate: S3Gates, seaweed_s3: SeaweedS3, origin: DistributionRegistry, origin_proxy: FaultProxy
) -> None:
    prefix = f"redirect-{uuid.uuid4().hex[:8]}/"
    bucket_keys(seaweed_s3, prefix)  # the bucket exists
    data = os.urandom(300_000)
    image = push_image(RegistryClient(origin.host), unique_repo("redirect"), "v1", [data])
    gate = s3_gate(prefix, "s3-redirect", redirect=True)
    digest = sha256(data)
    path = blob_path(ORIGIN, image.repo, digest)
    # A miss is streamed through the gate (nothing to redirect to yet).
    first = get(gate, path)
    assert first.status == 200 and first.body == data, first
    key = f"{prefix}{BLOBS}/sha256/{digest.removeprefix('sha256:')}"
    wait_for(lambda: key in bucket_keys(seaweed_s3, prefix), "the blob in the bucket")

    origin_proxy.reset()
    hit = get(gate, path)
    assert hit.status == 307, hit
    location = hit.header("Location") or ""
    assert location.startswith(seaweed_s3.endpoint), location
    # The presigned URL is the access: no credentials of ours go with it.
    with urllib.request.urlopen(location, timeout=30) as answer:
        assert answer.status == 200
        assert answer.read() == data
    assert origin_proxy.count("GET", "blob") == 0, origin_proxy.summary()
    assert metric(gate, "registry_gate_blob_redirects_total") == 1

    # The held check comes first: a repository that does not hold the blob (its
    # upstream says 404) gets no redirect to it.
    other = get(gate, blob_path(ORIGIN, unique_repo("other"), digest))
    assert other.status == 404, other
    assert metric(gate, "registry_gate_blob_redirects_total") == 1
    # A HEAD is answered by the gate itself.
    head = get(gate, path, "HEAD")
    assert head.status == 200 and head.header("Content-Length") == str(len(data)), head
