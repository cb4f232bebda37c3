"""proxy/http/ranges.py: single `bytes=` ranges against a blob size (RFC 9110)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import RangeInvalid
from proxy.http.ranges import content_range, parse_range, unsatisfiable


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-4", 10, (0, 4)),
        ("bytes=0-0", 10, (0, 0)),
        ("bytes=5-", 10, (5, 9)),
        ("bytes=9-", 10, (9, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-10", 10, (0, 9)),
        ("bytes=-20", 10, (0, 9)),
        ("bytes=0-100", 10, (0, 9)),
        ("bytes=3-3", 10, (3, 3)),
        (" bytes = 2 - 5 ", 10, (2, 5)),
        ("bytes=0-", 1, (0, 0)),
    ],
)
def test_satisfiable_ranges(header: str, size: int, expected: tuple[int, int]) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes=-",
        "bytes=0-1,3-4",
        "bytes=0-1, 5-",
        "items=0-4",
        "bytes 0-4",
        "bytes=a-b",
        "bytes=1.5-2",
        "bytes=--1",
        "garbage",
    ],
)
def test_absent_multi_or_unparsable_ranges_mean_whole_blob(header: str | None) -> None:
    assert parse_range(header, 10) is None


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=10-", 10),
        ("bytes=10-20", 10),
        ("bytes=100-", 10),
        ("bytes=5-2", 10),
        ("bytes=-0", 10),
        ("bytes=0-", 0),
        ("bytes=-5", 0),
        ("bytes=0-0", 0),
    ],
)
def test_unsatisfiable_ranges_are_416(header: str, size: int) -> None:
    with pytest.raises(RangeInvalid) as info:
        parse_range(header, size)
    error = info.value
    assert (error.code, error.status) == ("RANGE_INVALID", 416)
    assert error.headers == {"Content-Range": f"bytes */{size}"}


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("bytes=" + "1" * 5000 + "-", RangeInvalid, id="huge-first"),
        pytest.param("bytes=0-" + "9" * 5000, (0, 9), id="huge-last"),
        pytest.param("bytes=-" + "9" * 5000, (0, 9), id="huge-suffix"),
        pytest.param("bytes=0-" + "0" * 4999 + "5", (0, 5), id="leading-zeros"),
    ],
)
def test_huge_numbers_do_not_crash(header: str, expected: object) -> None:
    # Python refuses int() of more than 4300 digits; a client's header must not turn
    # that into a 500.
    if expected is RangeInvalid:
        with pytest.raises(RangeInvalid):
            parse_range(header, 10)
    else:
        assert parse_range(header, 10) == expected


@pytest.mark.parametrize("header", ["bytes=\u0660-\u0664", "bytes=\uff10-\uff13", "bytes=\u00b2-"])
def test_non_ascii_digits_are_not_numbers(header: str) -> None:
    assert parse_range(header, 10) is None


def test_content_range_and_unsatisfiable() -> None:
    assert content_range(0, 4, 10) == "bytes 0-4/10"
    error = unsatisfiable(42)
    assert error.status == 416
    assert error.headers["Content-Range"] == "bytes */42"


@given(
    size=st.integers(min_value=0, max_value=10_000),
    first=st.one_of(st.none(), st.integers(min_value=0, max_value=20_000)),
    last=st.one_of(st.none(), st.integers(min_value=0, max_value=20_000)),
)
def test_any_answer_lies_inside_the_blob(size: int, first: int | None, last: int | None) -> None:
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    try:
        result = parse_range(header, size)
    except RangeInvalid:
        return
    if result is None:
        assert first is None and last is None
        return
    start, end = result
    assert 0 <= start <= end < size
    if first is not None:
        assert start == first
        if last is not None:
            assert end == min(last, size - 1)
    else:
        assert last is not None
        assert end == size - 1
        assert end - start + 1 == min(last, size)
