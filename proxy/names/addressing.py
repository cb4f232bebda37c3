"""Which upstream and repository a `/v2/...` request addresses (pure).

One port serves three addressing modes (design §2), tried in this order:
`?ns=<registry>` (containerd mirrors; a lookup key, never a host to dial), a path prefix
(`/v2/quay.io/org/app/...`: the first component has a `.` or `:` or is `localhost`), or a
short name to be resolved by the search list. A registry outside the upstream table is
refused here, before any DNS lookup or connection.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from proxy.errors import NameInvalid, NameUnknown
from proxy.names.references import (
    Repository,
    looks_like_registry,
    validate_name,
    validate_registry,
)

RouteKind = Literal["manifest", "blob", "upload_start", "upload", "tags", "referrers"]
Mode = Literal["ns", "prefix", "short"]

_ROUTES: tuple[tuple[RouteKind, re.Pattern[str]], ...] = (
    ("manifest", re.compile(r"(?P<name>.+)/manifests/(?P<ref>[^/]+)")),
    ("upload_start", re.compile(r"(?P<name>.+)/blobs/uploads/?")),
    ("upload", re.compile(r"(?P<name>.+)/blobs/uploads/(?P<ref>[^/]+)")),
    ("blob", re.compile(r"(?P<name>.+)/blobs/(?P<ref>[^/]+)")),
    ("tags", re.compile(r"(?P<name>.+)/tags/list")),
    ("referrers", re.compile(r"(?P<name>.+)/referrers/(?P<ref>[^/]+)")),
)


@dataclass(frozen=True, slots=True)
class V2Route:
    """An OCI endpoint with the name as the client wrote it."""

    kind: RouteKind
    name: str
    ref: str | None


def parse_v2_path(tail: str) -> V2Route | None:
    """Split the part of the path after `/v2/` into endpoint, name and reference."""
    for kind, pattern in _ROUTES:
        match = pattern.fullmatch(tail)
        if match is not None:
            return V2Route(kind, match.group("name"), match.groupdict().get("ref"))
    return None


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: a fully-qualified repository, or a short name to resolve."""

    mode: Mode
    requested: str
    repository: Repository | None
    short_name: str | None = None
    ns: str | None = None


def _unknown_registry(registry: str, known: Collection[str]) -> NameUnknown:
    return NameUnknown(
        f"registry {registry} is not configured on this gate",
        detail={"registry": registry, "configured": sorted(known)},
    )


def locate(name: str, ns: str | None, known_registries: Collection[str]) -> Target:
    """Address a request name; raises NameInvalid / NameUnknown before any network I/O."""
    if ns is not None:
        registry = validate_registry(ns)
        if registry not in known_registries:
            raise _unknown_registry(registry, known_registries)
        validate_name(name)
        return Target("ns", name, Repository.of(registry, name), ns=ns)
    first, _, rest = name.partition("/")
    if rest and looks_like_registry(first):
        registry = validate_registry(first)
        if registry not in known_registries:
            raise _unknown_registry(registry, known_registries)
        validate_name(rest)
        return Target("prefix", name, Repository.of(registry, rest))
    if not rest and looks_like_registry(first) and first != "localhost":
        # A bare host with no repository is not a name the grammar allows.
        raise NameInvalid("invalid repository name", detail={"name": name[:300]})
    validate_name(name)
    return Target("short", name, None, short_name=name)
