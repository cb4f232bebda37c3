"""Tag lists sorted and paginated by the gate (pure).

Upstreams such as Distribution 2.8 ignore `n` and `last` and return tags unsorted; the
gate fetches the whole list, sorts it, and pages it itself, with a `Link` that points at
the gate in the addressing mode the client used.
"""

from __future__ import annotations

from urllib.parse import urlencode

from proxy.errors import PaginationNumberInvalid

MAX_PAGE = 1000


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
