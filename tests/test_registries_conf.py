"""registries.conf v2: parsing, matching, rewriting, drop-ins (proxy/names/registries_conf.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.names.references import Repository
from proxy.names.registries_conf import (
    RegistriesConf,
    RegistriesConfError,
    RegistryEntry,
    load_registries_conf,
    parse_registries_conf,
    registries_conf_files,
)

DIGEST = "sha256:" + "b" * 64


def conf_of(text: str, source: str = "registries.conf") -> RegistriesConf:
    return parse_registries_conf(textwrap.dedent(text), source)


def test_global_settings_and_aliases() -> None:
    conf = conf_of(
        """
        unqualified-search-registries = ["registry.fedoraproject.org", "quay.io", "docker.io"]
        short-name-mode = "enforcing"
        credential-helpers = ["pass"]

        [aliases]
        "fedora" = "registry.fedoraproject.org/fedora"
        "ubi9" = "registry.access.redhat.com/ubi9"
        "busybox" = "docker.io/library/busybox"
        "alpine" = "docker.io/alpine"
        """
    )
    assert conf.search == ("registry.fedoraproject.org", "quay.io", "docker.io")
    assert conf.short_name_mode == "enforcing"
    assert conf.aliases["fedora"] == Repository("registry.fedoraproject.org", "fedora")
    assert conf.aliases["alpine"] == Repository("docker.io", "library/alpine")
    assert conf.alias_sources["ubi9"] == "registries.conf"
    assert conf.registries == ()


def test_absent_keys_stay_unset() -> None:
    conf = conf_of("")
    assert conf.search is None and conf.short_name_mode is None and dict(conf.aliases) == {}


PREFIX_MATCHES = [
    ("example.com", "example.com/foo", True),
    ("example.com", "example.com/foo/bar:1", True),
    ("example.com", "example.com", True),
    ("example.com", "example.com.evil/foo", False),
    ("example.com", "evilexample.com/foo", False),
    # containers/image lets this match ("DON'T RELY"); for the gate it is another upstream.
    ("example.com", "example.com:5000/foo", False),
    ("example.com:5000", "example.com:5000/foo", True),
    ("example.com:5000", "example.com:50001/foo", False),
    ("example.com/foo", "example.com/foo", True),
    ("example.com/foo", "example.com/foo:1.0", True),
    ("example.com/foo", f"example.com/foo@{DIGEST}", True),
    ("example.com/foo", "example.com/foo/bar", True),
    ("example.com/foo", "example.com/foobar", False),
    ("example.com/foo", "example.com/fo", False),
    ("example.com/foo:1.0", "example.com/foo:1.0", True),
    ("example.com/foo:1.0", "example.com/foo:1.0.1", False),
    ("*.example.com", "a.example.com/x", True),
    ("*.example.com", "a.b.example.com/x/y:1", True),
    ("*.example.com", "a.example.com:5000/x", True),
    ("*.example.com", "example.com/x", False),
    ("*.example.com", "aexample.com/x", False),
    ("*.example.com", "a.example.com.evil/x", False),
    ("*.example.com", "evil.com/a.example.com/x", False),
]


@pytest.mark.parametrize(("prefix", "reference", "expected"), PREFIX_MATCHES)
def test_prefix_boundaries(prefix: str, reference: str, expected: bool) -> None:
    location = "" if prefix.startswith("*.") else prefix.partition("@")[0]
    entry = RegistryEntry(prefix, location, True, "registries.conf", 0)
    assert entry.matches(reference) is expected


def test_longest_prefix_wins() -> None:
    conf = conf_of(
        """
        [[registry]]
        location = "quay.io"
        blocked = true

        [[registry]]
        location = "quay.io/good"

        [[registry]]
        prefix = "*.corp.example"
        blocked = true

        [[registry]]
        location = "eu.corp.example"
        """
    )

    def prefix(reference: str) -> str | None:
        entry = conf.find(reference)
        return entry.prefix if entry is not None else None

    bad = conf.find("quay.io/bad/x")
    assert bad is not None and bad.blocked
    good = conf.find("quay.io/good/x:1")
    assert good is not None and not good.blocked and good.prefix == "quay.io/good"
    assert prefix("quay.io/goodness/x") == "quay.io"
    assert prefix("a.corp.example/x") == "*.corp.example"
    assert prefix("eu.corp.example/x") == "eu.corp.example"
    assert prefix("ghcr.io/x") is None


def test_location_rewrites_pulls() -> None:
    conf = conf_of(
        """
        [[registry]]
        prefix = "example.com/foo"
        location = "internal.example.com/bar"

        [[registry]]
        prefix = "docker.io/library"
        location = "registry.corp.example/hub"

        [[registry]]
        prefix = "quay.io/blocked"
        location = "mirror.example/q"
        blocked = true
        """
    )
    assert conf.pull_location(Repository("example.com", "foo/app")) == Repository(
        "internal.example.com", "bar/app"
    )
    assert conf.pull_location(Repository("example.com", "foo")) == Repository(
        "internal.example.com", "bar"
    )
    assert conf.pull_location(Repository.of("docker.io", "ubuntu")) == Repository(
        "registry.corp.example", "hub/ubuntu"
    )
    unchanged = Repository("example.com", "foobar/app")
    assert conf.pull_location(unchanged) is unchanged
    blocked = Repository("quay.io", "blocked/x")
    assert conf.pull_location(blocked) is blocked


INVALID = [
    ("[[registry]]\nblocked = true\n", "registry[0]: set location or prefix"),
    ("[[registry]]\nprefix = 'quay.io'\n", "registry[0].location: location is unset"),
    (
        "[[registry]]\nprefix = '*.example.com/x'\n",
        "registry[0].prefix: '*.example.com/x': a wildcard prefix is a host only",
    ),
    (
        "[[registry]]\nprefix = '*.example.com'\nlocation = 'x.example.com'\n",
        "registry[0].location: a wildcard prefix cannot be rewritten",
    ),
    ("[[registry]]\nlocation = 'https://quay.io'\n", "URI schemes are not supported"),
    ("[[registry]]\nlocation = 'quay.io'\nblocked = 'yes'\n", "registry[0].blocked: expected"),
    ("[[registry]]\nlocation = 'qu ay.io'\n", "registry[0].location: 'qu ay.io'"),
    (
        "[[registry]]\nprefix = 'quay.io/a:1'\nlocation = 'quay.io/b'\n",
        "rewriting a prefix that names a tag or digest is not supported",
    ),
    (
        "[[registry]]\nprefix = 'quay.io/a'\nlocation = 'quay.io/b:1'\n",
        "a location cannot carry a tag or digest",
    ),
    (
        "[[registry]]\nlocation = 'quay.io'\n\n[[registry]]\nprefix = 'quay.io/x'\n"
        "location = 'quay.io'\nblocked = true\n",
        "registry[1].blocked: registry 'quay.io' is defined more than once",
    ),
    ("[registries.search]\nregistries = ['quay.io']\n", "registries: the version 1 format"),
    ("short-name-mode = 'prompt'\n", "short-name-mode: 'prompt': expected one of"),
    ("unqualified-search-registries = 'quay.io'\n", "unqualified-search-registries: expected"),
    (
        "unqualified-search-registries = ['quay.io/ns']\n",
        "unqualified-search-registries[0]: 'quay.io/ns': expected host[:port]",
    ),
    ("[aliases]\n'x' = 'x'\n", "aliases.x: 'x' must be fully qualified"),
    ("[aliases]\n'x' = 'quay.io/x:1'\n", "aliases.x: 'quay.io/x:1' must not carry a tag"),
    ("[aliases]\n'quay.io/x' = 'quay.io/x'\n", "aliases.quay.io/x: an alias name is a short name"),
    ("[aliases\n", "invalid TOML"),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_files_name_file_and_key(text: str, message: str) -> None:
    with pytest.raises(RegistriesConfError) as raised:
        parse_registries_conf(text, "/etc/containers/registries.conf")
    assert str(raised.value).startswith("/etc/containers/registries.conf: ")
    assert message in str(raised.value)


def test_warnings_for_what_the_gate_ignores() -> None:
    conf = conf_of(
        """
        [[registry]]
        location = "quay.io"
        [[registry.mirror]]
        location = "mirror.example/quay"

        [[registry]]
        location = "quay.io"
        blocked = false

        [[registry]]
        location = "docker.io/alpine"
        blocked = true
        """
    )
    assert len(conf.registries) == 2
    text = "\n".join(conf.warnings)
    assert "mirrors are ignored" in text
    assert "prefix 'quay.io' repeated; ignored" in text
    assert "docker.io/library/alpine" in text


def test_drop_ins_merge_in_name_order(tmp_path: Path) -> None:
    main = tmp_path / "registries.conf"
    main.write_text(
        textwrap.dedent(
            """
            unqualified-search-registries = ["quay.io"]
            [aliases]
            "a" = "quay.io/x/a"
            "b" = "quay.io/x/b"
            [[registry]]
            location = "quay.io/bad"
            blocked = true
            """
        )
    )
    drop_ins = tmp_path / "registries.conf.d"
    drop_ins.mkdir()
    (drop_ins / "20-late.conf").write_text(
        'unqualified-search-registries = ["docker.io", "quay.io"]\n'
        '[aliases]\n"a" = ""\n"c" = "docker.io/library/c"\n'
    )
    (drop_ins / "10-early.conf").write_text(
        'short-name-mode = "disabled"\n[[registry]]\nlocation = "quay.io/bad"\nblocked = false\n'
    )
    (drop_ins / "notes.txt").write_text("not a drop-in")
    assert registries_conf_files(main) == [
        main,
        drop_ins / "10-early.conf",
        drop_ins / "20-late.conf",
    ]
    conf = load_registries_conf(main)
    assert conf.search == ("docker.io", "quay.io")
    assert conf.search_source == str(drop_ins / "20-late.conf")
    assert conf.short_name_mode == "disabled"
    assert set(conf.aliases) == {"b", "c"}
    assert conf.alias_sources["c"] == str(drop_ins / "20-late.conf")
    entry = conf.find("quay.io/bad/x")
    assert entry is not None and not entry.blocked
    assert entry.source == str(drop_ins / "10-early.conf")


def test_drop_ins_must_be_version_2(tmp_path: Path) -> None:
    main = tmp_path / "registries.conf"
    main.write_text("")
    (tmp_path / "registries.conf.d").mkdir()
    (tmp_path / "registries.conf.d" / "x.conf").write_text("[registries.block]\nregistries=[]\n")
    with pytest.raises(RegistriesConfError, match=r"x.conf: registries: the version 1"):
        load_registries_conf(main)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegistriesConfError, match="cannot read"):
        load_registries_conf(tmp_path / "nope.conf")
