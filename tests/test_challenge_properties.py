"""Properties of proxy/upstream/challenge.py: `WWW-Authenticate` and token scopes from any sender.

An upstream writes the challenges the gate parses, and a client writes the scopes; the
gate writes challenges that carry a client's repository name. Parsing never raises, and
what the gate writes parses back to what it meant.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.upstream.challenge import (
    Scope,
    bearer_challenge,
    format_challenge,
    parse_challenges,
    parse_scope,
    parse_scopes,
)

PROPERTIES = settings(max_examples=200, deadline=None)
_TOKEN = st.from_regex(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,12}", fullmatch=True)
# What a header value can carry: no control character but HTAB.
_HEADER_TEXT = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00\r\n"), max_size=80
)
_QUOTABLE = st.text(
    st.characters(
        exclude_categories=("Cs", "Cc"), exclude_characters="\x7f", include_characters="\t"
    ),
    max_size=60,
)


@PROPERTIES
@given(st.text(max_size=300))
def test_parsing_any_header_never_raises(header: str) -> None:
    for challenge in parse_challenges(header):
        assert challenge.scheme == challenge.scheme.lower()
        assert all(name == name.lower() for name in challenge.params)
    bearer_challenge(header)


@PROPERTIES
@given(
    _TOKEN,
    st.dictionaries(_TOKEN.map(str.lower), _QUOTABLE, max_size=5),
)
def test_a_written_challenge_parses_back_to_its_parameters(
    scheme: str, params: dict[str, str]
) -> None:
    header = format_challenge(scheme, params)
    (challenge,) = parse_challenges(header)
    assert challenge.scheme == scheme.lower()
    assert challenge.params == params


@PROPERTIES
@given(_TOKEN, st.dictionaries(_TOKEN.map(str.lower), _HEADER_TEXT, max_size=5))
def test_a_written_challenge_never_carries_a_control_character_or_a_foreign_parameter(
    scheme: str, params: dict[str, str]
) -> None:
    header = format_challenge(scheme, params)
    assert not any((ord(c) < 32 and c != "\t") or c == "\x7f" for c in header)
    (challenge,) = parse_challenges(header)
    # A value is written whole or not at all: no client text becomes another parameter.
    assert set(challenge.params) <= set(params)
    assert all(params[name] == value for name, value in challenge.params.items())


@PROPERTIES
@given(st.text(max_size=200))
def test_parsing_any_scope_never_raises(text: str) -> None:
    scope = parse_scope(text)
    if scope is not None:
        assert scope.type and scope.name
        assert all(action and "," not in action for action in scope.actions)
    for parsed in parse_scopes([text, text]):
        assert isinstance(parsed, Scope)


_NAME = st.from_regex(
    r"([a-z0-9.-]+(:[0-9]{1,5})?/)?[a-z0-9._-]+(/[a-z0-9._-]+){0,3}", fullmatch=True
)


@PROPERTIES
@given(
    st.sampled_from(["repository", "registry"]),
    _NAME,
    st.lists(st.from_regex(r"[a-z*]{1,8}", fullmatch=True), min_size=1, max_size=4),
)
def test_a_scope_string_parses_back(kind: str, name: str, actions: list[str]) -> None:
    scope = Scope(kind, name, tuple(actions))
    assert parse_scope(str(scope)) == scope
    assert parse_scopes([f"{scope} {scope}"]) == [scope, scope]
