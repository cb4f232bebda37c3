"""The endpoint a replica hands an upload request to when this replica owns its
session: `PATCH|PUT|GET|DELETE /_replica/uploads/<upload id>?...`.

Registered only with Redis configured. Like the fill stream endpoint it answers only
requests signed with the replica key (`proxy.auth.replica_auth`): anything else is 401
before the query or the body is read, and touches no session. It lives outside `/v2/`,
so no client route reaches it and no client authentication or audit applies: the
replica that received the client's request has authenticated, decided and audited it
(see `proxy/content/upload_handoff.py` for why there). Here only the session step runs,
for a session whose id names this replica as owner (a hop is never handed on), and every
answer it gives as owner carries `X-Gate-Upload-Owner`, so the relaying replica can tell
it from a refusal by whatever else answers at this address.
"""

from __future__ import annotations

from aiohttp import web

from proxy.auth.replica_auth import HEADER
from proxy.content.push import ClientAddress
from proxy.content.upload_handoff import HOP_PATH, OWNER_HEADER, HopRequest
from proxy.errors import BlobUploadUnknown, RegistryError, Unauthorized
from proxy.http.routes import client_body
from proxy.names.references import Repository
from proxy.services import SERVICES

HOP_METHODS = ("PATCH", "PUT", "GET", "DELETE")


async def upload_hop(request: web.Request) -> web.StreamResponse:
    """Run the session step of an upload request another replica handed here."""
    services = request.app[SERVICES]
    pusher = services.pusher
    handoff, me = pusher.handoff, pusher.sealer.owner
    assert handoff is not None and me is not None  # the route exists only with Redis
    # The whole request target is signed: method, upload id and every query field.
    if not handoff.signer.verify(request.method, request.raw_path, request.headers.get(HEADER)):
        handoff.count("refused")
        # The body is not read: the connection ends with this answer.
        raise Unauthorized("replica request not authenticated", headers={"Connection": "close"})
    try:
        hop = HopRequest.parse(request.query)
        if hop.registry not in services.clients:
            raise BlobUploadUnknown("unknown upload session")
        forwarded = await pusher.continue_upload(
            request.method,
            Repository(hop.registry, hop.repository),
            ClientAddress(hop.name, hop.ns),
            request.match_info["token"],
            {"digest": hop.digest} if hop.digest is not None else {},
            hop.headers(),
            client_body(request),
            hop=True,
        )
    except RegistryError as error:
        error.headers[OWNER_HEADER] = me.replica
        raise
    forwarded.headers[OWNER_HEADER] = me.replica
    return web.Response(status=forwarded.status, headers=forwarded.headers, body=forwarded.body)


def add_upload_hop_routes(app: web.Application) -> None:
    """Register the hop endpoint (call only when the gate has an `UploadHandoff`)."""
    for method in HOP_METHODS:
        app.router.add_route(method, HOP_PATH.format(token="{token}"), upload_hop)
