"""proxy/names/addressing.py: endpoint parsing and the three addressing modes (design §2)."""

from __future__ import annotations

import json

import pytest

from proxy.errors import NameInvalid, NameUnknown, RegistryError
from proxy.names.addressing import Target, V2Route, locate, parse_v2_path
from proxy.names.references import Repository

KNOWN = frozenset({"docker.io", "quay.io", "registry.corp.example", "localhost:5003"})
SHA256 = "sha256:" + "b" * 64


# --- parse_v2_path -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ("ubuntu/manifests/latest", V2Route("manifest", "ubuntu", "latest")),
        (
            f"library/ubuntu/manifests/{SHA256}",
            V2Route("manifest", "library/ubuntu", SHA256),
        ),
        (
            "quay.io/coreos/etcd/manifests/v3",
            V2Route("manifest", "quay.io/coreos/etcd", "v3"),
        ),
        (f"a/b/blobs/{SHA256}", V2Route("blob", "a/b", SHA256)),
        ("a/b/blobs/uploads/", V2Route("upload_start", "a/b", None)),
        ("a/b/blobs/uploads", V2Route("upload_start", "a/b", None)),
        ("a/b/blobs/uploads/abc-123", V2Route("upload", "a/b", "abc-123")),
        ("a/b/tags/list", V2Route("tags", "a/b", None)),
        (f"a/b/referrers/{SHA256}", V2Route("referrers", "a/b", SHA256)),
        # A repository whose components look like endpoint words keeps them in its name.
        ("a/manifests/b/manifests/c", V2Route("manifest", "a/manifests/b", "c")),
        ("blobs/blobs/x", V2Route("blob", "blobs", "x")),
        ("tags/tags/list", V2Route("tags", "tags", None)),
    ],
)
def test_parse_v2_path_each_endpoint(tail: str, expected: V2Route) -> None:
    assert parse_v2_path(tail) == expected


@pytest.mark.parametrize(
    "tail",
    [
        "",
        "ubuntu",
        "ubuntu/manifests/",
        "ubuntu/manifests/a/b",
        "manifests/latest",
        "ubuntu/blobs/",
        "ubuntu/blobs/uploads/a/b",
        "ubuntu/tags/list/extra",
        "ubuntu/tags",
        "_catalog",
        "ubuntu/referrers/",
    ],
)
def test_parse_v2_path_unknown_shapes(tail: str) -> None:
    assert parse_v2_path(tail) is None


# --- locate: ns mode ---------------------------------------------------------------------


def test_ns_mode_uses_ns_as_the_registry() -> None:
    target = locate("coreos/etcd", "quay.io", KNOWN)
    assert target == Target("ns", "coreos/etcd", Repository("quay.io", "coreos/etcd"), ns="quay.io")


@pytest.mark.parametrize("ns", ["docker.io", "index.docker.io", "registry-1.docker.io"])
def test_ns_mode_normalises_docker_hub(ns: str) -> None:
    target = locate("ubuntu", ns, KNOWN)
    assert target.mode == "ns"
    assert target.repository == Repository("docker.io", "library/ubuntu")
    assert target.ns == ns


def test_ns_mode_name_is_a_repository_even_if_it_looks_like_a_host() -> None:
    target = locate("quay.io/x", "docker.io", KNOWN)
    assert target.repository == Repository("docker.io", "quay.io/x")


def test_ns_mode_with_port() -> None:
    target = locate("team/app", "localhost:5003", KNOWN)
    assert target.repository == Repository("localhost:5003", "team/app")


@pytest.mark.parametrize(
    "ns",
    [
        "evil.com",
        "10.0.0.1:5000",
        "2130706433",
        "127.1",
        "127.0.0.1",
        "localhost",
        "169.254.169.254",
        "0x7f000001",
        "quay.io.evil.com",
        "docker.io.evil.com",
        "localhost:5004",
    ],
)
def test_ns_not_configured_is_name_unknown_listing_registries(ns: str) -> None:
    with pytest.raises(NameUnknown) as info:
        locate("app", ns, KNOWN)
    error = info.value
    assert (error.code, error.status) == ("NAME_UNKNOWN", 404)
    assert error.detail["configured"] == sorted(KNOWN)
    entry = json.loads(error.body())["errors"][0]
    assert entry["detail"]["configured"] == sorted(KNOWN)
    assert "not configured" in entry["message"]


@pytest.mark.parametrize(
    "ns", ["::ffff:127.0.0.1", "[::1]:5000", "evil.com/x", "a b", "", "evil.com:port", "%2e"]
)
def test_ns_not_a_host_is_name_invalid(ns: str) -> None:
    with pytest.raises(NameInvalid):
        locate("app", ns, KNOWN)


def test_ns_known_but_name_invalid() -> None:
    with pytest.raises(NameInvalid):
        locate("../x", "quay.io", KNOWN)
    with pytest.raises(NameInvalid):
        locate("A/b", "quay.io", KNOWN)


def test_numeric_forms_accepted_only_when_configured() -> None:
    numeric = frozenset({"10.0.0.1:5000"})
    target = locate("app", "10.0.0.1:5000", numeric)
    assert target.repository == Repository("10.0.0.1:5000", "app")
    with pytest.raises(NameUnknown):
        locate("app", "10.0.0.1:5001", numeric)
    with pytest.raises(NameUnknown):
        locate("app", "10.0.0.1", numeric)


# --- locate: prefix mode -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "repository"),
    [
        ("quay.io/coreos/etcd", Repository("quay.io", "coreos/etcd")),
        ("docker.io/ubuntu", Repository("docker.io", "library/ubuntu")),
        ("index.docker.io/library/ubuntu", Repository("docker.io", "library/ubuntu")),
        ("registry-1.docker.io/bitnami/redis", Repository("docker.io", "bitnami/redis")),
        ("localhost:5003/team/app", Repository("localhost:5003", "team/app")),
        ("Quay.IO/coreos/etcd", Repository("quay.io", "coreos/etcd")),
    ],
)
def test_prefix_mode(name: str, repository: Repository) -> None:
    target = locate(name, None, KNOWN)
    assert target.mode == "prefix"
    assert target.requested == name
    assert target.repository == repository
    assert target.ns is None


@pytest.mark.parametrize(
    "name",
    [
        "evil.com/x",
        "localhost/x",
        "localhost:5000/x",
        "10.0.0.1:5000/x",
        "127.0.0.1/x",
        "2130706433.0/x",
        "127.1/x",
        "docker.io.evil.com/library/ubuntu",
        "quay.io:443/coreos/etcd",
    ],
)
def test_prefix_not_configured_is_name_unknown(name: str) -> None:
    with pytest.raises(NameUnknown) as info:
        locate(name, None, KNOWN)
    assert info.value.detail["configured"] == sorted(KNOWN)


@pytest.mark.parametrize(
    "name",
    [
        "quay.io/",
        "quay.io//x",
        "quay.io/../x",
        "quay.io/a/../b",
        "quay.io/A",
        "quay.io/a%2Fb",
        "::ffff:127.0.0.1/x",
        "quay.io",
        "registry.corp.example",
        "localhost:5003",
        "quay.io/" + "a" * 256,
    ],
)
def test_prefix_bad_names_are_name_invalid(name: str) -> None:
    with pytest.raises(NameInvalid) as info:
        locate(name, None, KNOWN)
    assert (info.value.code, info.value.status) == ("NAME_INVALID", 400)


# --- locate: short mode ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ubuntu", "library/ubuntu", "team/app", "a/b/c", "localhost"])
def test_short_mode(name: str) -> None:
    target = locate(name, None, KNOWN)
    assert target == Target("short", name, None, short_name=name)


@pytest.mark.parametrize(
    "name", ["", "Ubuntu", "..", "a/..", "a//b", "a%2Fb", "a" * 256, "/a", "a/", "a\\b"]
)
def test_short_bad_names_are_name_invalid(name: str) -> None:
    with pytest.raises(NameInvalid):
        locate(name, None, KNOWN)


def test_errors_are_registry_errors_before_any_io() -> None:
    # locate is pure: every refusal is an OCI error raised synchronously.
    for name, ns in [("x", "evil.com"), ("evil.com/x", None), ("X", None)]:
        with pytest.raises(RegistryError):
            locate(name, ns, KNOWN)


def test_empty_upstream_table_lists_nothing() -> None:
    with pytest.raises(NameUnknown) as info:
        locate("x", "quay.io", frozenset())
    assert info.value.detail["configured"] == []
