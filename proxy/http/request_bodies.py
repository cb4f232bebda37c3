"""Request bodies the gate reads into memory: a size cap, and a deadline for the whole read.

A body the gate reads itself (the token endpoint's form, a manifest PUT) is held in
memory and keeps a handler waiting, so a client must not be able to send a large one or
drip a small one for ever: past `limit` bytes the request is refused (413), past
`request_body_timeout` seconds for the whole body it is refused (408). Both answers close
the connection, whose unread remainder cannot be trusted. Upload bodies streamed to an
upstream are not read here (they are never held whole).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from proxy.errors import BodyTimeout, BodyTooLarge

READ_CHUNK = 64 * 1024


@asynccontextmanager
async def body_deadline(seconds: float) -> AsyncIterator[None]:
    """Bound the time of the block (a body read) to `seconds`; past it, `BodyTimeout`."""
    try:
        async with asyncio.timeout(seconds) as scope:
            yield
    except TimeoutError:
        if scope.expired():
            raise BodyTimeout(f"request body not received within {seconds:g} s") from None
        raise


async def read_body(request: web.Request, *, limit: int, seconds: float) -> bytes:
    """The whole request body, at most `limit` bytes, received within `seconds`."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body over {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async with body_deadline(seconds):
        async for chunk in request.content.iter_chunked(READ_CHUNK):
            total += len(chunk)
            if total > limit:
                raise BodyTooLarge(f"request body over {limit} bytes")
            chunks.append(chunk)
    return b"".join(chunks)
