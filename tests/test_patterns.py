"""Reference patterns: table-driven matching and boundary properties (proxy/policy/patterns.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from proxy.policy.patterns import PatternError, compile_pattern

MATCHES = [
    # A bare registry is that whole registry, never a longer host.
    ("docker.io", "docker.io/library/ubuntu", True),
    ("docker.io", "docker.io/bitnami/redis", True),
    ("docker.io", "docker.io.evil.com/library/ubuntu", False),
    ("docker.io", "evildocker.io/library/ubuntu", False),
    ("docker.io", "x.docker.io/library/ubuntu", False),
    ("docker.io", "docker.io:5000/library/ubuntu", False),
    ("index.docker.io", "docker.io/library/ubuntu", True),
    # `/**` spans components, anchored at the registry boundary.
    ("registry.corp.example/**", "registry.corp.example/a", True),
    ("registry.corp.example/**", "registry.corp.example/a/b/c", True),
    ("registry.corp.example/**", "registry.corp.example.evil/x", False),
    ("registry.corp.example/**", "evil-registry.corp.example/x", False),
    ("registry.corp.example/team-a/**", "registry.corp.example/team-a/app", True),
    ("registry.corp.example/team-a/**", "registry.corp.example/team-a/x/y", True),
    ("registry.corp.example/team-a/**", "registry.corp.example/team-ab/app", False),
    ("registry.corp.example/team-a/**", "registry.corp.example/team-b/team-a/app", False),
    # `*` stays inside one component.
    ("docker.io/library/*", "docker.io/library/ubuntu", True),
    ("docker.io/library/*", "docker.io/library/ubuntu/extra", False),
    ("docker.io/library/*", "docker.io/libraryx/ubuntu", False),
    ("quay.io/coreos/*", "quay.io/coreos/etcd", True),
    ("quay.io/coreos/*", "quay.io/coreos", False),
    ("quay.io/team-*/app", "quay.io/team-x/app", True),
    ("quay.io/team-*/app", "quay.io/team-x/y/app", False),
    ("quay.io/*/app", "quay.io/a/app", True),
    ("quay.io/*/app", "quay.io/a/b/app", False),
    # `**` in the middle: zero or more components.
    ("quay.io/a/**/z", "quay.io/a/z", True),
    ("quay.io/a/**/z", "quay.io/a/b/c/z", True),
    ("quay.io/a/**/z", "quay.io/az", False),
    ("quay.io/a/**/z", "quay.io/a/b/zz", False),
    # `**` alone and leading `**`.
    ("**", "docker.io/library/ubuntu", True),
    ("**", "localhost:5000/x", True),
    ("**/library/*", "docker.io/library/ubuntu", True),
    ("**/library/*", "quay.io/a/library/b", True),
    ("**/library/*", "quay.io/library/b/c", False),
    ("**/*/foo", "quay.io/foo", True),
    # Host wildcards: `*.` is subdomains only, `*` inside a label stays in the label.
    ("*.corp.example", "a.corp.example/x", True),
    ("*.corp.example", "a.b.corp.example/x/y", True),
    ("*.corp.example", "corp.example/x", False),
    ("*.corp.example", "evilcorp.example/x", False),
    ("*.corp.example", "a.corp.example.evil/x", False),
    ("*.corp.example", "a.corp.example:5000/x", False),
    ("*.corp.example/team/*", "a.corp.example/team/x", True),
    ("*.corp.example/team/*", "a.corp.example/other/x", False),
    ("registry-*.corp.example", "registry-eu.corp.example/x", True),
    ("registry-*.corp.example", "registry-eu.evil.corp.example/x", False),
    ("*", "docker.io/library/ubuntu", True),
    ("*", "localhost:5000/x", True),
    ("*/library/*", "docker.io/library/ubuntu", True),
    ("*/library/*", "quay.io/a/library/b", False),
    # Ports.
    ("localhost:5000", "localhost:5000/x", True),
    ("localhost:5000", "localhost:5001/x", False),
    ("localhost:5000", "localhost/x", False),
    ("localhost:*", "localhost:5001/x", True),
    ("localhost:*", "localhost/x", True),
    ("localhost:*", "localhost.evil/x", False),
    ("*.corp.example:*", "a.corp.example:443/x", True),
    # Docker Hub normalisation of one-component paths.
    ("docker.io/ubuntu", "docker.io/library/ubuntu", True),
    ("docker.io/*", "docker.io/library/ubuntu", True),
    ("docker.io/*", "docker.io/bitnami/redis", False),
    ("docker.io/bitnami/*", "docker.io/bitnami/redis", True),
    # Literal patterns match exactly.
    ("quay.io/coreos/etcd", "quay.io/coreos/etcd", True),
    ("quay.io/coreos/etcd", "quay.io/coreos/etcd-operator", False),
    ("quay.io/coreos/etcd", "quay.io/coreos/etcd/x", False),
    ("QUAY.IO/coreos/etcd", "quay.io/coreos/etcd", True),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), MATCHES)
def test_matching(pattern: str, name: str, expected: bool) -> None:
    assert compile_pattern(pattern).matches_name(name) is expected


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "non-empty"),
        ("docker.io/library/ubuntu:latest", "not tags"),
        ("docker.io/library/ubuntu@sha256:abc", "not digests"),
        ("docker.io//x", "empty path component"),
        ("docker.io/x/", "empty path component"),
        ("/x", "empty path component"),
        ("docker.io/a**b", "whole path component"),
        ("**.corp.example", "'**' in the registry part"),
        ("docker.io/Ubuntu", "invalid path component"),
        ("host:port/x", "invalid port"),
        ("a b", "whitespace"),
        ("ex ample.com", "whitespace"),
        ("exa_mple.com/x", "invalid registry"),
    ],
)
def test_invalid_patterns(pattern: str, message: str) -> None:
    with pytest.raises(PatternError, match=re.escape(message)):
        compile_pattern(pattern)


def test_canonical_forms() -> None:
    assert compile_pattern("docker.io").canonical == "docker.io/**"
    assert compile_pattern("index.docker.io/ubuntu").canonical == "docker.io/library/ubuntu"
    assert compile_pattern("*.corp.example").canonical == "*.corp.example/**"
    assert compile_pattern("**").any_registry


# --- properties ----------------------------------------------------------------------------

ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
alnum = st.text(ALNUM, min_size=1, max_size=6)
label = st.one_of(alnum, st.tuples(alnum, alnum).map("-".join))
component = st.one_of(alnum, st.tuples(alnum, st.sampled_from("._-"), alnum).map("".join))
host = st.lists(label, min_size=2, max_size=4).map(".".join).filter(lambda h: h != "docker.io")
path = st.lists(component, min_size=2, max_size=5).map("/".join)


def _oracle(pattern: list[str], name: list[str]) -> bool:
    """Component-wise glob matching: a boundary cannot be crossed by construction."""
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_oracle(rest, name[i:]) for i in range(len(name) + 1))
    if not name:
        return False
    regex = "[^/]*".join(re.escape(p) for p in head.split("*"))
    return re.fullmatch(regex, name[0]) is not None and _oracle(rest, name[1:])


@given(host, st.sampled_from([".evil.com", "x", "-x", ".x", ":5000", ":1"]), path)
def test_registry_pattern_never_matches_a_longer_host(h: str, suffix: str, p: str) -> None:
    for text in (h, f"{h}/**", f"{h}/*", f"{h}/{p}"):
        assert not compile_pattern(text).matches_name(f"{h}{suffix}/{p}")


@given(host, st.sampled_from(["evil", "evil-", "x.", "a.b."]), path)
def test_registry_pattern_never_matches_a_host_ending_with_it(h: str, prefix: str, p: str) -> None:
    for text in (h, f"{h}/**"):
        assert not compile_pattern(text).matches_name(f"{prefix}{h}/{p}")
        assert compile_pattern(text).matches_name(f"{h}/{p}")


@given(host, label, path)
def test_subdomain_wildcard_is_subdomains_only(h: str, sub: str, p: str) -> None:
    pattern = compile_pattern(f"*.{h}")
    assert pattern.matches_name(f"{sub}.{h}/{p}")
    assert not pattern.matches_name(f"{h}/{p}")
    assert not pattern.matches_name(f"{sub}{h}/{p}")
    longer = f"{sub}.{h}.{sub}"
    assume(not longer.endswith("." + h))
    assert not pattern.matches_name(f"{longer}/{p}")
    assert not pattern.matches_name(f"{sub}.{h}:5000/{p}")


@given(host, path, st.lists(component, min_size=1, max_size=3).map("/".join))
def test_prefix_pattern_is_anchored_at_a_component(h: str, p: str, more: str) -> None:
    pattern = compile_pattern(f"{h}/{p}/**")
    assert pattern.matches_name(f"{h}/{p}/{more}")
    assert not pattern.matches_name(f"{h}/{p}{more}")
    assert not pattern.matches_name(f"{h}/{p}-{more}")


@given(host, st.lists(component, min_size=1, max_size=3), component)
def test_single_star_never_spans_components(h: str, parts: list[str], extra: str) -> None:
    pattern = compile_pattern(f"{h}/{'/'.join([*parts[:-1], '*'])}")
    assert pattern.matches_name(f"{h}/{'/'.join(parts)}")
    assert not pattern.matches_name(f"{h}/{'/'.join(parts)}/{extra}")


pattern_component = st.one_of(
    component,
    st.just("*"),
    st.just("**"),
    component.map(lambda c: c[:2] + "*"),
)


@given(
    host,
    st.lists(pattern_component, min_size=1, max_size=4),
    st.lists(component, min_size=1, max_size=5),
)
def test_compiled_patterns_agree_with_a_componentwise_oracle(
    h: str, pattern_parts: list[str], name_parts: list[str]
) -> None:
    text = "/".join([h, *pattern_parts])
    pattern = compile_pattern(text)
    matched = pattern.matches_name("/".join([h, *name_parts]))
    assert matched == _oracle(pattern_parts, name_parts)
    # The namespace index never hides a pattern that matches.
    assert not matched or pattern.matches_head(name_parts[0])
    # Another registry never matches a literal-host pattern.
    assert not pattern.matches_name("/".join([h + "x", *name_parts]))


@given(st.lists(pattern_component, min_size=1, max_size=4), host, path)
def test_leading_double_star_agrees_with_the_oracle(
    pattern_parts: list[str], h: str, p: str
) -> None:
    text = "/".join(["**", *pattern_parts])
    name = [h, *p.split("/")]
    pattern = compile_pattern(text)
    matched = pattern.matches_name("/".join(name))
    assert matched == _oracle(["**", *pattern_parts], name)
    assert not matched or pattern.matches_head(name[1])
