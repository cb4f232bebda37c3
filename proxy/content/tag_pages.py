"""Tag lists sorted and paginated by the gate (pure).

Upstreams such as Distribution 2.8 ignore `n` and `last` and return tags unsorted; the
gate fetches the whole list (following the upstream's `Link` pages), sorts it, and pages
it itself, with a `Link` that points at the gate in the addressing mode the client used.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

from proxy.errors import PaginationNumberInvalid

MAX_PAGE = 1000
# One link of a `Link` header (RFC 8288): `<target>`, then its parameters up to the next `<`.
_LINK_RE = re.compile(r"<([^>]*)>([^<]*)")
_REL_NEXT_RE = re.compile(r';\s*rel\s*=\s*"?([^";,]*)', re.IGNORECASE)


def parse_page_size(value: str | None) -> int | None:
    """The `n` parameter: None when absent, clamped to MAX_PAGE; 400 when invalid."""
    if value is None or value == "":
        return None
    # str.isdigit() also accepts "²" and other digits int() refuses or should not see.
    if not (value.isascii() and value.isdigit()):
        raise PaginationNumberInvalid("n must be a non-negative integer", detail={"n": value[:40]})
    digits = value.lstrip("0") or "0"
    return MAX_PAGE if len(digits) > len(str(MAX_PAGE)) else min(int(digits), MAX_PAGE)


def page(tags: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """The page of sorted tags after `last` (exclusive), at most `n`; and whether more follow."""
    ordered = sorted(set(tags))
    if last:
        ordered = [tag for tag in ordered if tag > last]
    if n is None:
        return ordered, False
    return ordered[:n], len(ordered) > n


def next_link(name: str, n: int, last: str, ns: str | None) -> str:
    """The `Link` header value for the next page, relative to the gate."""
    query: dict[str, str] = {"n": str(n), "last": last}
    if ns is not None:
        query["ns"] = ns
    return f'</v2/{name}/tags/list?{urlencode(query)}>; rel="next"'


def parse_next_link(link: str) -> list[tuple[str, str]] | None:
    """The query of an upstream's `rel="next"` link (decoded pairs); None without one.

    The header may hold several links (`<...>; rel="prev", <...>; rel="next"`) and any
    text an upstream sends: what does not parse is no next page.
    """
    for match in _LINK_RE.finditer(link):
        rel = _REL_NEXT_RE.search(match.group(2))
        if rel is not None and "next" in rel.group(1).lower().split():
            pairs = parse_qsl(urlsplit(match.group(1)).query, keep_blank_values=True)
            return [(key, value) for key, value in pairs if key] or None
    return None
