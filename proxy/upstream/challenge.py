"""`WWW-Authenticate` challenges and token scopes (pure).

Parses what an upstream (or a client-facing test) sends in `WWW-Authenticate`
(RFC 9110 auth-params: quoted strings with escapes, several params, several challenges)
and builds/parses Docker token scopes (`repository:name:pull,push`, the name may carry
a `host:port`, so the type is split on the first colon and the actions on the last).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))\s*,?')
# A scheme ends at whitespace, a comma (a challenge without parameters, e.g.
# `Negotiate, Bearer realm=...`) or the end of the header.
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?=[\s,]|$)\s*")
_QUOTED_SPECIALS = re.compile(r'["\\]')
_ESCAPE = r"\\\g<0>"
# What a quoted-string cannot hold (RFC 9110 qdtext: HTAB is the only control allowed).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Challenge:
    """One authentication challenge: its scheme (lower-case) and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        """The token endpoint (Bearer) or protection space (Basic)."""
        return self.params.get("realm")


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a `WWW-Authenticate` value into its challenges (unknown syntax is skipped)."""
    challenges: list[Challenge] = []
    position = 0
    while position < len(header):
        scheme_match = _SCHEME_RE.match(header, position)
        if scheme_match is None:
            break
        scheme = scheme_match.group(1).lower()
        position = scheme_match.end()
        params: dict[str, str] = {}
        while position < len(header):
            param_match = _PARAM_RE.match(header, position)
            if param_match is None:
                break
            name, quoted, bare = param_match.groups()
            value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
            params[name.lower()] = value
            position = param_match.end()
        challenges.append(Challenge(scheme, params))
        # Skip a separator between challenges.
        while position < len(header) and header[position] in ", ":
            position += 1
    return challenges


def format_challenge(scheme: str, params: dict[str, str]) -> str:
    """Write a challenge, each value a quoted-string (the inverse of `parse_challenges`).

    Values can carry client text (the repository name in `scope`): `"` and `\\` are
    escaped so a name cannot close the string and add parameters (a second `realm`),
    and a value with a control character, which no header may carry, is left out.
    """
    written = [
        f'{name}="{_QUOTED_SPECIALS.sub(_ESCAPE, value)}"'
        for name, value in params.items()
        if not _CONTROL.search(value)
    ]
    return f"{scheme} {','.join(written)}" if written else scheme


def bearer_challenge(header: str) -> Challenge | None:
    """The Bearer challenge of a header, if any."""
    for challenge in parse_challenges(header):
        if challenge.scheme == "bearer":
            return challenge
    return None


@dataclass(frozen=True, slots=True)
class Scope:
    """One resource scope of a token request or grant."""

    type: str
    name: str
    actions: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


def parse_scope(text: str) -> Scope | None:
    """Parse `type[(class)]:name:actions`; None when malformed."""
    type_part, sep, rest = text.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not type_part or not name:
        return None
    type_part = type_part.split("(", 1)[0]
    return Scope(type_part, name, tuple(a for a in actions.split(",") if a))


def parse_scopes(values: list[str]) -> list[Scope]:
    """Parse scope parameters (each may hold several space-separated scopes)."""
    scopes: list[Scope] = []
    for value in values:
        for item in value.split():
            scope = parse_scope(item)
            if scope is not None:
                scopes.append(scope)
    return scopes


def repository_scope(path: str, actions: tuple[str, ...]) -> str:
    """The scope string for a repository on an upstream."""
    return str(Scope("repository", path, actions))
