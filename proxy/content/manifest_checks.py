"""What the gate checks in a manifest before serving or caching it (pure).

A manifest fetched by digest must hash to that digest, whatever `Docker-Content-Digest`
says; a body that is both an index and an image manifest, or whose `mediaType`
contradicts its `Content-Type`, is refused (CVE-2021-41190): policy and caching use the
parsed type, never the header alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import UpstreamUnavailable

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)
_HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


def digest_of(body: bytes, algorithm: str = "sha256") -> str:
    """The content digest of bytes (`sha256:<hex>`)."""
    return f"{algorithm}:{_HASHES[algorithm](body).hexdigest()}"


def bare_media_type(content_type: str | None) -> str:
    """A Content-Type without parameters, lower-cased."""
    return (content_type or "").split(";", 1)[0].strip().lower()


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    """A verified manifest: its digest, type, and the digests it references."""

    digest: str
    media_type: str
    size: int
    blobs: tuple[str, ...] = field(default=())
    children: tuple[str, ...] = field(default=())


def _descriptor_digests(items: Any) -> tuple[str, ...]:
    if not isinstance(items, list):
        return ()
    return tuple(
        str(item["digest"]) for item in items if isinstance(item, dict) and "digest" in item
    )


def inspect_manifest(
    body: bytes, content_type: str | None, requested: str | None, upstream: str
) -> ManifestInfo:
    """Verify a manifest from `upstream`; raise a 502 naming the upstream when it is bad.

    `requested` is the digest the client asked for (None for a tag request).
    """
    if len(body) > MAX_MANIFEST_SIZE:
        raise UpstreamUnavailable(f"upstream {upstream} sent a manifest over 4 MiB")
    algorithm = requested.split(":", 1)[0] if requested else "sha256"
    digest = digest_of(body, algorithm)
    if requested is not None and digest != requested:
        raise UpstreamUnavailable(
            f"upstream {upstream} sent a manifest that does not match the requested digest",
            detail={"requested": requested, "received": digest},
        )
    media_type = bare_media_type(content_type)
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: `[[[[...` nested deep
        raise UpstreamUnavailable(f"upstream {upstream} sent a manifest that is not JSON") from exc
    if not isinstance(document, dict):
        raise UpstreamUnavailable(f"upstream {upstream} sent a manifest that is not an object")
    declared = document.get("mediaType")
    if "manifests" in document and ("layers" in document or "config" in document):
        raise UpstreamUnavailable(
            f"upstream {upstream} sent an ambiguous manifest (both index and image)"
        )
    if isinstance(declared, str):
        if media_type in ("", "application/json", "application/octet-stream"):
            media_type = declared
        elif declared != media_type:
            raise UpstreamUnavailable(
                f"upstream {upstream} sent a manifest whose mediaType contradicts Content-Type",
                detail={"content_type": media_type, "media_type": declared},
            )
    blobs: tuple[str, ...] = ()
    config = document.get("config")
    if isinstance(config, dict) and "digest" in config:
        blobs += (str(config["digest"]),)
    blobs += _descriptor_digests(document.get("layers"))
    fs_layers = document.get("fsLayers")
    blobs += tuple(
        str(layer["blobSum"])
        for layer in (fs_layers if isinstance(fs_layers, list) else [])
        if isinstance(layer, dict) and "blobSum" in layer
    )
    children = _descriptor_digests(document.get("manifests"))
    return ManifestInfo(digest, media_type, len(body), blobs, children)
