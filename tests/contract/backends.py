"""The store implementations the contract suites run against, behind one small interface.

A `Backend` opens a blob or manifest store (again, to test what a restart sees), writes
damaged content behind the store's back, and says what a crash left. `filesystem` is the
embedded default; `s3` is the object-store backend against a real SeaweedFS, each test
under a fresh key prefix of one bucket; `s3-redis` is that store with its accounting in a
`RedisLedger` on a real redis-server (as replicas with `redis:` run it), each test under a
fresh key prefix there too.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from pathlib import Path
from typing import Any

import redis.asyncio

from proxy.settings import S3Settings
from proxy.storage.blobstore import EvictHook, FilesystemBlobStore
from proxy.storage.ledger import BlobLedger
from proxy.storage.manifest_cache import FilesystemManifestStore
from proxy.storage.redis_ledger import RedisLedger
from proxy.storage.s3 import BLOBS, MANIFESTS, S3BlobStore, S3ManifestStore
from proxy.storage.s3_client import S3Bucket, open_bucket
from tests.support.engines import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, SeaweedS3

CONTRACT_BUCKET = "contract"


def s3_settings(endpoint: str, bucket: str, prefix: str = "", **extra: Any) -> S3Settings:
    """Settings for the test SeaweedFS (keys from the environment names it sets)."""
    return S3Settings(
        endpoint=endpoint,
        bucket=bucket,
        region=S3_REGION,
        prefix=prefix,
        access_key_env="GATE_TEST_S3_ACCESS",
        secret_key_env="GATE_TEST_S3_SECRET",
        **extra,
    )


def s3_environment() -> dict[str, str]:
    return {"GATE_TEST_S3_ACCESS": S3_ACCESS_KEY, "GATE_TEST_S3_SECRET": S3_SECRET_KEY}


async def ensure_bucket(bucket: S3Bucket) -> None:
    with contextlib.suppress(Exception):
        await bucket.client.create_bucket(Bucket=bucket.bucket)


class Backend:
    """Opens stores of one kind; closes every store it opened at the end."""

    name = ""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._stack = contextlib.AsyncExitStack()

    async def aclose(self) -> None:
        await self._stack.aclose()

    async def blobs(
        self,
        max_size: int = 100_000_000,
        *,
        protected: Callable[[], Collection[str]] | None = None,
        on_evict: EvictHook | None = None,
        exclusive: bool = True,
    ) -> Any:
        raise NotImplementedError

    async def manifests(self) -> Any:
        raise NotImplementedError

    async def corrupt_blob(self, digest: str, data: bytes) -> None:
        """Replace a published blob's bytes behind the store's back."""
        raise NotImplementedError

    async def corrupt_manifest(self, digest: str) -> None:
        """Damage a stored manifest behind the store's back."""
        raise NotImplementedError

    async def blob_objects(self) -> list[str]:
        """What holds blob bytes outside the store's index (files, objects), by digest."""
        raise NotImplementedError

    async def leftovers(self) -> int:
        """Fills in progress or left behind (temp files, incomplete uploads)."""
        raise NotImplementedError


class FilesystemBackend(Backend):
    name = "filesystem"

    async def blobs(
        self,
        max_size: int = 100_000_000,
        *,
        protected: Callable[[], Collection[str]] | None = None,
        on_evict: EvictHook | None = None,
        exclusive: bool = True,
    ) -> FilesystemBlobStore:
        store = FilesystemBlobStore(self.root, max_size, protected=protected, on_evict=on_evict)
        await store.open(exclusive=exclusive)
        self._stack.push_async_callback(store.close)
        return store

    async def manifests(self) -> FilesystemManifestStore:
        store = FilesystemManifestStore(self.root)
        await store.open()
        return store

    def _blob_path(self, digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        return self.root / "blobs" / algorithm / hexpart

    async def corrupt_blob(self, digest: str, data: bytes) -> None:
        self._blob_path(digest).write_bytes(data)

    async def corrupt_manifest(self, digest: str) -> None:
        algorithm, _, hexpart = digest.partition(":")
        path = self.root / "manifests" / algorithm / hexpart
        path.write_bytes(path.read_bytes()[:-1] + b"!")

    async def blob_objects(self) -> list[str]:
        folder = self.root / "blobs"
        if not folder.exists():
            return []
        return sorted(f"{p.parent.name}:{p.name}" for p in folder.glob("*/*"))

    async def leftovers(self) -> int:
        tmp = self.root / "tmp"
        return len(list(tmp.iterdir())) if tmp.exists() else 0


class S3Backend(Backend):
    name = "s3"

    def __init__(self, root: Path, seaweed: SeaweedS3, monkeypatch: Any) -> None:
        super().__init__(root)
        for name, value in s3_environment().items():
            monkeypatch.setenv(name, value)
        self.settings = s3_settings(
            seaweed.endpoint, CONTRACT_BUCKET, prefix=f"t-{uuid.uuid4().hex[:12]}/"
        )
        self.bucket: S3Bucket | None = None

    async def _bucket(self) -> S3Bucket:
        if self.bucket is None:
            self.bucket = await self._stack.enter_async_context(
                open_bucket(self.settings, check=False)
            )
            await ensure_bucket(self.bucket)
            await self.bucket.check()
        return self.bucket

    async def blobs(
        self,
        max_size: int = 100_000_000,
        *,
        protected: Callable[[], Collection[str]] | None = None,
        on_evict: EvictHook | None = None,
        exclusive: bool = True,
        sweep_age: float | None = None,
    ) -> S3BlobStore:
        extra = {} if sweep_age is None else {"sweep_age": sweep_age}
        store = S3BlobStore(
            await self._bucket(),
            self.root / "s3-spool",
            max_size,
            protected=protected,
            on_evict=on_evict,
            ledger=await self.ledger(),
            **extra,
        )
        await store.open(exclusive=exclusive)
        self._stack.push_async_callback(store.close)
        return store

    async def ledger(self) -> BlobLedger | None:
        """The accounting of a store opened by `blobs` (None: its own MemoryLedger)."""
        return None

    async def manifests(self) -> S3ManifestStore:
        store = S3ManifestStore(await self._bucket())
        await store.open()
        return store

    async def corrupt_blob(self, digest: str, data: bytes) -> None:
        bucket = await self._bucket()
        await bucket.client.put_object(
            Bucket=bucket.bucket, Key=bucket.key(BLOBS, digest), Body=data
        )

    async def corrupt_manifest(self, digest: str) -> None:
        bucket = await self._bucket()
        key = bucket.key(MANIFESTS, digest)
        got = await bucket.client.get_object(Bucket=bucket.bucket, Key=key)
        async with got["Body"] as body:
            data = await body.read()
        await bucket.client.put_object(
            Bucket=bucket.bucket, Key=key, Body=data[:-1] + b"!", Metadata=got["Metadata"]
        )

    async def blob_objects(self) -> list[str]:
        bucket = await self._bucket()
        found: list[str] = []
        paginator = bucket.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(
            Bucket=bucket.bucket, Prefix=f"{bucket.prefix}{BLOBS}/"
        ):
            for item in page.get("Contents", []):
                digest = bucket.digest_of_key(BLOBS, item["Key"])
                if digest is not None:
                    found.append(digest)
        return sorted(found)

    async def uploads(self) -> list[str]:
        """Keys with an incomplete multipart upload under this test's prefix."""
        bucket = await self._bucket()
        answer = await bucket.client.list_multipart_uploads(
            Bucket=bucket.bucket, Prefix=bucket.prefix
        )
        return [upload["Key"] for upload in answer.get("Uploads", [])]

    async def leftovers(self) -> int:
        spool = self.root / "s3-spool"
        files = [p for p in spool.iterdir() if p.name != ".lock"] if spool.exists() else []
        return len(files) + len(await self.uploads())


class S3RedisBackend(S3Backend):
    """S3 with the shared ledger: each store opened is a replica on one Redis ledger."""

    name = "s3-redis"

    def __init__(self, root: Path, seaweed: SeaweedS3, monkeypatch: Any, redis_url: str) -> None:
        super().__init__(root, seaweed, monkeypatch)
        self._redis_url = redis_url
        self._prefix = f"t-{uuid.uuid4().hex[:12]}:"

    async def ledger(self) -> BlobLedger:
        client = redis.asyncio.Redis.from_url(self._redis_url)
        self._stack.push_async_callback(client.aclose)
        ledger = RedisLedger(client, key_prefix=self._prefix)
        self._stack.push_async_callback(ledger.close)
        return ledger


@contextlib.asynccontextmanager
async def backend_named(
    name: str,
    root: Path,
    seaweed: Callable[[], SeaweedS3],
    monkeypatch: Any,
    redis_url: Callable[[], str] | None = None,
) -> AsyncIterator[Backend]:
    backend: Backend
    if name == "filesystem":
        backend = FilesystemBackend(root)
    elif name == "s3-redis":
        assert redis_url is not None
        backend = S3RedisBackend(root, seaweed(), monkeypatch, redis_url())
    else:
        backend = S3Backend(root, seaweed(), monkeypatch)
    try:
        yield backend
    finally:
        await backend.aclose()
