"""An in-memory upstream registry implementing `proxy.upstream.api.Registry`, counting calls.

The in-process tier injects it at the composition root (`build_services(settings,
upstreams=...)`), so the gate's real handlers, decision layer and pull path run against
it with no socket to any upstream. Every call is counted by method name (`calls`), so a
test can say "policy refused: the upstream was never asked" or "the second pull was a
hit: no blob GET". A blob can be made to break after a number of bytes (`break_after`)
to show what a failing fill does to a client.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass

from multidict import CIMultiDict

from proxy.errors import BlobUnknown, ManifestUnknown, NameUnknown, Unsupported, UpstreamUnavailable
from proxy.names.references import Repository
from proxy.upstream.api import BlobDownload, Kind, ReferrersPage, Registry, TagPage, Written

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
CHUNK = 64 * 1024


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Image:
    """What `FakeRegistry.add_image` stored: the manifest and its blobs' digests."""

    manifest: bytes
    digest: str
    config: str
    layers: tuple[str, ...]


class FakeRegistry:
    """One upstream registry held in memory; `calls` counts what the gate asked."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.calls: Counter[str] = Counter()
        self.blobs: dict[tuple[str, str], bytes] = {}
        self.manifests: dict[tuple[str, str], bytes] = {}  # (path, digest) -> body
        self.tags: dict[tuple[str, str], str] = {}  # (path, tag) -> digest
        self.break_after: dict[str, int] = {}  # digest -> bytes sent before failing

    @property
    def name(self) -> str:
        return self._name

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    # --- content -----------------------------------------------------------------------

    def add_blob(self, path: str, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[(path, digest)] = data
        return digest

    def add_image(self, path: str, tag: str, layers: Sequence[bytes]) -> Image:
        """An OCI image of `layers` under `path:tag`."""
        config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
        config_digest = self.add_blob(path, config)
        layer_digests = tuple(self.add_blob(path, layer) for layer in layers)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [
                    {"mediaType": OCI_LAYER, "digest": d, "size": len(layer)}
                    for d, layer in zip(layer_digests, layers, strict=True)
                ],
            }
        ).encode()
        digest = sha256(manifest)
        self.manifests[(path, digest)] = manifest
        self.tags[(path, tag)] = digest
        return Image(manifest, digest, config_digest, layer_digests)

    def _manifest(self, repository: Repository, reference: str) -> tuple[str, bytes]:
        digest = self.tags.get((repository.path, reference), reference)
        body = self.manifests.get((repository.path, digest))
        if body is None:
            raise ManifestUnknown(f"not found on upstream {self.name}")
        return digest, body

    def _blob(self, repository: Repository, digest: str) -> bytes:
        data = self.blobs.get((repository.path, digest))
        if data is None:
            raise BlobUnknown(f"not found on upstream {self.name}")
        return data

    # --- Registry ----------------------------------------------------------------------

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def manifest_deadline(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()

    async def head_manifest(
        self, repository: Repository, reference: str, accept: Sequence[str]
    ) -> Mapping[str, str]:
        self.calls["head_manifest"] += 1
        digest, body = self._manifest(repository, reference)
        return CIMultiDict(
            {
                "Docker-Content-Digest": digest,
                "Content-Type": OCI_MANIFEST,
                "Content-Length": str(len(body)),
            }
        )

    async def get_manifest(
        self, repository: Repository, reference: str, accept: Sequence[str], limit: int
    ) -> tuple[Mapping[str, str], bytes]:
        self.calls["get_manifest"] += 1
        _, body = self._manifest(repository, reference)
        return CIMultiDict({"Content-Type": OCI_MANIFEST}), body

    async def manifest_exists(
        self, repository: Repository, reference: str, accept: Sequence[str]
    ) -> bool:
        self.calls["manifest_exists"] += 1
        try:
            self._manifest(repository, reference)
        except ManifestUnknown:
            return False
        return True

    async def head_blob(self, repository: Repository, digest: str) -> int | None:
        self.calls["head_blob"] += 1
        return len(self._blob(repository, digest))

    @contextlib.asynccontextmanager
    async def open_blob(self, repository: Repository, digest: str) -> AsyncIterator[BlobDownload]:
        self.calls["open_blob"] += 1
        data = self._blob(repository, digest)
        yield BlobDownload(len(data), self._chunks(data, self.break_after.get(digest)))

    async def _chunks(self, data: bytes, break_after: int | None) -> AsyncIterator[bytes]:
        end = len(data) if break_after is None else break_after
        for start in range(0, end, CHUNK):
            yield data[start : min(start + CHUNK, end)]
        if break_after is not None:
            raise UpstreamUnavailable(f"upstream {self.name} failed while sending a blob")

    async def repository_exists(self, repository: Repository) -> bool:
        self.calls["repository_exists"] += 1
        return any(path == repository.path for path, _ in self.tags)

    async def tag_page(
        self, repository: Repository, query: Sequence[tuple[str, str]], cap: int
    ) -> TagPage:
        self.calls["tag_page"] += 1
        tags = sorted(tag for path, tag in self.tags if path == repository.path)
        if not tags:
            raise NameUnknown(f"not found on upstream {self.name}")
        body = bytearray(json.dumps({"name": repository.path, "tags": tags}).encode())
        return TagPage(body if len(body) <= cap else None, None)

    async def referrers(
        self,
        repository: Repository,
        digest: str,
        query: Sequence[tuple[str, str]],
        budget: int,
    ) -> ReferrersPage | None:
        self.calls["referrers"] += 1
        return None

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
        self.calls["forward"] += 1
        raise Unsupported("the fake upstream takes no writes")

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
        self.calls["forward_session"] += 1
        raise Unsupported("the fake upstream takes no writes")


def _implements(registry: FakeRegistry) -> Registry:
    # mypy checks here that the fake keeps up with the protocol.
    return registry
