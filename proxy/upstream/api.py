"""An upstream registry in OCI terms: what the pull and push paths may ask of one.

Owns the `Registry` protocol and the values it answers with. The pull path (manifests,
blobs, tag lists, referrers), the push path (uploads, manifest PUTs, deletes) and the
referrers fallback use an upstream only through it. `UpstreamClient` implements it over
HTTP and is the one place that builds `/v2/` URLs, authenticates and maps upstream
failures onto the gate's OCI errors; tests implement it in memory (a counting fake), so
the pull path is tested without sockets.

Failures are raised as the gate's `RegistryError`s (`BlobUnknown`, `ManifestUnknown`,
`Denied`, `TooManyRequests`, `UpstreamUnavailable`, `UpstreamTimeout`...), never as
transport exceptions.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from multidict import CIMultiDict

from proxy.names.references import Repository

Kind = Literal["manifest", "blob", "tags", "upload", "referrers", "ping"]
"""What an exchange is about; chooses the error a 404 maps to."""


@dataclass(frozen=True, slots=True)
class BlobDownload:
    """An upstream blob GET that answered: its length (if sent) and its body.

    Iterating `chunks` raises UpstreamUnavailable/UpstreamTimeout when the transfer
    breaks. The body is valid while the `open_blob` context is open.
    """

    size: int | None
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True, slots=True)
class TagPage:
    """One page of an upstream tag list: its raw body (None: larger than the cap asked
    for) and the query of the next page the upstream announced (None: the last)."""

    body: bytearray | None
    next_query: list[tuple[str, str]] | None


# The OCI 1.1 header an upstream (and the gate) sets when it applied a referrers filter.
FILTERS_APPLIED = "OCI-Filters-Applied"


@dataclass(frozen=True, slots=True)
class ReferrersPage:
    """One page of an upstream's referrers API answer, read within a byte budget."""

    body: bytes
    content_type: str | None
    # `OCI-Filters-Applied` values, as sent (each may be a comma-separated list).
    filters_applied: list[str]
    # The query of the next page (`Link: rel="next"`), only ever used against the same
    # referrers path of the same upstream.
    next_query: list[tuple[str, str]] | None


@dataclass(slots=True)
class Written:
    """An upstream's answer to a forwarded write: its status and headers (small body)."""

    status: int
    headers: Mapping[str, str] = field(default_factory=CIMultiDict)


class Registry(Protocol):
    """One upstream registry, in OCI Distribution terms."""

    @property
    def name(self) -> str:
        """The registry name (what client-facing messages call the upstream)."""
        ...

    async def start(self) -> None:
        """Open connections (before the first request)."""
        ...

    async def close(self) -> None:
        """Close connections (after the last request)."""
        ...

    def manifest_deadline(self) -> AbstractAsyncContextManager[None]:
        """The most one manifest exchange may take (UpstreamTimeout past it)."""
        ...

    # --- manifests ---------------------------------------------------------------------

    async def head_manifest(
        self, repository: Repository, reference: str, accept: Sequence[str]
    ) -> Mapping[str, str]:
        """HEAD a manifest: the response headers (`Docker-Content-Digest`, `Content-Type`,
        `Content-Length`, as the upstream sent them)."""
        ...

    async def get_manifest(
        self, repository: Repository, reference: str, accept: Sequence[str], limit: int
    ) -> tuple[Mapping[str, str], bytes]:
        """GET a manifest: headers and body (UpstreamUnavailable past `limit` bytes)."""
        ...

    async def manifest_exists(
        self, repository: Repository, reference: str, accept: Sequence[str]
    ) -> bool:
        """Whether the manifest exists (HEAD): False only on 404."""
        ...

    # --- blobs -------------------------------------------------------------------------

    async def head_blob(self, repository: Repository, digest: str) -> int | None:
        """HEAD a blob: its `Content-Length` (None when the upstream sent none)."""
        ...

    def open_blob(
        self, repository: Repository, digest: str
    ) -> AbstractAsyncContextManager[BlobDownload]:
        """GET a blob (redirects followed to allowed hosts); entering raises when the
        upstream does not answer with the blob."""
        ...

    # --- tags and referrers ------------------------------------------------------------

    async def repository_exists(self, repository: Repository) -> bool:
        """Whether the repository exists (its tag list answers): False only on 404."""
        ...

    async def tag_page(
        self, repository: Repository, query: Sequence[tuple[str, str]], cap: int
    ) -> TagPage:
        """One page of the tag list (`query`: the upstream's own paging parameters)."""
        ...

    async def referrers(
        self,
        repository: Repository,
        digest: str,
        query: Sequence[tuple[str, str]],
        budget: int,
    ) -> ReferrersPage | None:
        """One page of the referrers API (`query`: `artifactType`, or the previous page's
        next query), its body at most `budget` bytes; None when the upstream has no
        referrers API (404)."""
        ...

    # --- writes ------------------------------------------------------------------------

    async def forward(
        self,
        method: str,
        repository: Repository,
        endpoint: str,
        *,
        kind: Kind,
        actions: tuple[str, ...],
        query: Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        body: bytes | AsyncIterable[bytes] | None = None,
    ) -> Written:
        """Forward a write to `/v2/<repository>/<endpoint>` (`blobs/uploads/`,
        `manifests/<reference>`, `blobs/<digest>`); raises the mapped error on failure."""
        ...

    async def forward_session(
        self,
        method: str,
        repository: Repository,
        session_path: str,
        *,
        query: Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        body: bytes | AsyncIterable[bytes] | None = None,
        check: bool = True,
    ) -> Written:
        """Forward a request of an upload session at the path the upstream gave it (its
        `Location`); with `check` False the status is returned whatever it is."""
        ...
