"""The connection to the S3-compatible object store of the `s3` storage backend.

Owns how a client is opened from `storage.s3` (aiobotocore: the SDK's signing, retries
and credential chain, never our own), the keys the gate writes under the prefix, and the
start-up check that the bucket exists and the keys are accepted. Creating the bucket and
its lifecycle rule is the operator's job (README, "Storage backends"), not the gate's: a
gate with write access to a bucket should not also need the right to create buckets.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from proxy.names.references import validate_digest
from proxy.settings import ConfigError, S3Settings

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
else:  # the stubs are a dev dependency; at run time the name is only an annotation
    S3Client = object

CONNECT_TIMEOUT = 5.0
# A ranged GET feeding a slow client may pause between reads; botocore's read timeout
# is per socket read, not per request.
READ_TIMEOUT = 60.0
# Every concurrent blob read holds one connection while it streams.
MAX_POOL_CONNECTIONS = 64
MAX_ATTEMPTS = 3


class ObjectStoreError(OSError):
    """The object store refused or failed a request.

    An OSError, so the fill machinery treats it as it treats a full disk: the cache could
    not store the blob, which is not the upstream's fault.
    """


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of a failed request (`NoSuchKey`, `404`...), if it has one."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) or None
    return None


def is_missing(exc: BaseException) -> bool:
    """Whether a failed request says the key (or upload) does not exist."""
    return error_code(exc) in ("NoSuchKey", "404", "NotFound", "NoSuchUpload")


def normalized_prefix(prefix: str) -> str:
    """`cache` and `cache/` both put keys under `cache/`; empty stays empty."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


@dataclass(frozen=True, slots=True)
class S3Bucket:
    """An open client, the bucket and the key prefix every store of the gate uses."""

    client: S3Client
    bucket: str
    prefix: str
    redirect: bool = False

    def key(self, kind: str, digest: str) -> str:
        """`<prefix><kind>/<algorithm>/<hex>` for a (validated) digest."""
        algorithm, _, hexpart = validate_digest(digest).partition(":")
        return f"{self.prefix}{kind}/{algorithm}/{hexpart}"

    def digest_of_key(self, kind: str, key: str) -> str | None:
        """The digest a key under `<prefix><kind>/` names; None for anything else."""
        head = f"{self.prefix}{kind}/"
        if not key.startswith(head):
            return None
        algorithm, slash, hexpart = key[len(head) :].partition("/")
        if not slash:
            return None
        try:
            return validate_digest(f"{algorithm}:{hexpart}")
        except Exception:
            return None

    async def check(self) -> None:
        """ConfigError naming the bucket when it is missing or the keys are refused."""
        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = error_code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise ConfigError(
                    f"storage.s3.bucket: bucket {self.bucket!r} does not exist "
                    "(create it, with the lifecycle rule the README gives, before starting)"
                ) from exc
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ConfigError(
                    f"storage.s3: access to bucket {self.bucket!r} refused ({code}): "
                    "check the access and secret keys"
                ) from exc
            raise ConfigError(f"storage.s3: bucket {self.bucket!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise ConfigError(f"storage.s3.endpoint: {exc}") from exc


def client_config() -> AioConfig:
    """Path-style addressing (S3-compatible stores rarely do virtual hosts), bounded
    timeouts, a pool sized for concurrent streams, and checksums only where S3 requires
    them (botocore's default trailing checksums are not understood by every S3-compatible
    store, and every blob is verified against its digest anyway)."""
    return AioConfig(
        s3={"addressing_style": "path"},
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        max_pool_connections=MAX_POOL_CONNECTIONS,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


@contextlib.asynccontextmanager
async def open_bucket(settings: S3Settings, *, check: bool = True) -> AsyncIterator[S3Bucket]:
    """A client for `storage.s3`, closed on exit; with `check`, ConfigError first when the
    bucket is missing or refuses the keys. Keys come from the settings, or else from the
    SDK's default chain (environment, IRSA web identity, instance profile)."""
    access, secret = settings.credentials() or (None, None)
    session = get_session()
    async with session.create_client(
        "s3",
        endpoint_url=settings.endpoint,
        region_name=settings.region,
        config=client_config(),
        aws_access_key_id=access,
        aws_secret_access_key=secret,
    ) as client:
        bucket = S3Bucket(
            client, settings.bucket, normalized_prefix(settings.prefix), settings.redirect
        )
        if check:
            await bucket.check()
        yield bucket
