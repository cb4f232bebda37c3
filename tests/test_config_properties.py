"""Properties of policy files, registries.conf and gate.yaml: any document an operator
(or a typo) writes is a configuration or a clean configuration error.

Documents are drawn from each format's own keys with values of any type (and as raw
text); loading raises only ConfigError (PolicyError, RegistriesConfError), never a
pydantic, YAML, TOML or Python error, so `check-config` and `serve` exit 2 with one line.
"""

from __future__ import annotations

import contextlib
import math
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.names.registries_conf import RegistriesConfError, parse_registries_conf
from proxy.policy.rules import PolicyError, parse_policies
from proxy.settings import ConfigError, apply_env_overrides, load_settings

PROPERTIES = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
KNOWN = ["docker.io", "quay.io", "registry.corp.example"]

_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            *KNOWN,
            "docker.io/library/*",
            "quay.io/**",
            "*",
            "**",
            "[",
            "a/b:c@d",
            "pull",
            "push",
            "delete",
            "allow",
            "deny",
            "enforce",
            "audit",
            "20GiB",
            "-1",
            "1e400",
            "9" * 400 + "GiB",
            "127.0.0.1:5000",
            "http://127.0.0.1:1",
            "ftp://x",
            "*-rc*",
            "permissive",
        ]
    ),
)
_ANY = st.recursive(
    _SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            _SCALAR.filter(lambda k: isinstance(k, str | int | bool) or k is None),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)


def document(keys: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping of some of a format's own keys (and a stray one), values of any shape."""
    return st.fixed_dictionaries({}, optional={**keys, "stray": _ANY})


_RULE = document(
    {
        key: st.one_of(_ANY, _SCALAR)
        for key in (
            "name",
            "match",
            "allow",
            "actions",
            "users",
            "groups",
            "deny_tags",
            "require_digest",
            "mode",
            "description",
        )
    }
)
_POLICY = document(
    {
        "search": st.one_of(_ANY, st.lists(_SCALAR, max_size=3)),
        "short_name_mode": _SCALAR,
        "aliases": st.one_of(_ANY, st.dictionaries(st.text(max_size=10), _SCALAR, max_size=3)),
        "default": _SCALAR,
        "rules": st.one_of(_ANY, st.lists(_RULE, max_size=3)),
    }
)
_YAML_TEXT = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=string.printable, max_size=200),
    st.sampled_from(["a: &x [*x]", "!!python/object:os.system {}", "a: 1\na: 2", "- [", "{"]),
)


def yaml_of(value: Any) -> str:
    return yaml.safe_dump(value, allow_unicode=True)


@PROPERTIES
@given(st.one_of(_POLICY.map(yaml_of), _ANY.map(yaml_of), _YAML_TEXT))
def test_any_policy_file_is_a_policy_or_a_policy_error(text: str) -> None:
    try:
        parse_policies([("policy.yaml", text)], known_registries=KNOWN)
    except PolicyError as error:
        assert str(error).startswith("policy.yaml")


# -- registries.conf ----------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """A TOML rendering of a JSON-like value (inline tables and arrays)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if math.isfinite(value) else "nan"
    if value is None:
        return '""'
    if isinstance(value, str):
        return (
            '"'
            + value.replace("\\", "\\\\")
            .replace('"', '\\"')
            .encode("ascii", "backslashreplace")
            .decode()
            .replace("\\x", "\\u00")
            + '"'
        )
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return (
        "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    )


_REGISTRY_ENTRY = document(
    {
        key: st.one_of(_SCALAR, _ANY)
        for key in ("prefix", "location", "insecure", "blocked", "mirror")
    }
)
_CONF = document(
    {
        "unqualified-search-registries": st.one_of(_ANY, st.lists(_SCALAR, max_size=3)),
        "short-name-mode": _SCALAR,
        "registry": st.one_of(_ANY, st.lists(_REGISTRY_ENTRY, max_size=3)),
        "aliases": st.one_of(_ANY, st.dictionaries(st.text(max_size=10), _SCALAR, max_size=3)),
    }
)


def toml_document(doc: dict[str, Any]) -> str:
    return "\n".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in doc.items()) + "\n"


@PROPERTIES
@given(st.one_of(_CONF.map(toml_document), st.text(max_size=200)))
def test_any_registries_conf_is_parsed_or_a_registries_conf_error(text: str) -> None:
    try:
        parse_registries_conf(text, "registries.conf")
    except RegistriesConfError as error:
        assert str(error).startswith("registries.conf")


# -- gate.yaml ----------------------------------------------------------------------------

_UPSTREAM = document(
    {
        key: st.one_of(_SCALAR, _ANY)
        for key in (
            "registry",
            "url",
            "username",
            "password_env",
            "password_file",
            "ca_file",
            "insecure",
            "timeouts",
            "allowed_redirect_hosts",
        )
    }
)
# Sizes as written, with as many digits as a typo can add.
_SIZE = st.tuples(
    st.integers(min_value=1, max_value=500), st.sampled_from(["", "B", "GiB", "KB", ".5 TB", "x"])
).map(lambda p: "9" * p[0] + p[1])
_STORAGE = document(
    {
        "path": _SCALAR,
        "max_size": st.one_of(_SCALAR, _SIZE),
        "tag_ttl": _SCALAR,
        "stale_limit": _SCALAR,
    }
)
_GATE = document(
    {
        "listen": _SCALAR,
        "storage": st.one_of(_ANY, _STORAGE),
        "upstreams": st.one_of(_ANY, st.lists(_UPSTREAM, max_size=2)),
        "push_registry": _SCALAR,
        "policy": _ANY,
        "auth": st.one_of(
            _ANY,
            document(
                {
                    k: _ANY
                    for k in (
                        "mode",
                        "htpasswd",
                        "signing_key",
                        "groups",
                        "trusted_issuers",
                        "token_ttl",
                    )
                }
            ),
        ),
        "audit": _ANY,
        "metrics": _ANY,
        "idle_timeout": _SCALAR,
        "log_level": _SCALAR,
    }
)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return tmp_path / "gate.yaml"


@PROPERTIES
@given(
    st.one_of(_GATE.map(yaml_of), _ANY.map(yaml_of), _YAML_TEXT),
    st.dictionaries(
        st.sampled_from(
            [
                "REGISTRY_GATE_LISTEN",
                "REGISTRY_GATE_STORAGE__MAX_SIZE",
                "REGISTRY_GATE_UPSTREAMS",
                "REGISTRY_GATE_AUTH__MODE",
                "REGISTRY_GATE___",
                "REGISTRY_GATE_STORAGE",
            ]
        ),
        st.one_of(_YAML_TEXT, _SCALAR.map(str)),
        max_size=2,
    ),
)
def test_any_gate_yaml_is_settings_or_a_config_error(
    config_file: Path, text: str, environ: dict[str, str]
) -> None:
    config_file.write_text(text)
    with contextlib.suppress(ConfigError):
        load_settings(config_file, environ)
    with contextlib.suppress(ConfigError):
        apply_env_overrides({}, environ)


@PROPERTIES
@given(st.one_of(_SIZE, _SCALAR))
def test_any_cache_size_is_a_size_or_a_config_error(config_file: Path, size: Any) -> None:
    upstream = {"registry": "docker.io", "url": "http://127.0.0.1:1"}
    config_file.write_text(yaml_of({"upstreams": [upstream], "storage": {"max_size": size}}))
    try:
        settings_ = load_settings(config_file, {})
    except ConfigError as error:
        assert "storage.max_size" in str(error)
        return
    assert settings_.storage.max_size >= 0
