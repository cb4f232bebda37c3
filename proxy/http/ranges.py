"""HTTP ranges (pure): `bytes=` ranges on blobs against a size, and upload chunk ranges.

Only a single range is served (registries and their clients never ask for more);
multi-range and unparsable values are answered with the whole blob, as RFC 9110 allows.
"""

from __future__ import annotations

import re

from proxy.errors import RangeInvalid

_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.ASCII)
# An upload chunk's `Content-Range`, and an upload status `Range`: `<start>-<end>`, no unit.
_CHUNK_RE = re.compile(r"\s*(\d+)-(\d+)\s*", re.ASCII)
# Longer numbers are past any blob size; int() refuses over 4300 digits (a 500, not a 416).
_MAX_DIGITS = 19


def _number(text: str) -> int:
    text = text.lstrip("0") or "0"
    return int(text) if len(text) <= _MAX_DIGITS else 10**_MAX_DIGITS


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte range asked for, None for the whole blob.

    Raises RangeInvalid (416) when the range cannot be satisfied.
    """
    if not header:
        return None
    match = _RANGE_RE.fullmatch(header)
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    if not first_text:
        suffix = _number(last_text)
        if suffix == 0 or size == 0:
            raise unsatisfiable(size)
        return max(0, size - suffix), size - 1
    first = _number(first_text)
    last = _number(last_text) if last_text else size - 1
    if last < first:
        raise unsatisfiable(size)
    if first >= size:
        raise unsatisfiable(size)
    return first, min(last, size - 1)


def parse_chunk_range(header: str) -> tuple[int, int]:
    """The inclusive (start, end) of an upload chunk's `Content-Range` or an upload's
    `Range` status; raises RangeInvalid when it is not `<start>-<end>` with start <= end."""
    match = _CHUNK_RE.fullmatch(header)
    if match is None:
        raise RangeInvalid("Content-Range must be <start>-<end>")
    start, end = _number(match[1]), _number(match[2])
    if start > end:
        raise RangeInvalid("Content-Range must be <start>-<end>")
    return start, end


def unsatisfiable(size: int) -> RangeInvalid:
    """The 416 error with the `Content-Range: bytes */size` the spec asks for."""
    return RangeInvalid(
        "requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"}
    )


def content_range(first: int, last: int, size: int) -> str:
    """The `Content-Range` value of a 206 response."""
    return f"bytes {first}-{last}/{size}"
