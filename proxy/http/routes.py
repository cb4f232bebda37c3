"""The OCI Distribution endpoints the gate serves: thin handlers that parse and delegate.

Each handler validates what the client sent (name, reference, digest) before anything
reaches an upstream, locates the repository (ns, path prefix or short name), and hands
over to the pull path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from proxy.content.pull_through import STREAM_CHUNK
from proxy.content.push import ClientAddress, read_manifest_body
from proxy.content.tag_pages import next_link, page, parse_page_size
from proxy.errors import (
    Denied,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RegistryError,
    Unsupported,
)
from proxy.http.blob_responses import blob_response
from proxy.http.middleware import API_VERSION_HEADER, request_context, v2_route_of
from proxy.http.request_bodies import body_deadline
from proxy.names.addressing import Target, V2Route, locate
from proxy.names.references import (
    is_digest,
    validate_digest,
    validate_reference,
)
from proxy.policy.gatekeeper import RequestContext
from proxy.services import SERVICES, Services

PULL_METHODS = frozenset({"GET", "HEAD"})


async def v2_root(request: web.Request) -> web.Response:
    """`GET /v2/`: the API version check every client starts with."""
    return web.json_response({}, headers=dict([API_VERSION_HEADER]))


async def v2_dispatch(request: web.Request) -> web.StreamResponse:
    """Every `/v2/<name>/...` endpoint."""
    raw_path = request.raw_path.split("?", 1)[0]
    if "%" in raw_path or "/../" in raw_path or "//" in raw_path[4:]:
        # Encoded slashes or dot segments would make the name mean something else upstream.
        raise NameInvalid("invalid characters in the request path")
    route = v2_route_of(request)
    if route is None:
        raise NameUnknown("no such endpoint")
    services = request.app[SERVICES]
    ns = request.query.get("ns")
    target = locate(route.name, ns, services.registries)
    if route.ref is not None and route.kind == "manifest":
        try:
            validate_reference(route.ref)
        except RegistryError:
            if request.method not in PULL_METHODS:
                raise
            # A reference that can name nothing is a manifest no repository has: 404, as
            # Distribution answers and the conformance suite expects (TAG_INVALID is for
            # writes), still without asking the upstream.
            raise ManifestUnknown(
                "manifest unknown", detail={"reference": route.ref[:200]}
            ) from None
    elif route.ref is not None and route.kind in ("blob", "referrers"):
        validate_digest(route.ref)
    if request.method not in PULL_METHODS or route.kind in ("upload", "upload_start"):
        response = await _write(request, services, target, route)
    elif route.kind == "manifest":
        response = await _manifest(request, services, target, route)
    elif route.kind == "blob":
        response = await _blob(request, services, target, route)
    elif route.kind == "tags":
        response = await _tags(request, services, target, route)
    elif route.kind == "referrers":
        response = await _referrers(request, services, target, route)
    else:
        raise Unsupported(f"{request.method} is not supported on this endpoint")
    if ns is not None:
        response.headers["OCI-Namespace"] = ns
    return response


def _context(request: web.Request) -> RequestContext:
    return request_context(request)


async def _manifest(
    request: web.Request, services: Services, target: Target, route: V2Route
) -> web.StreamResponse:
    assert route.ref is not None
    context = _context(request)
    gatekeeper = services.gatekeeper
    access = await gatekeeper.check_pull(context, target, route.ref, "manifest")
    head = request.method == "HEAD"
    event = "manifest_head" if head else "manifest_pull"
    name = f"{target.requested}:{route.ref}" if not is_digest(route.ref) else target.requested
    try:
        result = await services.pull.manifest(
            access.location, route.ref, request.headers.getall("Accept", []), head=head
        )
    except RegistryError as error:
        # An allowed pull that failed upstream is still a decision an auditor asks about
        # ("who tried to pull what, and what happened").
        await gatekeeper.record(
            context,
            event=event,
            action="pull",
            name=name,
            access=access,
            resolved=access.repository.reference(route.ref),
            status=error.status,
            reason=f"{error.code}: {error.message}",
        )
        raise
    headers = {
        "Content-Type": result.info.media_type,
        "Docker-Content-Digest": result.info.digest,
        "Etag": f'"{result.info.digest}"',
    }
    if result.stale is not None:
        headers["Warning"] = '110 registry-gate "Response is stale: upstream unavailable"'
        await gatekeeper.record(
            context,
            event="stale_serve",
            action="pull",
            name=target.requested,
            access=access,
            digest=result.info.digest,
            status=200,
            reason=result.stale,
        )
    await gatekeeper.record(
        context,
        event=event,
        action="pull",
        name=name,
        access=access,
        resolved=access.repository.reference(route.ref),
        digest=result.info.digest,
        status=200,
        size=result.info.size,
        extra={"source": result.source},
    )
    if head:
        headers["Content-Length"] = str(result.info.size)
        return web.Response(status=200, headers=headers)
    return web.Response(status=200, body=result.body, headers=headers)


_BLOB_HEADERS = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}


async def _blob(
    request: web.Request, services: Services, target: Target, route: V2Route
) -> web.StreamResponse:
    assert route.ref is not None
    digest = route.ref
    access = await services.gatekeeper.check_pull(_context(request), target, digest, "blob")
    headers = {**_BLOB_HEADERS, "Docker-Content-Digest": digest, "Etag": f'"{digest}"'}
    async with services.pull.blob(
        access.location, digest, request.headers.get("Range"), head=request.method == "HEAD"
    ) as body:
        return await blob_response(request, body, headers, services.metrics)


async def _tags(
    request: web.Request, services: Services, target: Target, route: V2Route
) -> web.StreamResponse:
    access = await services.gatekeeper.check_pull(_context(request), target, None, "tags")
    repository = access.location
    n = parse_page_size(request.query.get("n"))
    last = request.query.get("last")
    tags = await services.pull.tags(repository)
    selected, more = page(tags, n, last)
    headers = {}
    if more and n and selected:
        headers["Link"] = next_link(route.name, n, selected[-1], request.query.get("ns"))
    return web.json_response({"name": route.name, "tags": selected}, headers=headers)


async def _referrers(
    request: web.Request, services: Services, target: Target, route: V2Route
) -> web.StreamResponse:
    assert route.ref is not None
    context = _context(request)
    access = await services.gatekeeper.check_pull(context, target, None, "referrers")
    answer = await services.pull.referrers(
        access.location, route.ref, request.query.get("artifactType")
    )
    headers = answer.headers()
    if answer.stale is not None:
        headers["Warning"] = '110 registry-gate "Response is stale: upstream unavailable"'
        await services.gatekeeper.record(
            context,
            event="stale_serve",
            action="pull",
            name=target.requested,
            access=access,
            digest=route.ref,
            status=200,
            reason=answer.stale,
            extra={"kind": "referrers"},
        )
    return web.Response(status=200, body=answer.body, headers=headers)


def client_body(request: web.Request) -> AsyncIterator[bytes] | None:
    """The request's body as chunks, or None when it has none."""
    if request.content_length == 0 or (
        request.content_length is None and "Transfer-Encoding" not in request.headers
    ):
        return None
    return request.content.iter_chunked(STREAM_CHUNK)


async def _write(
    request: web.Request, services: Services, target: Target, route: V2Route
) -> web.StreamResponse:
    """Uploads, manifest PUTs and deletes, forwarded to the upstream the name addresses."""
    method = request.method
    context = _context(request)
    gatekeeper = services.gatekeeper
    action = "delete" if method == "DELETE" and route.kind in ("manifest", "blob") else "push"
    manifest_ref = route.ref if route.kind == "manifest" else None
    try:
        access = await gatekeeper.check_write(context, target, action, manifest_ref)
    except Denied:
        if route.kind == "upload" and route.ref is not None and target.repository is not None:
            # Policy no longer allows this upload to go on: nothing of it may stay upstream.
            address = ClientAddress(route.name, request.query.get("ns"))
            await services.pusher.abandon(target.repository, address, route.ref)
        raise
    repository = access.repository
    address = ClientAddress(route.name, request.query.get("ns"))
    if route.kind == "upload_start" and method == "POST":
        mount_from = None
        if "from" in request.query:
            source = locate(request.query["from"], request.query.get("ns"), services.registries)
            # A mount reads the source: the principal must be allowed to pull it.
            source_access = await gatekeeper.check_pull(context, source, None, "blob")
            mount_from = source_access.location
        forwarded = await services.pusher.start_upload(
            repository, address, request.query, request.headers, client_body(request), mount_from
        )
    elif route.kind == "upload" and method in ("PATCH", "PUT", "GET", "DELETE"):
        assert route.ref is not None
        forwarded = await services.pusher.continue_upload(
            method,
            repository,
            address,
            route.ref,
            request.query,
            request.headers,
            client_body(request),
        )
    elif route.kind == "manifest" and method == "PUT":
        assert route.ref is not None
        async with body_deadline(services.settings.request_body_timeout):
            body = await read_manifest_body(request.content.iter_chunked(STREAM_CHUNK))
        tags = request.query.getall("tag", [])
        forwarded = await services.pusher.put_manifest(
            repository, address, route.ref, request.headers, body, tags
        )
        if forwarded.status < 300:
            # The tags it wrote name this manifest now: the next pull must not be served
            # what they named before from cache (it asks the upstream again).
            for tag in {route.ref, *tags} - {""}:
                if not is_digest(tag):
                    await services.pull.forget(repository, tag)
    elif route.kind in ("manifest", "blob") and method == "DELETE":
        assert route.ref is not None
        forwarded = await services.pusher.delete(repository, address, route.kind, route.ref)
        await services.pull.forget(repository, route.ref)
    else:
        raise Unsupported(f"{method} is not supported on this endpoint")
    subject = forwarded.headers.get("OCI-Subject") if route.kind == "manifest" else None
    if subject is not None and forwarded.status < 300:
        # A referrer of `subject` was pushed: its cached referrers answers are outdated.
        await services.pull.referrers_answers.forget(repository, subject)
    if route.kind == "manifest" or method == "DELETE":
        await gatekeeper.record(
            context,
            event="delete" if method == "DELETE" else "push",
            action=action,
            name=target.requested,
            access=access,
            digest=forwarded.headers.get("Docker-Content-Digest")
            or (route.ref if route.ref and is_digest(route.ref) else None),
            status=forwarded.status,
            extra={"reference": route.ref, "kind": route.kind},
        )
    return web.Response(status=forwarded.status, headers=forwarded.headers, body=forwarded.body)


def add_routes(app: web.Application) -> None:
    """Register the OCI endpoints."""
    app.router.add_route("GET", "/v2/", v2_root)
    app.router.add_route("HEAD", "/v2/", v2_root)
    app.router.add_route("*", "/v2/{tail:.+}", v2_dispatch)
    app.router.add_route("GET", "/v2", v2_root)
