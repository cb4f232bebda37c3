"""How a blob body from the pull path becomes an HTTP response.

The pull path (`PullThrough.blob`) decides what is sent (a size, a redirect, a local
file, a stream); this module only turns that into aiohttp responses: sendfile for a
local file, a 307 for a redirect, a streamed body that ends short when its source fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.content.pull_through import BlobBody, BlobFile, BlobRedirect, BlobSize, BlobStream
from proxy.observability.metrics import Metrics


async def blob_response(
    request: web.Request, body: BlobBody, headers: Mapping[str, str], metrics: Metrics
) -> web.StreamResponse:
    """The response for `body` (to be returned while the body's context is open)."""
    if isinstance(body, BlobSize):
        return web.Response(headers={**headers, "Content-Length": str(body.size)})
    if isinstance(body, BlobRedirect):
        return web.Response(
            status=307,
            headers={
                "Location": body.url,
                "Docker-Content-Digest": headers["Docker-Content-Digest"],
            },
        )
    if isinstance(body, BlobFile):
        metrics.served_bytes.labels("cache").inc(body.size)
        return _CachedBlobResponse(body.lease, body.path, body.selected, dict(headers))
    return await _stream(request, body, headers, metrics)


async def _stream(
    request: web.Request, body: BlobStream, headers: Mapping[str, str], metrics: Metrics
) -> web.StreamResponse:
    response = web.StreamResponse(status=body.status, headers=headers)
    if body.content_range is not None:
        response.headers["Content-Range"] = body.content_range
    if body.length is not None:
        response.content_length = body.length
    await response.prepare(request)
    served = metrics.served_bytes.labels(body.source)
    try:
        async for chunk in body.chunks:
            await response.write(chunk)
            served.inc(len(chunk))
    except Exception:
        # Headers are gone: the only honest signal left is a body that ends short.
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


class _CachedBlobResponse(web.FileResponse):
    """A cached blob sent with sendfile, leased while it is sent (aiohttp sends the whole
    file within `prepare`), for exactly the range the gate chose.

    aiohttp's FileResponse reads `Range` itself and disagrees with the gate on what to
    ignore (`bytes=-`, multi-range, spaces, 5,000-digit numbers): it answers those with a
    bodiless 416 where the gate serves the whole blob, as on a cache miss. So it is shown
    a request whose `Range` is the gate's own reading. `If-Range` goes too: a blob is
    content-addressed, so every validator for it still holds.
    """

    def __init__(
        self,
        lease: AbstractAsyncContextManager[None],
        path: Path,
        selected: tuple[int, int] | None,
        headers: dict[str, str],
    ) -> None:
        super().__init__(path, headers=headers)
        self._lease = lease
        self._selected = selected

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        headers = request.headers.copy()
        headers.popall("Range", None)
        headers.popall("If-Range", None)
        if self._selected is not None:
            headers["Range"] = "bytes={}-{}".format(*self._selected)
        async with self._lease:
            return await super().prepare(request.clone(headers=headers))
