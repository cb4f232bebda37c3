"""proxy/upstream/challenge.py: `WWW-Authenticate` parsing and token scopes."""

from __future__ import annotations

import pytest

from proxy.upstream.challenge import (
    Challenge,
    Scope,
    bearer_challenge,
    parse_challenges,
    parse_scope,
    parse_scopes,
    repository_scope,
)

# --- WWW-Authenticate --------------------------------------------------------------------


def test_docker_hub_challenge() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/ubuntu:pull"'
    )
    assert parse_challenges(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/ubuntu:pull",
            },
        )
    ]
    challenge = bearer_challenge(header)
    assert challenge is not None
    assert challenge.realm == "https://auth.docker.io/token"


def test_quoted_commas_stay_inside_the_value() -> None:
    header = (
        'Bearer realm="https://auth.example.com/token",'
        'scope="repository:samalba/my-app:pull,push",error="insufficient_scope"'
    )
    (challenge,) = parse_challenges(header)
    assert challenge.params == {
        "realm": "https://auth.example.com/token",
        "scope": "repository:samalba/my-app:pull,push",
        "error": "insufficient_scope",
    }


def test_escapes_in_quoted_strings() -> None:
    header = r'Bearer realm="https://a.example/t?x=\"y\"",service="back\\slash",x="a\,b"'
    (challenge,) = parse_challenges(header)
    assert challenge.params["realm"] == 'https://a.example/t?x="y"'
    assert challenge.params["service"] == "back\\slash"
    assert challenge.params["x"] == "a,b"


def test_case_and_whitespace() -> None:
    header = 'BEARER  Realm = "https://a.example/t" ,  Service=reg.example'
    (challenge,) = parse_challenges(header)
    assert challenge.scheme == "bearer"
    assert challenge.params == {"realm": "https://a.example/t", "service": "reg.example"}


def test_unquoted_token_values() -> None:
    (challenge,) = parse_challenges('Bearer realm="https://a/t",service=registry.example,x=1')
    assert challenge.params["service"] == "registry.example"
    assert challenge.params["x"] == "1"


def test_empty_quoted_value() -> None:
    (challenge,) = parse_challenges('Bearer realm="",service="s"')
    assert challenge.params == {"realm": "", "service": "s"}


def test_basic_challenge() -> None:
    (challenge,) = parse_challenges('Basic realm="Registry Realm", charset="UTF-8"')
    assert challenge == Challenge("basic", {"realm": "Registry Realm", "charset": "UTF-8"})
    assert challenge.realm == "Registry Realm"
    assert bearer_challenge('Basic realm="Registry Realm"') is None


def test_multiple_challenges_in_one_header() -> None:
    header = 'Basic realm="basic-realm", Bearer realm="https://a.example/t",service="s"'
    challenges = parse_challenges(header)
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert challenges[0].params == {"realm": "basic-realm"}
    assert challenges[1].params == {"realm": "https://a.example/t", "service": "s"}
    bearer = bearer_challenge(header)
    assert bearer is not None
    assert bearer.realm == "https://a.example/t"


def test_bearer_first_then_basic() -> None:
    header = 'Bearer realm="https://a.example/t", Basic realm="b"'
    assert [(c.scheme, c.realm) for c in parse_challenges(header)] == [
        ("bearer", "https://a.example/t"),
        ("basic", "b"),
    ]


def test_quoted_value_looking_like_a_challenge_is_not_one() -> None:
    header = 'Basic realm="x, Bearer realm=https://evil.example/t"'
    assert parse_challenges(header) == [
        Challenge("basic", {"realm": "x, Bearer realm=https://evil.example/t"})
    ]
    assert bearer_challenge(header) is None


def test_scheme_without_params() -> None:
    assert parse_challenges("Bearer") == [Challenge("bearer", {})]
    challenge = bearer_challenge("Bearer")
    assert challenge is not None
    assert challenge.realm is None


def test_parameterless_challenge_before_bearer() -> None:
    # RFC 9110: a challenge may have no parameters (`Negotiate`); the Bearer challenge
    # after it must still be found.
    header = 'Negotiate, Bearer realm="https://a.example/t",service="s"'
    assert [c.scheme for c in parse_challenges(header)] == ["negotiate", "bearer"]
    bearer = bearer_challenge(header)
    assert bearer is not None
    assert bearer.params == {"realm": "https://a.example/t", "service": "s"}


def test_parameterless_challenge_after_bearer() -> None:
    header = 'Bearer realm="https://a.example/t",service="s", Negotiate'
    assert parse_challenges(header) == [
        Challenge("bearer", {"realm": "https://a.example/t", "service": "s"}),
        Challenge("negotiate", {}),
    ]


@pytest.mark.parametrize("header", ["", "   ", ",", '="x"', "@@@"])
def test_garbage_gives_no_challenge(header: str) -> None:
    assert parse_challenges(header) == []
    assert bearer_challenge(header) is None


def test_unterminated_quote_does_not_raise() -> None:
    challenges = parse_challenges('Bearer realm="https://a.example/t')
    assert [c.scheme for c in challenges] == ["bearer"]
    assert "realm" not in challenges[0].params


def test_long_header_parses_quickly() -> None:
    header = "Bearer " + ",".join(f'p{i}="{"x" * 50}\\"' + '"' for i in range(2000))
    (challenge,) = parse_challenges(header)
    assert len(challenge.params) == 2000


# --- scopes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scope"),
    [
        ("repository:library/ubuntu:pull", Scope("repository", "library/ubuntu", ("pull",))),
        ("repository:a/b:pull,push", Scope("repository", "a/b", ("pull", "push"))),
        (
            "repository:localhost:5000/team/app:pull,push",
            Scope("repository", "localhost:5000/team/app", ("pull", "push")),
        ),
        (
            "repository:10.0.0.1:5000/app:delete",
            Scope("repository", "10.0.0.1:5000/app", ("delete",)),
        ),
        ("repository(plugin):vieux/sshfs:pull", Scope("repository", "vieux/sshfs", ("pull",))),
        ("registry:catalog:*", Scope("registry", "catalog", ("*",))),
        ("repository:a:pull,,push", Scope("repository", "a", ("pull", "push"))),
        ("repository:a:", Scope("repository", "a", ())),
    ],
)
def test_parse_scope(text: str, scope: Scope) -> None:
    assert parse_scope(text) == scope


@pytest.mark.parametrize(
    "text", ["", "repository", "repository:", "repository:a", ":a:pull", "repository::pull", "::"]
)
def test_malformed_scope_is_none(text: str) -> None:
    assert parse_scope(text) is None


def test_scope_round_trip() -> None:
    scope = Scope("repository", "localhost:5000/a", ("pull", "push"))
    assert str(scope) == "repository:localhost:5000/a:pull,push"
    assert parse_scope(str(scope)) == scope
    assert repository_scope("localhost:5000/a", ("pull", "push")) == str(scope)
    assert parse_scope(repository_scope("a/b", ("pull",))) == Scope("repository", "a/b", ("pull",))


def test_parse_scopes_space_separated_and_repeated() -> None:
    scopes = parse_scopes(
        [
            "repository:a:pull repository:localhost:5000/b:push",
            "registry:catalog:*",
            "  repository:c:pull  ",
        ]
    )
    assert scopes == [
        Scope("repository", "a", ("pull",)),
        Scope("repository", "localhost:5000/b", ("push",)),
        Scope("registry", "catalog", ("*",)),
        Scope("repository", "c", ("pull",)),
    ]


def test_parse_scopes_skips_malformed() -> None:
    assert parse_scopes(["bogus repository:a:pull :x:y", "", "repository"]) == [
        Scope("repository", "a", ("pull",))
    ]
