"""The endpoint other replicas stream a fill from: `GET /_replica/fills/<digest>`.

Registered only with Redis configured. It answers only requests signed with the shared
secret (`proxy.auth.replica_auth`; anything else is 401 before the digest is even read),
lives outside `/v2/` (no client route reaches it, and no OCI name can spell it), and
serves only what this replica's `FillCoordinator` is filling or has cached: it never
reaches an upstream and never starts a fill. The requesting replica has already decided
policy and checked that its client's repository holds the digest.

The bytes are those of a local reader of the fill: they flow as the upstream sends them,
the last 32 KiB withheld until the digest verified. A fill that fails cuts the stream
(connection aborted), so the requesting replica's fill fails too and its clients' bodies
end short, as they would on this replica.
"""

from __future__ import annotations

from aiohttp import web

from proxy.auth.replica_auth import HEADER
from proxy.content.replica_fills import PEER_PATH
from proxy.errors import BlobUnknown, Unauthorized
from proxy.names.references import validate_digest
from proxy.services import SERVICES


async def replica_fill(request: web.Request) -> web.StreamResponse:
    """Stream this replica's fill (or cached copy) of a digest to another replica."""
    services = request.app[SERVICES]
    replicas = services.pull.replicas
    assert replicas is not None  # the route exists only with Redis configured
    served = services.metrics.replica_streams_served
    if not replicas.signer.verify("GET", request.path, request.headers.get(HEADER)):
        served.labels("refused").inc()
        raise Unauthorized("replica request not authenticated")
    digest = request.match_info["digest"]
    validate_digest(digest)
    async with services.pull.cache.fills.follow(digest) as blob:
        if blob is None:
            served.labels("not_found").inc()
            raise BlobUnknown("this replica is not filling that blob and does not hold it")
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest}
        )
        if blob.size is not None:
            response.content_length = blob.size
        await response.prepare(request)
        try:
            async for chunk in blob:
                await response.write(chunk)
        except Exception:
            # The only signal left once headers are sent: a stream that ends short.
            served.labels("failed").inc()
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        served.labels("ok").inc()
        return response


def add_replica_routes(app: web.Application) -> None:
    """Register the replica endpoint (call only when the gate has `ReplicaFills`)."""
    app.router.add_route("GET", PEER_PATH.format(digest="{digest}"), replica_fill)
