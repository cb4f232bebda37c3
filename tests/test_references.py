"""proxy/names/references.py: name, tag and digest grammar; Docker Hub normalisation."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import DigestInvalid, NameInvalid, RegistryError, TagInvalid
from proxy.names.references import (
    MAX_NAME_LENGTH,
    ParsedReference,
    Repository,
    is_digest,
    looks_like_registry,
    normalize_registry,
    normalize_repository,
    parse_reference,
    strip_docker_library,
    validate_digest,
    validate_name,
    validate_reference,
    validate_registry,
    validate_tag,
)

SHA256 = "sha256:" + "a" * 64
SHA512 = "sha512:" + "0123456789abcdef" * 8


def assert_oci_error(exc: RegistryError, code: str, status: int) -> None:
    assert exc.code == code
    assert exc.status == status
    entry = json.loads(exc.body())["errors"][0]
    assert entry["code"] == code
    assert entry["message"]


# --- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "ubuntu",
        "library/ubuntu",
        "coreos/etcd",
        "a/b/c/d/e",
        "my-app",
        "my--app",
        "my_app",
        "my__app",
        "my.app",
        "a0/b1.c2_d3-e4",
        "9",
    ],
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Ubuntu",
        "library/Ubuntu",
        "..",
        "a/../b",
        "a/..",
        "../etc/passwd",
        "a..b",
        "a//b",
        "/a",
        "a/",
        "a%2Fb",
        "a%2e%2e",
        "a b",
        "a\nb",
        "ubuntu\n",
        "-a",
        "a-",
        "a_",
        ".a",
        "a___b",
        "a._b",
        "a:b",
        "a@b",
        "a\\b",
        "ü",
    ],
)
def test_invalid_names_are_name_invalid_400(name: str) -> None:
    with pytest.raises(NameInvalid) as info:
        validate_name(name)
    assert_oci_error(info.value, "NAME_INVALID", 400)


def test_name_length_limit_is_255() -> None:
    longest = "a" * MAX_NAME_LENGTH
    assert MAX_NAME_LENGTH == 255
    assert validate_name(longest) == longest
    path_like = "/".join(["ab"] * 85)  # 254 characters
    assert validate_name(path_like) == path_like
    with pytest.raises(NameInvalid):
        validate_name("a" * 256)
    with pytest.raises(NameInvalid):
        validate_name("/".join(["ab"] * 86))


def test_name_detail_is_bounded() -> None:
    with pytest.raises(NameInvalid) as info:
        validate_name("A" * 100_000)
    assert len(info.value.body()) < 1000


# --- tags --------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["latest", "1.0", "v1.2.3-rc.1", "_x", "A", "a" * 128, "3.18_x"])
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize(
    "tag", ["", ".hidden", "-x", "a" * 129, "a/b", "a:b", "a b", "x\n", "tag%2F", "ü"]
)
def test_invalid_tags_are_tag_invalid_400(tag: str) -> None:
    with pytest.raises(TagInvalid) as info:
        validate_tag(tag)
    assert_oci_error(info.value, "TAG_INVALID", 400)


# --- digests -----------------------------------------------------------------------------


def test_valid_digests() -> None:
    assert validate_digest(SHA256) == SHA256
    assert validate_digest(SHA512) == SHA512


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../x",
        "sha256:../../../etc/passwd",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "g" * 64,
        "sha512:" + "a" * 64,
        "sha512:" + "a" * 127,
        "sha512:" + "F" * 128,
        "sha256:",
        ":" + "a" * 64,
        "sha256" + "a" * 64,
        "SHA256:" + "a" * 64,
        "sha256:" + "a" * 64 + "\n",
        "sha256:" + "a" * 63 + "%",
        "sha256:" + "a" * 64 + "/x",
        "",
    ],
)
def test_malformed_digests_are_digest_invalid_400(digest: str) -> None:
    with pytest.raises(DigestInvalid) as info:
        validate_digest(digest)
    assert_oci_error(info.value, "DIGEST_INVALID", 400)


@pytest.mark.parametrize("digest", ["md5:" + "a" * 32, "sha384:" + "a" * 96, "blake3:" + "a" * 64])
def test_unknown_algorithm_is_refused(digest: str) -> None:
    with pytest.raises(DigestInvalid) as info:
        validate_digest(digest)
    assert "algorithm" in info.value.message


def test_validate_reference_dispatches_on_colon() -> None:
    assert is_digest(SHA256)
    assert not is_digest("latest")
    assert validate_reference("latest") == "latest"
    assert validate_reference(SHA256) == SHA256
    with pytest.raises(DigestInvalid):
        validate_reference("sha256:../../x")
    with pytest.raises(TagInvalid):
        validate_reference("../x")


# --- registries and Docker Hub normalisation ---------------------------------------------


@pytest.mark.parametrize(
    ("host", "normal"),
    [
        ("docker.io", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("Index.Docker.IO", "docker.io"),
        ("quay.io", "quay.io"),
        ("Quay.IO", "quay.io"),
        ("localhost:5000", "localhost:5000"),
        ("registry.corp.example:443", "registry.corp.example:443"),
    ],
)
def test_registry_normalisation(host: str, normal: str) -> None:
    assert normalize_registry(host) == normal
    assert validate_registry(host) == normal


@pytest.mark.parametrize(
    "host",
    ["", "evil.com/x", "a..b", ".quay.io", "quay.io.", "-a.com", "a:b", "a:", "h:123456", "a b"],
)
def test_invalid_registry_names(host: str) -> None:
    with pytest.raises(NameInvalid):
        validate_registry(host)


def test_registry_name_over_255_chars_is_invalid() -> None:
    with pytest.raises(NameInvalid):
        validate_registry("a." * 128 + "io")


@pytest.mark.parametrize(
    ("component", "expected"),
    [
        ("quay.io", True),
        ("localhost", True),
        ("localhost:5000", True),
        ("10.0.0.1:5000", True),
        ("library", False),
        ("ubuntu", False),
        ("local", False),
    ],
)
def test_looks_like_registry(component: str, expected: bool) -> None:
    assert looks_like_registry(component) is expected


def test_docker_hub_one_component_names_get_library() -> None:
    assert normalize_repository("docker.io", "ubuntu") == "library/ubuntu"
    assert normalize_repository("docker.io", "library/ubuntu") == "library/ubuntu"
    assert normalize_repository("docker.io", "bitnami/redis") == "bitnami/redis"
    assert normalize_repository("quay.io", "etcd") == "etcd"


def test_repository_of_normalises_registry_and_path() -> None:
    for host in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        repo = Repository.of(host, "ubuntu")
        assert repo == Repository("docker.io", "library/ubuntu")
        assert str(repo) == "docker.io/library/ubuntu"
    assert Repository.of("quay.io", "coreos/etcd") == Repository("quay.io", "coreos/etcd")


def test_repository_reference_string() -> None:
    repo = Repository.of("quay.io", "coreos/etcd")
    assert repo.reference(None) == "quay.io/coreos/etcd"
    assert repo.reference("v3") == "quay.io/coreos/etcd:v3"
    assert repo.reference(SHA256) == f"quay.io/coreos/etcd@{SHA256}"


# --- parse_reference ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ubuntu", ParsedReference(None, "ubuntu", None, None)),
        ("ubuntu:22.04", ParsedReference(None, "ubuntu", "22.04", None)),
        ("library/ubuntu:22.04", ParsedReference(None, "library/ubuntu", "22.04", None)),
        ("quay.io/coreos/etcd", ParsedReference("quay.io", "coreos/etcd", None, None)),
        ("quay.io/coreos/etcd:v3.5", ParsedReference("quay.io", "coreos/etcd", "v3.5", None)),
        ("localhost:5000/app", ParsedReference("localhost:5000", "app", None, None)),
        ("localhost:5000/app:1", ParsedReference("localhost:5000", "app", "1", None)),
        ("localhost/app", ParsedReference("localhost", "app", None, None)),
        ("10.0.0.1:5000/team/app:v1", ParsedReference("10.0.0.1:5000", "team/app", "v1", None)),
        (f"quay.io/a/b@{SHA256}", ParsedReference("quay.io", "a/b", None, SHA256)),
        (
            f"localhost:5000/a/b:v1@{SHA256}",
            ParsedReference("localhost:5000", "a/b", "v1", SHA256),
        ),
        (f"ubuntu@{SHA512}", ParsedReference(None, "ubuntu", None, SHA512)),
        (
            "index.docker.io/library/ubuntu",
            ParsedReference("docker.io", "library/ubuntu", None, None),
        ),
        ("registry-1.docker.io/x/y:z", ParsedReference("docker.io", "x/y", "z", None)),
    ],
)
def test_parse_reference(text: str, expected: ParsedReference) -> None:
    assert parse_reference(text) == expected


def test_parsed_reference_prefers_digest() -> None:
    assert parse_reference(f"a:t@{SHA256}").ref == SHA256
    assert parse_reference("a:t").ref == "t"
    assert parse_reference("a").ref is None


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("Ubuntu", NameInvalid),
        ("quay.io/", NameInvalid),
        ("quay.io/a/../b", NameInvalid),
        ("quay.io//a", NameInvalid),
        ("a%2Fb", NameInvalid),
        ("a:", TagInvalid),
        ("a:.bad", TagInvalid),
        ("a@", DigestInvalid),
        ("a@sha256:../../x", DigestInvalid),
        (f"a@{SHA256}@{SHA256}", DigestInvalid),
        ("a@md5:" + "a" * 32, DigestInvalid),
        ("a:b:c", NameInvalid),
        ("-bad.host/a", NameInvalid),
        ("", NameInvalid),
    ],
)
def test_parse_reference_refuses(text: str, error: type[RegistryError]) -> None:
    with pytest.raises(error):
        parse_reference(text)


# --- strip_docker_library ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "stripped"),
    [
        ("library/ubuntu", "ubuntu"),
        ("library/a/b", "library/a/b"),
        ("library", "library"),
        ("ubuntu", "ubuntu"),
        ("bitnami/redis", "bitnami/redis"),
        ("librarian/x", "librarian/x"),
    ],
)
def test_strip_docker_library(path: str, stripped: str) -> None:
    assert strip_docker_library(path) == stripped


# --- properties --------------------------------------------------------------------------

_NAME_ALPHABET = string.ascii_letters + string.digits + "._-/%:@ \\\n"


def _accepted(name: str) -> bool:
    try:
        validate_name(name)
    except NameInvalid:
        return False
    return True


@given(st.text(alphabet=_NAME_ALPHABET, max_size=300))
def test_validate_name_never_accepts_dangerous_forms(name: str) -> None:
    if _accepted(name):
        assert ".." not in name
        assert "//" not in name
        assert "%" not in name
        assert name == name.lower()
        assert not name.startswith("/")
        assert not name.endswith("/")
        assert 0 < len(name) <= MAX_NAME_LENGTH


@given(st.text(max_size=80), st.sampled_from(["..", "//", "%", "A", "Z", "%2F"]))
def test_validate_name_refuses_any_string_with_forbidden_piece(text: str, piece: str) -> None:
    middle = len(text) // 2
    assert not _accepted(text[:middle] + piece + text[middle:])


_COMPONENT = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,8}){0,2}", fullmatch=True)


@given(st.lists(_COMPONENT, min_size=1, max_size=5))
def test_validate_name_accepts_well_formed_paths(components: list[str]) -> None:
    name = "/".join(components)
    assert validate_name(name) == name


@given(st.text(max_size=200))
def test_validate_digest_accepts_only_strict_sha(text: str) -> None:
    try:
        validate_digest(text)
    except DigestInvalid:
        return
    algorithm, _, hexpart = text.partition(":")
    assert (algorithm, len(hexpart)) in {("sha256", 64), ("sha512", 128)}
    assert set(hexpart) <= set("0123456789abcdef")


@given(st.binary(min_size=32, max_size=32))
def test_any_sha256_hex_is_a_valid_digest(raw: bytes) -> None:
    digest = "sha256:" + raw.hex()
    assert validate_digest(digest) == digest
    assert parse_reference(f"quay.io/a/b@{digest}").digest == digest
