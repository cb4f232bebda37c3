"""A registry WITH the OCI 1.1 referrers API, counting what it is asked (Distribution 2.8,
the real upstream of the other tests, has no such API).

Owns the upstream side of the referrers-cache tests: one ``FakeServer`` (from
``hostile_upstream``: every request recorded, ``down()``/``up()`` on the same port)
answering ``GET /v2/<repo>/referrers/<digest>`` from an in-memory table of descriptors per
(repository, subject), and ``PUT /v2/<repo>/manifests/<ref>`` of a manifest with a
``subject`` by adding its descriptor there (answered with ``OCI-Subject``, as a registry
with the API does). What it does with a request is switchable per repository:

- ``filters``: apply ``artifactType`` itself and say so with ``OCI-Filters-Applied`` (a
  registry that filters may match by the config's media type, so the descriptors it
  keeps need not carry ``artifactType``), or ignore it (True by default);
- ``page_size``: answer in pages of that many descriptors, each with a
  ``Link: <...?next=N>; rel="next"`` to the next;
- ``broken``: answer with something that is not a referrers index (see ``BROKEN``);
- ``hold``: an event the referrers answers wait for (concurrency tests).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.fault_proxy import LoopThread
from tests.support.hostile_upstream import FakeServer, Seen

__all__ = ["BROKEN", "INDEX", "MANIFEST", "ReferrersUpstream", "descriptor", "sha256"]

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# What ``broken`` can be, each a way an upstream's referrers answer is not an OCI index.
BROKEN = (
    "not_json",
    "not_an_index",  # JSON, but `manifests` is not a list
    "content_type",  # a valid index body, served as an image manifest
    "media_type",  # an index whose own mediaType says image manifest
    "bad_descriptor",  # an entry whose digest is not a digest
    "huge",  # a valid index over 4 MiB
    "endless_pages",  # every page links to another
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(name: str, artifact_type: str | None) -> dict[str, Any]:
    """A referrer's descriptor (its digest derived from `name`)."""
    found: dict[str, Any] = {"mediaType": MANIFEST, "digest": sha256(name.encode()), "size": 512}
    if artifact_type is not None:
        found["artifactType"] = artifact_type
    return found


@dataclass
class Behaviour:
    """How the upstream answers for one repository."""

    filters: bool = True
    page_size: int | None = None
    broken: str | None = None
    hold: asyncio.Event | None = None


@dataclass
class _Referrer:
    descriptor: dict[str, Any]
    # What a filtering upstream matches `artifactType` against (the descriptor may not
    # say it: the upstream may know it from the referrer's config).
    matched_type: str | None


@dataclass
class ReferrersUpstream:
    """The fake registry; tests run it on a ``LoopThread`` and set its table."""

    server: FakeServer = field(init=False)
    _table: dict[tuple[str, str], list[_Referrer]] = field(default_factory=dict)
    _behaviour: dict[str, Behaviour] = field(default_factory=dict)
    _loop: LoopThread | None = None

    def __post_init__(self) -> None:
        self.server = FakeServer("referrers-upstream", self._handle)

    # -- lifecycle (from the test's thread) -------------------------------------------

    def start(self, loop: LoopThread) -> ReferrersUpstream:
        self._loop = loop
        loop.run(self.server.up_async())
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.run(self.server.down_async())

    def down(self) -> None:
        assert self._loop is not None
        self._loop.run(self.server.down_async())

    def up(self) -> None:
        assert self._loop is not None
        self._loop.run(self.server.up_async())

    @property
    def url(self) -> str:
        return self.server.url

    # -- what tests set and read -------------------------------------------------------

    def add(
        self,
        repository: str,
        subject: str,
        found: dict[str, Any],
        matched_type: str | None = None,
    ) -> None:
        """List `found` as a referrer of `subject` in `repository`."""
        matched = matched_type or found.get("artifactType")
        self._call(
            lambda: self._table.setdefault((repository, subject), []).append(
                _Referrer(found, matched)
            )
        )

    def behave(self, repository: str, **changes: Any) -> Behaviour:
        """Set how `repository`'s requests are answered (fields of ``Behaviour``)."""

        def update() -> Behaviour:
            behaviour = self._behaviour.setdefault(repository, Behaviour())
            for name, value in changes.items():
                setattr(behaviour, name, value)
            return behaviour

        behaviour: Behaviour = self._call(update)
        return behaviour

    def hold(self, repository: str) -> asyncio.Event:
        """Make `repository`'s referrers answers wait; set the event (``release``) to go."""
        assert self._loop is not None
        event = self._loop.call(asyncio.Event)
        self.behave(repository, hold=event)
        return event

    def release(self, event: asyncio.Event) -> None:
        assert self._loop is not None
        self._loop.call(event.set)

    def referrers_requests(self, repository: str) -> list[Seen]:
        """The referrers GETs received for `repository`."""
        return self.server.requests(f"/v2/{repository}/referrers/")

    def _call(self, fn: Any) -> Any:
        # The table belongs to the server's loop: changed there, between requests.
        return self._loop.call(fn) if self._loop is not None else fn()

    # -- the server --------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path in ("/v2", "/v2/"):
            return web.json_response({})
        if "/referrers/" in path and request.method in ("GET", "HEAD"):
            repository, _, subject = path[len("/v2/") :].rpartition("/referrers/")
            return await self._referrers(request, repository, subject)
        if "/manifests/" in path and request.method == "PUT":
            repository = path[len("/v2/") :].rpartition("/manifests/")[0]
            return await self._put_manifest(request, repository)
        error = {"errors": [{"code": "NAME_UNKNOWN", "message": "no such thing here"}]}
        return web.json_response(error, status=404)

    async def _referrers(
        self, request: web.Request, repository: str, subject: str
    ) -> web.StreamResponse:
        behaviour = self._behaviour.get(repository, Behaviour())
        if behaviour.hold is not None:
            await behaviour.hold.wait()
        if behaviour.broken is not None:
            return _broken(behaviour.broken, request)
        wanted = request.query.get("artifactType")
        listed = self._table.get((repository, subject), [])
        headers: dict[str, str] = {}
        if wanted and behaviour.filters:
            listed = [r for r in listed if r.matched_type == wanted]
            headers["OCI-Filters-Applied"] = "artifactType"
        manifests = [r.descriptor for r in listed]
        if behaviour.page_size is not None:
            start = int(request.query.get("next", "0"))
            end = start + behaviour.page_size
            if end < len(manifests):
                query = f"next={end}" + (f"&artifactType={wanted}" if wanted else "")
                headers["Link"] = f'<{request.path}?{query}>; rel="next"'
            manifests = manifests[start:end]
        return _index(manifests, headers)

    async def _put_manifest(self, request: web.Request, repository: str) -> web.StreamResponse:
        body = await request.read()
        digest = sha256(body)
        document = json.loads(body)
        headers = {"Docker-Content-Digest": digest}
        subject = document.get("subject")
        if isinstance(subject, dict):
            artifact_type = document.get("artifactType")
            found: dict[str, Any] = {"mediaType": MANIFEST, "digest": digest, "size": len(body)}
            if isinstance(artifact_type, str):
                found["artifactType"] = artifact_type
            self._table.setdefault((repository, subject["digest"]), []).append(
                _Referrer(found, artifact_type if isinstance(artifact_type, str) else None)
            )
            headers["OCI-Subject"] = subject["digest"]
        return web.Response(status=201, headers=headers)


def _index(manifests: list[dict[str, Any]], headers: dict[str, str]) -> web.Response:
    body = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests})
    response = web.Response(text=body, headers=headers)
    response.content_type = INDEX
    return response


def _broken(how: str, request: web.Request) -> web.Response:
    if how == "not_json":
        return web.Response(body=b"<html>referrers</html>", content_type=INDEX)
    if how == "not_an_index":
        return web.Response(text='{"schemaVersion": 2, "manifests": "none"}', content_type=INDEX)
    if how == "content_type":
        response = _index([descriptor("typed", "application/x")], {})
        response.content_type = MANIFEST
        return response
    if how == "media_type":
        body = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "manifests": []})
        return web.Response(text=body, content_type=INDEX)
    if how == "bad_descriptor":
        bad = {"mediaType": MANIFEST, "digest": "sha256:../../etc/passwd", "size": 1}
        return _index([bad], {})
    if how == "huge":
        padding = {"padding": "x" * (5 * 1024 * 1024)}
        return _index([{**descriptor("huge", "application/x"), "annotations": padding}], {})
    if how == "endless_pages":
        page = int(request.query.get("page", "0")) + 1
        link = f'<{request.path}?page={page}>; rel="next"'
        return _index([descriptor(f"page-{page}", "application/x")], {"Link": link})
    raise AssertionError(f"unknown breakage {how!r}")
