"""proxy/content/tag_pages.py: tag list sorting, pagination and the `Link` to the next page."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.content.tag_pages import MAX_PAGE, next_link, page, parse_page_size
from proxy.errors import PaginationNumberInvalid


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("0", 0),
        ("1", 1),
        ("50", 50),
        ("1000", 1000),
        ("1001", MAX_PAGE),
        ("1000000000", MAX_PAGE),
        pytest.param("9" * 5000, MAX_PAGE, id="huge"),
        pytest.param("0" * 5000 + "7", 7, id="leading-zeros"),
    ],
)
def test_page_size(value: str | None, expected: int | None) -> None:
    assert parse_page_size(value) == expected


def test_page_size_clamp_is_1000() -> None:
    assert MAX_PAGE == 1000


@pytest.mark.parametrize(
    "value",
    ["-1", "abc", "1.5", " 5", "5 ", "+5", "0x10", "1e3", "\u00b2", "\u0663", "\uff15", "5\n"],
)
def test_bad_page_size_is_400(value: str) -> None:
    with pytest.raises(PaginationNumberInvalid) as info:
        parse_page_size(value)
    error = info.value
    assert (error.code, error.status) == ("PAGINATION_NUMBER_INVALID", 400)


def test_bad_page_size_detail_is_bounded() -> None:
    with pytest.raises(PaginationNumberInvalid) as info:
        parse_page_size("x" * 10_000)
    assert len(info.value.body()) < 300


TAGS = ["v2", "latest", "v1", "1.0", "v10", "v1"]


def test_page_sorts_and_deduplicates() -> None:
    assert page(TAGS, None, None) == (["1.0", "latest", "v1", "v10", "v2"], False)


def test_page_limits_and_reports_more() -> None:
    assert page(TAGS, 2, None) == (["1.0", "latest"], True)
    assert page(TAGS, 5, None) == (["1.0", "latest", "v1", "v10", "v2"], False)
    assert page(TAGS, 10, None) == (["1.0", "latest", "v1", "v10", "v2"], False)


def test_page_after_last_is_exclusive() -> None:
    assert page(TAGS, 2, "latest") == (["v1", "v10"], True)
    assert page(TAGS, 2, "v10") == (["v2"], False)
    assert page(TAGS, 2, "v2") == ([], False)
    # `last` need not be a tag that exists.
    assert page(TAGS, None, "m") == (["v1", "v10", "v2"], False)


def test_page_of_zero() -> None:
    assert page(TAGS, 0, None) == ([], True)
    assert page([], 0, None) == ([], False)


def test_empty_list() -> None:
    assert page([], None, None) == ([], False)
    assert page([], 10, "x") == ([], False)


def test_next_link_points_at_the_gate() -> None:
    link = next_link("library/ubuntu", 2, "v1", None)
    assert link == '</v2/library/ubuntu/tags/list?n=2&last=v1>; rel="next"'


def test_next_link_keeps_ns_and_encodes() -> None:
    link = next_link("coreos/etcd", 50, "v1+build&x=y", "quay.io")
    target = link.split(">", 1)[0].removeprefix("<")
    parts = urlsplit(target)
    assert parts.path == "/v2/coreos/etcd/tags/list"
    assert parse_qs(parts.query) == {"n": ["50"], "last": ["v1+build&x=y"], "ns": ["quay.io"]}
    assert link.endswith('; rel="next"')


_TAG = st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,10}", fullmatch=True)


@given(st.lists(_TAG, max_size=40), st.integers(min_value=1, max_value=7))
def test_walking_pages_yields_every_tag_once_in_order(tags: list[str], n: int) -> None:
    seen: list[str] = []
    last: str | None = None
    for _ in range(100):
        chunk, more = page(tags, n, last)
        assert len(chunk) <= n
        seen.extend(chunk)
        if not more:
            break
        last = chunk[-1]
    assert seen == sorted(set(tags))
