"""Reference grammar: repository names, tags, digests, registry hosts, normalisation.

Pure: no I/O. Everything a client sends is checked here before any path or upstream URL
is built from it (OCI distribution-spec grammar; Docker Hub normalisation as in
distribution/reference).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.errors import DigestInvalid, NameInvalid, TagInvalid

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_KNOWN_DIGEST_HEX = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[a-f0-9]+")
_HOST_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*(?::[0-9]{{1,5}})?")


def validate_name(name: str) -> str:
    """Return `name` if it is a valid repository path, else raise NameInvalid."""
    if not name or len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise NameInvalid("invalid repository name", detail={"name": name[:300]})
    return name


def validate_tag(tag: str) -> str:
    """Return `tag` if it matches the OCI tag grammar, else raise TagInvalid."""
    if not _TAG_RE.fullmatch(tag):
        raise TagInvalid("invalid tag", detail={"tag": tag[:200]})
    return tag


def validate_digest(digest: str) -> str:
    """Return `digest` if well formed (sha256/sha512 strictly), else raise DigestInvalid."""
    match = _DIGEST_RE.fullmatch(digest)
    if match is None:
        raise DigestInvalid("invalid digest", detail={"digest": digest[:200]})
    algorithm, encoded = match.groups()
    expected = _KNOWN_DIGEST_HEX.get(algorithm)
    if expected is None:
        # Only algorithms the gate can verify are accepted: an unverifiable digest would
        # let unverified content into the cache.
        raise DigestInvalid("unsupported digest algorithm", detail={"digest": digest[:200]})
    if len(encoded) != expected or not _HEX_RE.fullmatch(encoded):
        raise DigestInvalid("invalid digest", detail={"digest": digest[:200]})
    return digest


def is_digest(reference: str) -> bool:
    """Whether a manifest reference is a digest (contains ':') rather than a tag."""
    return ":" in reference


def validate_reference(reference: str) -> str:
    """Validate a manifest reference: a tag or a digest."""
    return validate_digest(reference) if is_digest(reference) else validate_tag(reference)


def looks_like_registry(component: str) -> bool:
    """Whether the first path component names a registry (distribution/reference rule)."""
    return "." in component or ":" in component or component == "localhost"


def normalize_registry(host: str) -> str:
    """Canonical registry name: lower-case; Docker Hub's aliases become `docker.io`."""
    host = host.lower()
    if host in DOCKER_HUB_ALIASES:
        return DOCKER_HUB
    return host


def validate_registry(host: str) -> str:
    """Check the syntax of a registry host[:port]; the upstream table decides the rest."""
    if len(host) > MAX_NAME_LENGTH or not _HOST_RE.fullmatch(host):
        raise NameInvalid("invalid registry name", detail={"registry": host[:300]})
    return normalize_registry(host)


def normalize_repository(registry: str, repository: str) -> str:
    """Docker Hub's one-component repositories live under `library/`."""
    if registry == DOCKER_HUB and "/" not in repository:
        return f"library/{repository}"
    return repository


@dataclass(frozen=True, slots=True)
class Repository:
    """A fully-qualified repository: the registry it lives on and its path there."""

    registry: str
    path: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.path}"

    @classmethod
    def of(cls, registry: str, path: str) -> Repository:
        """Build a normalised repository from a registry and a path."""
        registry = normalize_registry(registry)
        return cls(registry, normalize_repository(registry, path))

    def reference(self, ref: str | None) -> str:
        """The full reference string `registry/path:tag` or `registry/path@digest`."""
        if not ref:
            return str(self)
        return f"{self}@{ref}" if is_digest(ref) else f"{self}:{ref}"


@dataclass(frozen=True, slots=True)
class ParsedReference:
    """A user-written image reference split into parts (registry may be None: short)."""

    registry: str | None
    path: str
    tag: str | None
    digest: str | None

    @property
    def ref(self) -> str | None:
        """The manifest reference: digest if any, else tag."""
        return self.digest or self.tag


def parse_reference(text: str) -> ParsedReference:
    """Parse `[registry/]path[:tag][@digest]` as a user writes it (CLI, policy explain)."""
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        validate_digest(digest)
    tag = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], validate_tag(text[colon + 1 :])
    first, _, rest = text.partition("/")
    if rest and looks_like_registry(first):
        registry: str | None = validate_registry(first)
        path = rest
    else:
        registry, path = None, text
    validate_name(path)
    return ParsedReference(registry, path, tag, digest)


def strip_docker_library(path: str) -> str:
    """A Docker daemon mirror request adds `library/` to one-part names: take it away."""
    if path.startswith("library/") and path.count("/") == 1:
        return path.removeprefix("library/")
    return path
