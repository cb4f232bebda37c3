"""Blob stores with other capabilities than the filesystem's, for the in-process tier.

`StreamOnlyStore` offers the `BlobStore` protocol and nothing else (no local files: an
object store without redirects), `RedirectingStore` adds `BlobRedirects`. Both keep the
bytes in the real filesystem store they wrap, so fills, leases and eviction are real.
"""

from __future__ import annotations

import contextlib

from proxy.storage.blobstore import BlobReader, BlobStats, BlobStore, BlobWriter

REDIRECT_BASE = "http://127.0.0.1:9/store/"


class StreamOnlyStore:
    """A `BlobStore` with neither `LocalBlobFiles` nor `BlobRedirects`."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner

    async def close(self) -> None:
        await self.inner.close()

    async def stat(self, digest: str) -> int | None:
        return await self.inner.stat(digest)

    async def open_reader(self, digest: str) -> BlobReader | None:
        return await self.inner.open_reader(digest)

    async def begin_fill(self, digest: str, size: int | None = None) -> BlobWriter:
        return await self.inner.begin_fill(digest, size)

    async def delete(self, digest: str) -> bool:
        return await self.inner.delete(digest)

    def lease(self, digest: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self.inner.lease(digest)

    async def gc(self) -> list[tuple[str, int]]:
        return await self.inner.gc()

    async def verify(self, *, remove: bool = False) -> list[str]:
        return await self.inner.verify(remove=remove)

    async def stats(self) -> BlobStats:
        return await self.inner.stats()


class RedirectingStore(StreamOnlyStore):
    """A store whose cached blobs the client fetches from the store's own URL."""

    def __init__(self, inner: BlobStore) -> None:
        super().__init__(inner)
        self.redirected: list[str] = []

    async def redirect_url(self, digest: str) -> str | None:
        if await self.inner.stat(digest) is None:
            return None
        self.redirected.append(digest)
        return REDIRECT_BASE + digest


def _implements(store: StreamOnlyStore) -> BlobStore:
    # mypy checks here that the wrapper keeps up with the protocol.
    return store
