"""Deterministic test images, built without a container engine, pushed with skopeo.

Owns the content that upstream registries are seeded with: an OCI image-layout writer,
reproducible tar+gzip layers and configs (fixed mtimes, owners and seeded random data,
so digests are stable for a given zlib), a few image recipes (multi-arch index,
single-arch manifest, per-registry "origin" images, a big random layer), and ``push()``,
which copies layout refs into a registry with ``skopeo copy`` and returns a structured
summary of exactly what the registry now serves, byte for byte.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tests.support.registry_client import RegistryClient

__all__ = [
    "MT_DOCKER_LIST",
    "MT_DOCKER_MANIFEST",
    "MT_OCI_CONFIG",
    "MT_OCI_INDEX",
    "MT_OCI_LAYER_GZIP",
    "MT_OCI_MANIFEST",
    "BlobInfo",
    "Layout",
    "ManifestInfo",
    "PushSpec",
    "PushedRef",
    "SeedSummary",
    "alpine_index",
    "big_image",
    "build_image",
    "build_index",
    "busybox_image",
    "origin_image",
    "push",
    "skopeo_available",
    "tar_bytes",
]

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({MT_OCI_INDEX, MT_DOCKER_LIST})

EPOCH = "2024-01-01T00:00:00Z"
EPOCH_SECONDS = 1704067200
REF_ANNOTATION = "org.opencontainers.image.ref.name"
ORIGIN_LABEL = "gate.origin"

FileSpec = bytes | tuple[bytes, int]  # content, or (content, mode)


# -- OCI image layout ------------------------------------------------------------------


class Layout:
    """A minimal OCI image layout (image-spec image-layout.md): blobs + index.json.

    Doubles as the content store behind ``SeedSummary.blob_bytes``: blobs that skopeo
    creates while converting (Docker schema2 manifests and lists) are added here too.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blobs = path / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self.refs: dict[str, dict[str, Any]] = {}
        self._saved: dict[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.removeprefix("sha256:")

    def add_blob(self, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
        """Store ``data``; returns its descriptor (``extra``: platform, annotations...)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.exists() or path.stat().st_size != len(data):
            # Unique temp name + rename: pushes to several registries run in threads.
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def add_json(self, obj: Any, media_type: str, **extra: Any) -> dict[str, Any]:
        data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        return self.add_blob(data, media_type, **extra)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def tag(self, ref: str, descriptor: Mapping[str, Any]) -> str:
        """Name ``descriptor`` ``ref`` in index.json (what ``oci:PATH:ref`` resolves)."""
        desc = {k: v for k, v in descriptor.items() if k != "platform"}
        desc["annotations"] = {REF_ANNOTATION: ref}
        with self._lock:
            self.refs[ref] = desc
        return ref

    def save(self) -> None:
        """Write index.json if refs changed since the last save."""
        with self._lock:
            if self._saved == self.refs:
                return
            index = {
                "schemaVersion": 2,
                "mediaType": MT_OCI_INDEX,
                "manifests": [self.refs[k] for k in sorted(self.refs)],
            }
            tmp = self.path / "index.json.tmp"
            tmp.write_text(json.dumps(index, indent=1))
            tmp.replace(self.path / "index.json")
            self._saved = {k: dict(v) for k, v in self.refs.items()}

    def digest(self, ref: str) -> str:
        return str(self.refs[ref]["digest"])


# -- deterministic content ---------------------------------------------------------------


def tar_bytes(files: Mapping[str, FileSpec]) -> bytes:
    """An uncompressed tar of ``files`` (parent directories implied), byte-reproducible."""
    buf = io.BytesIO()
    dirs = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(dirs | set(files)):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH_SECONDS, 0, 0, "", ""
            spec = files.get(name)
            if spec is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                continue
            data, mode = spec if isinstance(spec, tuple) else (spec, 0o644)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_image(
    layout: Layout,
    arch: str,
    layers: Sequence[Mapping[str, FileSpec]],
    *,
    variant: str | None = None,
    labels: Mapping[str, str] | None = None,
    compresslevel: int = 6,
) -> dict[str, Any]:
    """Write layers, config and an OCI manifest; returns the manifest descriptor
    (with ``platform``, ready to be listed in an index)."""
    layer_descs, diff_ids = [], []
    for files in layers:
        raw = tar_bytes(files)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        # mtime=0 keeps the gzip header free of the build time.
        gz = gzip.compress(raw, compresslevel=compresslevel, mtime=0)
        layer_descs.append(layout.add_blob(gz, MT_OCI_LAYER_GZIP))
    platform: dict[str, str] = {"architecture": arch, "os": "linux"}
    if variant:
        platform["variant"] = variant
    config = {
        **platform,
        "created": EPOCH,
        "config": {
            "Cmd": ["/bin/sh"],
            "Env": ["PATH=/usr/bin:/bin"],
            "Labels": dict(labels or {}),
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": EPOCH, "created_by": "tests/support/images.py"}] * len(layers),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": layout.add_json(config, MT_OCI_CONFIG),
        "layers": layer_descs,
    }
    return layout.add_json(manifest, MT_OCI_MANIFEST, platform=platform)


def build_index(layout: Layout, manifests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": list(manifests)}
    return layout.add_json(index, MT_OCI_INDEX)


def _rootfs(name: str, version: str, arch: str, origin: str | None) -> dict[str, FileSpec]:
    files: dict[str, FileSpec] = {
        "etc/os-release": f'NAME="{name}"\nVERSION_ID={version}\nARCH={arch}\n'.encode(),
        f"etc/{name}-release": f"{version}\n".encode(),
        "bin/hello": (f"#!/bin/sh\necho hello from {name} {version} {arch}\n".encode(), 0o755),
    }
    if origin is not None:
        files["etc/gate-origin"] = f"{origin}\n".encode()
    return files


# -- recipes: each builds into the layout and returns the layout ref name ----------------


def alpine_index(layout: Layout, origin: str | None = None) -> str:
    """An alpine-like OCI index: linux/amd64 + linux/arm64/v8 (the docker.io shape).

    With ``origin`` the images carry the ``gate.origin`` label and an
    ``/etc/gate-origin`` file, so the same repo:tag differs between registries.
    """
    labels = {ORIGIN_LABEL: origin} if origin else {}
    children = [
        build_image(layout, "amd64", [_rootfs("alpine", "3.19.0", "amd64", origin)], labels=labels),
        build_image(
            layout,
            "arm64",
            [_rootfs("alpine", "3.19.0", "arm64", origin)],
            variant="v8",
            labels=labels,
        ),
    ]
    return layout.tag(f"alpine-3.19-{origin or 'plain'}", build_index(layout, children))


def busybox_image(layout: Layout) -> str:
    """A single-arch OCI manifest with two gzip layers (linux/amd64)."""
    desc = build_image(
        layout, "amd64", [_rootfs("busybox", "1.36", "amd64", None), {"etc/motd": b"layer 2\n"}]
    )
    return layout.tag("busybox-1.36", desc)


def origin_image(layout: Layout, origin: str, name: str = "origin") -> str:
    """A single-arch image whose label and ``/origin`` file name ``origin`` (and whose
    ``/images/<name>`` names the image, apart from ``/origin`` so both unpack): proves
    which upstream served a pull. ``name`` keeps different repos' images distinct."""
    desc = build_image(
        layout,
        "amd64",
        [{"origin": f"{origin}\n".encode(), f"images/{name}": f"{name} from {origin}\n".encode()}],
        labels={ORIGIN_LABEL: origin, "gate.image": name},
    )
    return layout.tag(f"{name}-{origin}", desc)


def big_image(layout: Layout, mib: int) -> str:
    """One layer holding ``mib`` MiB of seeded random bytes (throughput tests)."""
    data = random.Random(mib).randbytes(mib << 20)
    # Level 0: random data does not compress, and stored deflate blocks build fast.
    desc = build_image(layout, "amd64", [{"data/random.bin": data}], compresslevel=0)
    return layout.tag(f"big-{mib}m", desc)


# -- pushing and the summary ---------------------------------------------------------------


@dataclass(frozen=True)
class PushSpec:
    """Copy layout ref ``source`` to ``repo:tag``, then PUT the same manifest bytes
    under each of ``extra_tags`` (cheap: no blob traffic).

    ``format="oci"`` keeps the layout's bytes (``--preserve-digests``); ``"v2s2"`` has
    skopeo convert to Docker schema2 (an index becomes a Docker manifest list).
    """

    source: str
    repo: str
    tag: str
    format: Literal["oci", "v2s2"] = "oci"
    extra_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class ManifestInfo:
    """A manifest exactly as the registry serves it."""

    digest: str
    media_type: str
    raw: bytes
    config: BlobInfo | None = None  # image manifests only
    layers: tuple[BlobInfo, ...] = ()
    children: tuple[ManifestInfo, ...] = ()  # indexes / manifest lists only
    platform: Mapping[str, str] | None = None  # from the parent index entry

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def blobs(self) -> tuple[BlobInfo, ...]:
        """Config and layers of this manifest (not of children)."""
        return ((self.config,) if self.config else ()) + self.layers

    def all_blobs(self) -> tuple[BlobInfo, ...]:
        """Every blob reachable from this manifest, children included, deduplicated."""
        seen: dict[str, BlobInfo] = {b.digest: b for b in self.blobs}
        for child in self.children:
            seen.update((b.digest, b) for b in child.all_blobs())
        return tuple(seen.values())

    def json(self) -> Any:
        return json.loads(self.raw)

    def child(self, architecture: str) -> ManifestInfo:
        for c in self.children:
            if c.platform and c.platform.get("architecture") == architecture:
                return c
        raise KeyError(architecture)


@dataclass(frozen=True)
class PushedRef:
    host: str
    repo: str
    tag: str
    manifest: ManifestInfo

    @property
    def reference(self) -> str:
        """``HOST/repo:tag``."""
        return f"{self.host}/{self.repo}:{self.tag}"

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def media_type(self) -> str:
        return self.manifest.media_type

    @property
    def raw(self) -> bytes:
        return self.manifest.raw


@dataclass
class SeedSummary:
    """What one registry was seeded with, keyed by ``repo:tag``."""

    host: str
    layout: Layout
    refs: dict[str, PushedRef] = field(default_factory=dict)

    def __getitem__(self, repo_tag: str) -> PushedRef:
        return self.refs[repo_tag]

    def __contains__(self, repo_tag: object) -> bool:
        return repo_tag in self.refs

    def tags(self, repo: str) -> list[str]:
        return sorted(r.tag for r in self.refs.values() if r.repo == repo)

    def repos(self) -> list[str]:
        return sorted({r.repo for r in self.refs.values()})

    def blob_bytes(self, digest: str) -> bytes:
        return self.layout.read_blob(digest)


def skopeo_available() -> bool:
    return shutil.which("skopeo") is not None


def _skopeo(layout: Layout, *args: str) -> None:
    # An empty registries.conf: the host's mirrors/short-names must not affect seeding.
    conf = layout.path.parent / "seed-registries.conf"
    if not conf.exists():
        # Written aside and renamed: pushes to several registries run in threads.
        tmp = conf.with_name(f"{conf.name}.{threading.get_ident()}.tmp")
        tmp.write_text("# empty on purpose\n")
        tmp.replace(conf)
    env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}
    cmd = ["skopeo", "--insecure-policy", *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        shown = " ".join("--dest-creds=***" if a.startswith("--dest-creds=") else a for a in cmd)
        raise RuntimeError(f"{shown} failed ({proc.returncode}):\n{proc.stderr}")


def _describe(
    client: RegistryClient,
    layout: Layout,
    repo: str,
    reference: str,
    platform: Mapping[str, str] | None = None,
) -> ManifestInfo:
    """Fetch a manifest (and, recursively, its children) as served; make sure every blob
    it references is in the layout, fetching blobs skopeo created during conversion."""
    resp = client.get_manifest(repo, reference)
    doc = json.loads(resp.body)
    media_type = doc.get("mediaType") or resp.headers.get_content_type()
    if media_type in INDEX_TYPES:
        children = tuple(
            _describe(client, layout, repo, m["digest"], m.get("platform"))
            for m in doc["manifests"]
        )
        return ManifestInfo(
            resp.digest, media_type, resp.body, children=children, platform=platform
        )
    blobs = [doc["config"], *doc.get("layers", [])]
    for b in blobs:
        if not layout.has_blob(b["digest"]):
            layout.add_blob(client.get_blob(repo, b["digest"]), b["mediaType"])
    infos = [BlobInfo(b["digest"], int(b["size"]), b["mediaType"]) for b in blobs]
    return ManifestInfo(
        resp.digest,
        media_type,
        resp.body,
        config=infos[0],
        layers=tuple(infos[1:]),
        platform=platform,
    )


def push(
    layout: Layout,
    registry_host: str,
    plan: Iterable[PushSpec],
    *,
    credentials: tuple[str, str] | None = None,
    summary: SeedSummary | None = None,
) -> SeedSummary:
    """Push every spec of ``plan`` to ``registry_host`` (``127.0.0.1:PORT``, plain HTTP).

    Returns (or extends) a summary of what the registry serves for each pushed tag,
    verified against the layout where digests were preserved.
    """
    layout.save()
    if summary is None:
        summary = SeedSummary(registry_host, layout)
    client = RegistryClient(registry_host, credentials)
    creds = [f"--dest-creds={':'.join(credentials)}"] if credentials else ["--dest-no-creds"]
    for spec in plan:
        keep = ["--preserve-digests"] if spec.format == "oci" else ["--format", "v2s2"]
        _skopeo(
            layout,
            "copy",
            "--quiet",
            "--all",
            "--dest-tls-verify=false",
            *creds,
            *keep,
            f"oci:{layout.path}:{spec.source}",
            f"docker://{registry_host}/{spec.repo}:{spec.tag}",
        )
        info = _describe(client, layout, spec.repo, spec.tag)
        if spec.format == "oci" and info.digest != layout.digest(spec.source):
            raise RuntimeError(
                f"{registry_host}/{spec.repo}:{spec.tag} is {info.digest}, "
                f"layout has {layout.digest(spec.source)}"
            )
        summary.refs[f"{spec.repo}:{spec.tag}"] = PushedRef(
            registry_host, spec.repo, spec.tag, info
        )
        for tag in spec.extra_tags:
            digest = client.put_manifest(spec.repo, tag, info.raw, info.media_type)
            if digest != info.digest:
                raise RuntimeError(f"PUT {spec.repo}:{tag} stored {digest}, sent {info.digest}")
            summary.refs[f"{spec.repo}:{tag}"] = PushedRef(registry_host, spec.repo, tag, info)
    return summary
