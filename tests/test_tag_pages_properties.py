"""Properties of proxy/content/tag_pages.py: a client's `n`, an upstream's `Link`, ours.

`n` is a page size or a 400; any `Link` text an upstream sends is a next page or none,
never an exception; the `Link` the gate writes reads back as the query it meant.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.content.tag_pages import MAX_PAGE, next_link, parse_next_link, parse_page_size
from proxy.errors import PaginationNumberInvalid

PROPERTIES = settings(max_examples=200, deadline=None)


@PROPERTIES
@given(st.one_of(st.none(), st.text(max_size=30), st.integers(-5, 10**30).map(str)))
def test_any_n_is_a_page_size_or_a_400(value: str | None) -> None:
    try:
        size = parse_page_size(value)
    except PaginationNumberInvalid as error:
        assert error.status == 400
        return
    assert size is None or 0 <= size <= MAX_PAGE


_LINKISH = st.text(alphabet='<>;,="? &/%abcnextrelv2:', max_size=120)


@PROPERTIES
@given(st.one_of(st.text(max_size=200), _LINKISH))
def test_any_link_header_is_a_next_page_or_none(link: str) -> None:
    pairs = parse_next_link(link)
    assert pairs is None or (pairs and all(key for key, _ in pairs))


_NAME = st.from_regex(r"[a-z0-9]+(/[a-z0-9._-]+){0,3}", fullmatch=True)


@PROPERTIES
@given(
    _NAME,
    st.integers(min_value=1, max_value=MAX_PAGE),
    st.text(min_size=1, max_size=40),
    st.one_of(st.none(), st.text(max_size=20)),
    st.sampled_from(["", '<../prev?last=a>; rel="prev", ', '<x>; title="a,b", ']),
)
def test_the_gates_link_reads_back_as_its_query(
    name: str, n: int, last: str, ns: str | None, before: str
) -> None:
    expected = [("n", str(n)), ("last", last)] + ([("ns", ns)] if ns is not None else [])
    link = next_link(name, n, last, ns)
    assert parse_next_link(before + link) == expected
