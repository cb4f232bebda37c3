"""Several real gate processes that are meant to be one gate: shared S3 (SeaweedFS) for
content, shared Redis for state, nothing else shared.

Each replica gets its own directory (local temp, audit chain, log), as separate pods
would; the replicas share a bucket prefix and a Redis database chosen per `ReplicaSet`,
so sets in different tests never see each other's state.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import botocore.session
import redis

from tests.support.engines import (
    S3_ACCESS_KEY,
    S3_REGION,
    S3_SECRET_KEY,
    RedisServer,
    SeaweedS3,
)
from tests.support.gate import GateProcess, deep_merge

S3_ACCESS_ENV = "GATE_TEST_S3_ACCESS_KEY"
S3_SECRET_ENV = "GATE_TEST_S3_SECRET_KEY"
BUCKET = "registry-gate-tests"
# Redis databases 1..15 in turn (0 is left to ad-hoc tests): one per replica set.
_databases = itertools.cycle(range(1, 16))


def s3_client(store: SeaweedS3) -> Any:
    """A plain (synchronous) botocore S3 client for the test's own checks."""
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=store.endpoint,
        region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
    )


def ensure_bucket(store: SeaweedS3, bucket: str = BUCKET) -> None:
    client = s3_client(store)
    try:
        client.head_bucket(Bucket=bucket)
    except client.exceptions.ClientError:
        client.create_bucket(Bucket=bucket)


class ReplicaSet:
    """`count` gate processes on S3 + Redis; `config` is laid over the shared settings."""

    def __init__(
        self,
        root: Path,
        config: Mapping[str, Any],
        *,
        redis_server: RedisServer,
        s3: SeaweedS3,
        count: int = 3,
        policy: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.redis_server = redis_server
        self.s3 = s3
        self.prefix = f"sets/{uuid.uuid4().hex[:12]}/"
        self.database = next(_databases)
        shared = {
            "storage": {
                "backend": "s3",
                "s3": {
                    "endpoint": s3.endpoint,
                    "bucket": BUCKET,
                    "region": S3_REGION,
                    "prefix": self.prefix,
                    "access_key_env": S3_ACCESS_ENV,
                    "secret_key_env": S3_SECRET_ENV,
                },
            },
            "redis": {"url": f"redis://127.0.0.1:{redis_server.port}/{self.database}"},
            "upload_secret": uuid.uuid4().hex,
        }
        environment = {S3_ACCESS_ENV: S3_ACCESS_KEY, S3_SECRET_ENV: S3_SECRET_KEY, **(env or {})}
        self.gates = [
            GateProcess(
                root / f"replica-{index}",
                deep_merge(deep_merge(shared, {"replica": {"id": f"replica-{index}"}}), config),
                policy=policy,
                env=environment,
                name=f"replica-{index}",
                args=args,
            )
            for index in range(count)
        ]

    def redis(self) -> redis.Redis:
        """A client on this set's Redis database (the test's own checks)."""
        return redis.Redis(port=self.redis_server.port, db=self.database)

    def start(self) -> ReplicaSet:
        ensure_bucket(self.s3)
        with self.redis() as client:
            client.flushdb()
        for gate in self.gates:
            gate.start()
        return self

    def stop(self) -> None:
        for gate in self.gates:
            gate.stop()

    def __iter__(self) -> Iterator[GateProcess]:
        return iter(self.gates)

    def __getitem__(self, index: int) -> GateProcess:
        return self.gates[index]

    def __enter__(self) -> ReplicaSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def objects(self, under: str = "") -> list[str]:
        """Keys under this set's prefix (+ `under`) in the bucket."""
        client = s3_client(self.s3)
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=self.prefix + under
        ):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys
