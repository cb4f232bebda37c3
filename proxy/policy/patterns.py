"""Reference patterns of policy rules: their syntax, compilation and matching (pure).

A pattern is matched against a fully-qualified repository `registry/path` (after Docker
Hub normalisation: `docker.io/library/ubuntu`), component by component, so it can never
match by raw string prefix (`docker.io` does not match `docker.io.evil.com`, and
`registry.corp.example/**` does not match `registry.corp.example.evil/x`).

Syntax, `/`-separated components; the first one is the registry `host[:port]`:

- a literal component matches exactly that component;
- `*` inside a path component matches any characters except `/` (`team-*`, `*`);
- `**` as a whole component matches zero or more components (`corp.example/**`,
  `**/library/*`, `**` alone matches everything);
- registry position: a lone `*` matches any registry (one component, any port); `*`
  inside a host label matches within that label (`registry-*.corp.example`); a leading
  `*.` matches one or more subdomain labels and never the domain itself
  (`*.corp.example` matches `a.corp.example` and `a.b.corp.example`, not
  `corp.example`, not `evilcorp.example`);
- ports: a host without a port matches only the registry without a port (for the gate,
  `host:5000` is another upstream); `host:5000` matches that port; `host:*` matches the
  host with any port or none;
- a pattern with no `/` names a registry and matches everything on it: `docker.io` is
  `docker.io/**`, `*.corp.example` is `*.corp.example/**`;
- Docker Hub is normalised like references: `index.docker.io` is `docker.io`, and a
  one-component Docker Hub path gets `library/` (`docker.io/ubuntu` and `docker.io/*`
  mean `docker.io/library/ubuntu` and `docker.io/library/*`).

Patterns match repositories, never tags or digests: tag conditions are rule keys
(`deny_tags`, `require_digest`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.names.references import DOCKER_HUB, normalize_registry

_PATH_COMPONENT_RE = re.compile(r"[a-z0-9._*-]+")
_HOST_LABEL_RE = re.compile(r"[a-z0-9*-]+")
_PORT_RE = re.compile(r"[0-9]{1,5}|\*")


class PatternError(ValueError):
    """A reference pattern is not valid (the message says why)."""


def _path_component_regex(component: str) -> str:
    return "[^/]*".join(re.escape(part) for part in component.split("*"))


def _host_regex(host: str) -> str:
    """Regex for a `host[:port]` pattern (validated by the caller)."""
    name, _, port = host.partition(":")
    if name == "*" and not port:
        # A lone `*` is one whole registry component: any registry, with any port.
        return r"[^/]+"
    if name == "*":
        name_regex = r"[^/:]+"
    else:
        labels = name.split(".")
        parts: list[str] = []
        if labels[0] == "*" and len(labels) > 1:
            # `*.corp.example`: one or more labels in front, never none (subdomains only).
            prefix = r"(?:[^./:]+\.)+"
            labels = labels[1:]
        else:
            prefix = ""
        for label in labels:
            parts.append("[^./:]*".join(re.escape(piece) for piece in label.split("*")))
        name_regex = prefix + r"\.".join(parts)
    if not port:
        return name_regex
    if port == "*":
        return name_regex + r"(?::[0-9]+)?"
    return name_regex + ":" + port


def _check_host(host: str, text: str) -> str:
    if host == "**":
        return host
    name, sep, port = host.partition(":")
    if sep and not _PORT_RE.fullmatch(port):
        raise PatternError(f"invalid port in registry part of {text!r}")
    if not name:
        raise PatternError(f"empty registry in {text!r}")
    labels = name.split(".")
    for label in labels:
        if not label or not _HOST_LABEL_RE.fullmatch(label):
            raise PatternError(
                f"invalid registry {host!r} in {text!r}: host labels use a-z, 0-9, '-' and '*'"
            )
        if "**" in label:
            raise PatternError(
                f"'**' in the registry part of {text!r}: use '*.' for subdomains, "
                "or a lone '**' component for any registry and path"
            )
    if "*" not in name:
        name = normalize_registry(name)
    return f"{name}{sep}{port}"


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled reference pattern; `text` is what the operator wrote."""

    text: str
    canonical: str
    # Exactly one of these describes the registry part: a literal host, a host regex,
    # or neither (the pattern starts with `**`, which spans the registry as well).
    host_literal: str | None
    host_regex: re.Pattern[str] | None
    # How the path is matched once the registry matched: every path (`/**`), a literal
    # path, a literal prefix followed by `/**`, or a regex over "/" + path.
    path_any: bool
    path_literal: str | None
    path_prefix: str | None
    path_regex: re.Pattern[str] | None
    # For patterns starting with `**`: a regex over "/" + registry + "/" + path.
    full_regex: re.Pattern[str] | None
    # The first path component as a regex, when the pattern constrains it (`team-a/**`,
    # `team-*/app`); None when any first component can match. Lets policy index rules
    # by namespace.
    head_regex: re.Pattern[str] | None = None

    def __str__(self) -> str:
        return self.text

    @property
    def any_registry(self) -> bool:
        """Whether the registry part is unconstrained (the pattern starts with `**`)."""
        return self.host_literal is None and self.host_regex is None

    def matches_registry(self, registry: str) -> bool:
        """Whether some repository on `registry` could match (used to index rules)."""
        if self.host_literal is not None:
            return registry == self.host_literal
        if self.host_regex is not None:
            return self.host_regex.fullmatch(registry) is not None
        return True

    def matches_head(self, head: str) -> bool:
        """Whether a path whose first component is `head` could match (used to index rules)."""
        return self.head_regex is None or self.head_regex.fullmatch(head) is not None

    def matches_path(self, registry: str, path: str) -> bool:
        """Whether `registry/path` matches, given that `matches_registry` holds."""
        if self.full_regex is not None:
            return self.full_regex.fullmatch(f"/{registry}/{path}") is not None
        if self.path_any:
            return True
        if self.path_literal is not None:
            return path == self.path_literal
        if self.path_prefix is not None:
            return path == self.path_prefix or (
                path.startswith(self.path_prefix) and path[len(self.path_prefix)] == "/"
            )
        assert self.path_regex is not None
        return self.path_regex.fullmatch("/" + path) is not None

    def matches(self, registry: str, path: str) -> bool:
        """Whether the repository `registry/path` (normalised) matches the pattern."""
        return self.matches_registry(registry) and self.matches_path(registry, path)

    def matches_name(self, name: str) -> bool:
        """Match a fully-qualified `registry/path` string."""
        registry, sep, path = name.partition("/")
        return bool(sep) and self.matches(registry, path)


def compile_pattern(text: str) -> Pattern:
    """Compile a pattern, raising PatternError with the reason when it is invalid."""
    if not isinstance(text, str) or not text:
        raise PatternError("a pattern must be a non-empty string")
    if text != text.strip() or any(c.isspace() for c in text):
        raise PatternError(f"whitespace in pattern {text!r}")
    if "@" in text:
        raise PatternError(
            f"{text!r}: patterns match repositories, not digests (use require_digest)"
        )
    components = text.split("/")
    if any(not c for c in components):
        raise PatternError(f"empty path component in {text!r} (a leading, trailing or '//')")
    host = _check_host(components[0].lower() if components[0] != "**" else "**", text)
    path = components[1:]
    for component in path:
        if component == "**":
            continue
        if ":" in component:
            raise PatternError(f"{text!r}: patterns match repositories, not tags (use deny_tags)")
        if "**" in component:
            raise PatternError(f"'**' must be a whole path component in {text!r}")
        if not _PATH_COMPONENT_RE.fullmatch(component):
            raise PatternError(
                f"invalid path component {component!r} in {text!r}: "
                "use a-z, 0-9, '.', '_', '-' and '*'"
            )
    if host != "**" and not path:
        # A bare registry means everything on that registry.
        path = ["**"]
    if host == DOCKER_HUB and len(path) == 1 and path[0] != "**":
        path = ["library", *path]
    canonical = "/".join([host, *path])

    if host == "**" and not path:
        # `**` alone: everything, no regex needed.
        return Pattern(
            text=text,
            canonical=canonical,
            host_literal=None,
            host_regex=None,
            path_any=True,
            path_literal=None,
            path_prefix=None,
            path_regex=None,
            full_regex=None,
        )
    if host == "**":
        regex = "".join(
            r"(?:/[^/]+)*" if c == "**" else "/" + _path_component_regex(c) for c in ["**", *path]
        )
        return Pattern(
            text=text,
            canonical=canonical,
            host_literal=None,
            host_regex=None,
            path_any=False,
            path_literal=None,
            path_prefix=None,
            path_regex=None,
            full_regex=re.compile(regex),
        )

    host_literal = host if "*" not in host else None
    host_regex = None if host_literal is not None else re.compile(_host_regex(host))
    path_any = path == ["**"]
    literal = all("*" not in c for c in path)
    path_literal = "/".join(path) if literal else None
    path_prefix = None
    if not literal and path[-1] == "**" and all("*" not in c for c in path[:-1]):
        path_prefix = "/".join(path[:-1])
    path_regex = None
    if not path_any and path_literal is None and path_prefix is None:
        path_regex = re.compile(
            "".join(r"(?:/[^/]+)*" if c == "**" else "/" + _path_component_regex(c) for c in path)
        )
    head_regex = None if path[0] == "**" else re.compile(_path_component_regex(path[0]))
    return Pattern(
        text=text,
        canonical=canonical,
        host_literal=host_literal,
        host_regex=host_regex,
        path_any=path_any,
        path_literal=path_literal,
        path_prefix=path_prefix,
        path_regex=path_regex,
        full_regex=None,
        head_regex=head_regex,
    )
