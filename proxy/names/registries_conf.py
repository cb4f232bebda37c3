"""Reading an existing containers-registries.conf(5) (version 2, TOML) into gate terms (pure).

Owns the parsing, validation and matching semantics of the file podman, skopeo, buildah
and CRI-O read, so an operator can reuse it: `unqualified-search-registries`,
`short-name-mode`, `[aliases]` and `[[registry]]` `prefix` / `location` / `blocked`.
Drop-in files `<file>.d/*.conf` are merged in name order the way containers/image does:
`[[registry]]` entries are keyed by prefix (a later file replaces an entry), a later
`unqualified-search-registries` or `short-name-mode` replaces an earlier one, aliases
merge and an empty alias value deletes one.

Matching follows containers/image `FindRegistry`: among the entries whose prefix matches,
the longest prefix wins. A prefix matches a reference (`registry/path[:tag][@digest]`)
when it equals it, or when the reference continues after it with `/`, `@` or (after a
path) `:`. Unlike containers/image, a host-only prefix does not match the same host with
a port (`example.com` does not match `example.com:5000/x`, a quirk its own code marks
"DON'T RELY"): for the gate they are two upstreams. A wildcard prefix `*.example.com`
matches hosts of any subdomain depth (never `example.com` itself), on any port; it may
carry no port, path or location.

What the gate does with it (documented in the README): `blocked = true` denies every
action on the entry's references; `location` rewrites where pulls are fetched from
(`location + reference[len(prefix):]`, pulls only, as containers/image does);
`insecure`, mirrors and credential helpers are client-side settings the gate ignores
(its upstream table owns TLS and credentials), with a warning for mirrors.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from proxy.errors import RegistryError
from proxy.names.references import (
    Repository,
    looks_like_registry,
    validate_digest,
    validate_name,
    validate_registry,
    validate_tag,
)
from proxy.settings import ConfigError

ShortNameMode = Literal["disabled", "permissive", "enforcing"]
SHORT_NAME_MODES: tuple[ShortNameMode, ...] = ("disabled", "permissive", "enforcing")


class RegistriesConfError(ConfigError):
    """A registries.conf (or one of its drop-ins) is invalid; the message names file and key."""


def drop_in_dir(path: Path) -> Path:
    """The drop-in directory containers/image reads next to a registries.conf."""
    return path.with_name(path.name + ".d")


def registries_conf_files(path: Path) -> list[Path]:
    """The files a registries.conf consists of: itself, then its drop-ins in order."""
    files = [path]
    directory = drop_in_dir(path)
    if directory.is_dir():
        files.extend(sorted(p for p in directory.iterdir() if p.suffix == ".conf"))
    return files


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """One `[[registry]]` table: where it came from, what it matches, what it does."""

    prefix: str
    location: str
    blocked: bool
    source: str
    index: int

    @property
    def wildcard(self) -> bool:
        """Whether the prefix is a `*.example.com` subdomain wildcard."""
        return self.prefix.startswith("*.")

    @property
    def where(self) -> str:
        """`file: registry[i]` for messages."""
        return f"{self.source}: registry[{self.index}]"

    def matches(self, reference: str) -> bool:
        """Whether this entry's prefix matches `registry/path[:tag][@digest]`."""
        prefix = self.prefix
        if self.wildcard:
            host = reference.partition("/")[0].partition(":")[0]
            suffix = prefix[1:]
            return len(host) > len(suffix) and host.endswith(suffix)
        if not reference.startswith(prefix):
            return False
        if len(reference) == len(prefix):
            return True
        boundary = reference[len(prefix)]
        if boundary in "/@":
            return True
        # After a path a ':' starts a tag; right after a bare host it would be a port.
        return boundary == ":" and "/" in prefix

    def rewrite(self, reference: str) -> str:
        """The reference with the matched prefix replaced by `location`."""
        if self.wildcard or not self.location or self.location == self.prefix:
            return reference
        return self.location + reference[len(self.prefix) :]


@dataclass(frozen=True, slots=True)
class RegistriesConf:
    """A loaded registries.conf with its drop-ins merged."""

    sources: tuple[str, ...] = ()
    search: tuple[str, ...] | None = None
    search_source: str | None = None
    short_name_mode: ShortNameMode | None = None
    aliases: Mapping[str, Repository] = field(default_factory=dict)
    alias_sources: Mapping[str, str] = field(default_factory=dict)
    registries: tuple[RegistryEntry, ...] = ()
    warnings: tuple[str, ...] = ()

    def find(self, reference: str) -> RegistryEntry | None:
        """The entry with the longest matching prefix (exact prefixes win ties)."""
        best: RegistryEntry | None = None
        best_key = (-1, False)
        for entry in self.registries:
            if entry.matches(reference):
                key = (len(entry.prefix), not entry.wildcard)
                if key > best_key:
                    best, best_key = entry, key
        return best

    def pull_location(self, repository: Repository) -> Repository:
        """Where a pull of `repository` is fetched from (`location` rewriting).

        Blocked entries do not rewrite: the reference keeps the name the block applies to.
        """
        entry = self.find(str(repository))
        if entry is None or entry.blocked:
            return repository
        rewritten = entry.rewrite(str(repository))
        if rewritten == str(repository):
            return repository
        registry, _, path = rewritten.partition("/")
        return Repository.of(registry, validate_name(path))


def _error(source: str, key: str, message: str) -> RegistriesConfError:
    return RegistriesConfError(f"{source}: {key}: {message}")


def _expect_str(value: object, source: str, key: str) -> str:
    if not isinstance(value, str):
        raise _error(source, key, "expected a string")
    return value


def _expect_bool(value: object, source: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise _error(source, key, "expected true or false")
    return value


def _strip_location(value: str, source: str, key: str) -> str:
    trimmed = value.rstrip("/")
    if trimmed.startswith(("http://", "https://")):
        raise _error(source, key, f"{value!r}: URI schemes are not supported")
    return trimmed


def _check_reference_like(
    value: str, source: str, key: str, *, allow_ref: bool
) -> tuple[str, bool]:
    """Validate `host[:port][/path][:tag|@digest]`; normalise the host; say if a ref is set."""
    name, at, digest = value.partition("@")
    has_ref = bool(at)
    try:
        if at:
            validate_digest(digest)
        host, slash, path = name.partition("/")
        tag = ""
        if slash and ":" in path.rpartition("/")[2]:
            path, _, tag = path.rpartition(":")
            validate_tag(tag)
            has_ref = True
        host = validate_registry(host)
        if slash:
            validate_name(path)
    except RegistryError as exc:
        raise _error(source, key, f"{value!r}: {exc.message}") from exc
    if has_ref and not allow_ref:
        raise _error(source, key, f"{value!r}: a location cannot carry a tag or digest")
    rebuilt = host + (f"/{path}" if slash else "") + (f":{tag}" if tag else "")
    return rebuilt + (f"@{digest}" if at else ""), has_ref


def _parse_entry(raw: object, source: str, index: int, warnings: list[str]) -> RegistryEntry:
    key = f"registry[{index}]"
    if not isinstance(raw, dict):
        raise _error(source, key, "expected a [[registry]] table")
    location = _strip_location(
        _expect_str(raw.get("location", ""), source, f"{key}.location"), source, key
    )
    prefix = _strip_location(
        _expect_str(raw.get("prefix", ""), source, f"{key}.prefix"), source, key
    )
    blocked = _expect_bool(raw.get("blocked", False), source, f"{key}.blocked")
    _expect_bool(raw.get("insecure", False), source, f"{key}.insecure")
    if location:
        location, _ = _check_reference_like(location, source, f"{key}.location", allow_ref=False)
    if not prefix:
        if not location:
            raise _error(source, key, "set location or prefix")
        prefix = location
    if prefix.startswith("*."):
        if any(c in prefix for c in "/@:"):
            raise _error(
                source,
                f"{key}.prefix",
                f"{prefix!r}: a wildcard prefix is a host only, like *.example.com",
            )
        try:
            validate_registry(prefix[2:])
        except RegistryError as exc:
            raise _error(source, f"{key}.prefix", f"{prefix!r}: {exc.message}") from exc
        if location:
            raise _error(
                source, f"{key}.location", "a wildcard prefix cannot be rewritten to a location"
            )
        prefix = "*." + prefix[2:].lower()
    else:
        if not location:
            raise _error(
                source,
                f"{key}.location",
                "location is unset and the prefix is not a wildcard like *.example.com",
            )
        prefix, prefix_has_ref = _check_reference_like(
            prefix, source, f"{key}.prefix", allow_ref=True
        )
        location, _ = _check_reference_like(location, source, f"{key}.location", allow_ref=False)
        if prefix_has_ref:
            # containers/image would splice the location over the tag; the gate only
            # matches such a prefix (for `blocked`), it does not rewrite it.
            name_part = prefix.partition("@")[0]
            if ":" in name_part.rpartition("/")[2]:
                name_part = name_part.rpartition(":")[0]
            if location != name_part:
                raise _error(
                    source,
                    f"{key}.location",
                    "rewriting a prefix that names a tag or digest is not supported",
                )
            location = prefix
        first, slash, rest = prefix.partition("/")
        if first == "docker.io" and slash and "/" not in rest.partition(":")[0]:
            warnings.append(
                f"{source}: {key}: prefix {prefix!r} never matches: Docker Hub names are "
                f"spelled docker.io/library/{rest}"
            )
    if raw.get("mirror"):
        warnings.append(
            f"{source}: {key} ({prefix}): mirrors are ignored; the gate fetches from its "
            "own upstream table"
        )
    return RegistryEntry(prefix, location, blocked, source, index)


def _parse_alias(name: object, value: object, source: str) -> Repository | None:
    key = f"aliases.{name}"
    if not isinstance(name, str) or not name:
        raise _error(source, "aliases", "alias names must be non-empty strings")
    target = _expect_str(value, source, key)
    if ":" in name or "@" in name or looks_like_registry(name.partition("/")[0]):
        raise _error(source, key, "an alias name is a short name: no registry, tag or digest")
    try:
        validate_name(name)
    except RegistryError as exc:
        raise _error(source, key, exc.message) from exc
    if target == "":
        return None  # an empty value deletes an alias set by an earlier file
    return parse_fully_qualified(target, source, key)


def parse_fully_qualified(value: str, source: str, key: str) -> Repository:
    """Parse a fully-qualified repository with no tag or digest (an alias target)."""
    first, slash, rest = value.partition("/")
    if not slash or not looks_like_registry(first):
        raise _error(source, key, f"{value!r} must be fully qualified (registry/repository)")
    if "@" in value or ":" in rest:
        raise _error(source, key, f"{value!r} must not carry a tag or digest")
    try:
        return Repository.of(validate_registry(first), validate_name(rest))
    except RegistryError as exc:
        raise _error(source, key, f"{value!r}: {exc.message}") from exc


def _parse_search(value: object, source: str) -> tuple[str, ...]:
    key = "unqualified-search-registries"
    if not isinstance(value, list):
        raise _error(source, key, "expected an array of registries")
    search: list[str] = []
    for i, item in enumerate(value):
        text = _expect_str(item, source, f"{key}[{i}]").rstrip("/")
        try:
            registry = validate_registry(text)
        except RegistryError as exc:
            raise _error(source, f"{key}[{i}]", f"{text!r}: expected host[:port]") from exc
        if registry not in search:
            search.append(registry)
    return tuple(search)


def _check_blocked_conflicts(entries: Iterable[RegistryEntry], source: str) -> None:
    """containers/image refuses one location listed with different `blocked` values."""
    seen: dict[str, RegistryEntry] = {}
    for entry in entries:
        key = entry.location or entry.prefix
        other = seen.setdefault(key, entry)
        if other.blocked != entry.blocked:
            raise _error(
                source,
                f"registry[{entry.index}].blocked",
                f"registry {key!r} is defined more than once with conflicting 'blocked'",
            )


def parse_registries_conf(text: str, source: str) -> RegistriesConf:
    """Parse one registries.conf document (no drop-ins); `source` names it in errors."""
    return _merge([_parse_layer(text, source)])


def _parse_layer(text: str, source: str) -> _Layer:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistriesConfError(f"{source}: invalid TOML: {exc}") from exc
    if "registries" in raw:
        raise _error(
            source,
            "registries",
            "the version 1 format ([registries.search] ...) is not supported; "
            "convert it to version 2 (unqualified-search-registries, [[registry]])",
        )
    warnings: list[str] = []
    search = None
    if "unqualified-search-registries" in raw:
        search = _parse_search(raw["unqualified-search-registries"], source)
    mode: ShortNameMode | None = None
    if "short-name-mode" in raw:
        value = _expect_str(raw["short-name-mode"], source, "short-name-mode")
        if value not in SHORT_NAME_MODES:
            raise _error(
                source, "short-name-mode", f"{value!r}: expected one of {list(SHORT_NAME_MODES)}"
            )
        mode = value
    raw_registries = raw.get("registry", [])
    if not isinstance(raw_registries, list):
        raise _error(source, "registry", "expected [[registry]] tables")
    entries: list[RegistryEntry] = []
    prefixes: set[str] = set()
    for index, item in enumerate(raw_registries):
        entry = _parse_entry(item, source, index, warnings)
        if entry.prefix in prefixes:
            # containers/image: the first entry with a prefix wins, later ones are ignored.
            warnings.append(f"{entry.where}: prefix {entry.prefix!r} repeated; ignored")
            continue
        prefixes.add(entry.prefix)
        entries.append(entry)
    _check_blocked_conflicts(entries, source)
    raw_aliases = raw.get("aliases", {})
    if not isinstance(raw_aliases, dict):
        raise _error(source, "aliases", "expected an [aliases] table")
    aliases: dict[str, Repository | None] = {
        name: _parse_alias(name, value, source) for name, value in raw_aliases.items()
    }
    return _Layer(source, search, mode, aliases, entries, warnings)


@dataclass
class _Layer:
    """One file's content, before merging (an alias None deletes)."""

    source: str
    search: tuple[str, ...] | None
    mode: ShortNameMode | None
    aliases: dict[str, Repository | None]
    entries: list[RegistryEntry]
    warnings: list[str]


def _merge(layers: Iterable[_Layer]) -> RegistriesConf:
    """Merge files in order, the way containers/image merges drop-ins."""
    sources: list[str] = []
    search: tuple[str, ...] | None = None
    search_source: str | None = None
    mode: ShortNameMode | None = None
    aliases: dict[str, Repository] = {}
    alias_sources: dict[str, str] = {}
    entries: dict[str, RegistryEntry] = {}
    warnings: list[str] = []
    for layer in layers:
        sources.append(layer.source)
        if layer.search is not None:
            search, search_source = layer.search, layer.source
        if layer.mode is not None:
            mode = layer.mode
        for name, target in layer.aliases.items():
            if target is None:
                aliases.pop(name, None)
                alias_sources.pop(name, None)
            else:
                aliases[name] = target
                alias_sources[name] = layer.source
        for entry in layer.entries:
            entries[entry.prefix] = entry
        warnings.extend(layer.warnings)
    return RegistriesConf(
        sources=tuple(sources),
        search=search,
        search_source=search_source,
        short_name_mode=mode,
        aliases=aliases,
        alias_sources=alias_sources,
        registries=tuple(entries.values()),
        warnings=tuple(warnings),
    )


def load_registries_conf(path: Path) -> RegistriesConf:
    """Read a registries.conf and its `<file>.d/*.conf` drop-ins, merged in order."""
    layers: list[_Layer] = []
    for index, file in enumerate(registries_conf_files(path)):
        try:
            text = file.read_text()
        except OSError as exc:
            if index > 0 and isinstance(exc, FileNotFoundError):
                continue  # a drop-in removed while listing the directory
            raise RegistriesConfError(f"{file}: cannot read: {exc.strerror}") from exc
        layers.append(_parse_layer(text, str(file)))
    return _merge(layers)
