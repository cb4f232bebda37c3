"""Properties of proxy/http/ranges.py: a client's `Range`, a client's or an upstream's chunk range.

Any text raises only RangeInvalid (416), never another exception; what is accepted lies
inside the blob; the `Content-Range` the gate writes reads back as the range it serves.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import RangeInvalid
from proxy.http.ranges import content_range, parse_chunk_range, parse_range

PROPERTIES = settings(max_examples=200, deadline=None)
_NUMBER = st.one_of(
    st.integers(min_value=0, max_value=10**30).map(str),
    st.sampled_from(["", "9" * 5000, "00", "-1", "١٢", "1e3"]),
)
_RANGE = st.one_of(
    st.text(max_size=60),
    st.tuples(st.sampled_from(["bytes=", "bytes = ", "BYTES=", ""]), _NUMBER, _NUMBER).map(
        lambda p: f"{p[0]}{p[1]}-{p[2]}"
    ),
)
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@PROPERTIES
@given(_RANGE, st.integers(min_value=0, max_value=10**12))
def test_any_range_header_is_a_range_inside_the_blob_none_or_a_416(header: str, size: int) -> None:
    try:
        selected = parse_range(header, size)
    except RangeInvalid as error:
        assert error.status == 416
        assert error.headers["Content-Range"] == f"bytes */{size}"
        return
    if selected is not None:
        first, last = selected
        assert 0 <= first <= last < size
        written = _CONTENT_RANGE_RE.fullmatch(content_range(first, last, size))
        assert written is not None
        assert tuple(map(int, written.groups())) == (first, last, size)


@PROPERTIES
@given(st.one_of(st.text(max_size=60), st.tuples(_NUMBER, _NUMBER).map("-".join)))
def test_any_chunk_range_is_ordered_offsets_or_a_416(header: str) -> None:
    try:
        start, end = parse_chunk_range(header)
    except RangeInvalid as error:
        assert error.status == 416
        return
    assert 0 <= start <= end


@PROPERTIES
@given(st.integers(min_value=0, max_value=10**18), st.integers(min_value=0, max_value=10**18))
def test_a_chunk_range_reads_back(a: int, b: int) -> None:
    start, end = sorted((a, b))
    assert parse_chunk_range(f"{start}-{end}") == (start, end)
    assert parse_chunk_range(f" {start}-{end}\t") == (start, end)
