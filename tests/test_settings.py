"""proxy/settings.py: gate.yaml as a user writes it, validation messages, env overrides."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.settings import (
    EMBEDDED_DEFAULT,
    ConfigError,
    Settings,
    apply_env_overrides,
    default_cache_dir,
    host_port,
    load_settings,
    parse_size,
)

# design.md §11, verbatim.
DESIGN_GATE_YAML = """\
listen: 127.0.0.1:5000
storage:
  path: /var/lib/registry-gate        # filesystem cache, the embedded default
  max_size: 20GiB
upstreams:
  - registry: docker.io
    url: https://registry-1.docker.io
    username: corp-mirror
    password_env: DOCKERHUB_TOKEN      # or password_file:
  - registry: quay.io
    url: https://quay.io
  - registry: registry.corp.example
    url: http://127.0.0.1:5003         # plain HTTP upstream on loopback
push_registry: registry.corp.example  # where short-name pushes go
policy:
  files: [policies/enterprise.yaml]
  # registries_conf: /etc/containers/registries.conf
auth:
  mode: none                           # or: token
  # htpasswd: /etc/registry-gate/htpasswd   # bcrypt entries (htpasswd -B)
  # signing_key: /etc/registry-gate/token.pem
  # groups:                                 # group -> members, for htpasswd users
  #   platform: [alice]
  # trusted_issuers:                        # tokens from an enterprise IdP
  #   - issuer: https://idp.corp.example
  #     audience: registry-gate
  #     jwks_file: /etc/registry-gate/idp-jwks.json
  #     groups_claim: groups
audit:
  path: /var/log/registry-gate/audit.jsonl
"""

MINIMAL = {"upstreams": [{"registry": "quay.io", "url": "https://quay.io"}]}


def write(tmp_path: Path, content: str | dict[str, Any], name: str = "gate.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = content if isinstance(content, str) else yaml.safe_dump(content)
    path.write_text(text)
    return path


def load(tmp_path: Path, content: str | dict[str, Any], **environ: str) -> Settings:
    return load_settings(write(tmp_path, content), environ)


def error_of(tmp_path: Path, content: str | dict[str, Any], **environ: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, content, **environ)
    message = str(info.value)
    assert "\n" not in message
    return message


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    doc = yaml.safe_load(yaml.safe_dump(base))
    doc.update(changes)
    return doc


# --- the design's gate.yaml --------------------------------------------------------------


def test_design_gate_yaml_is_accepted_as_written(tmp_path: Path) -> None:
    settings = load(tmp_path, DESIGN_GATE_YAML)
    assert settings.listen == "127.0.0.1:5000"
    assert settings.storage.path == Path("/var/lib/registry-gate")
    assert settings.storage.max_size == 20 * 1024**3
    assert [u.registry for u in settings.upstreams] == [
        "docker.io",
        "quay.io",
        "registry.corp.example",
    ]
    hub = settings.upstream("docker.io")
    assert hub is not None
    assert hub.url == "https://registry-1.docker.io"
    assert hub.username == "corp-mirror"
    assert hub.password_env == "DOCKERHUB_TOKEN"
    corp = settings.upstream("registry.corp.example")
    assert corp is not None
    assert corp.url == "http://127.0.0.1:5003"
    assert settings.push_registry == "registry.corp.example"
    assert settings.policy.files == [tmp_path / "policies" / "enterprise.yaml"]
    assert settings.auth.mode == "none"
    assert settings.audit.path == Path("/var/log/registry-gate/audit.jsonl")
    assert settings.upstream("ghcr.io") is None


def test_design_gate_yaml_with_its_commented_auth_keys_enabled(tmp_path: Path) -> None:
    head, rest = DESIGN_GATE_YAML.split("auth:\n")
    auth_block, tail = rest.split("audit:\n")
    lines = [
        line.replace("  # ", "  ", 1) if line.startswith("  # ") else line
        for line in auth_block.splitlines()
    ]
    auth_block = "\n".join(lines).replace("mode: none", "mode: token") + "\n"
    text = head + "auth:\n" + auth_block + "audit:\n" + tail
    settings = load(tmp_path, text)
    assert settings.auth.mode == "token"
    assert settings.auth.htpasswd == Path("/etc/registry-gate/htpasswd")
    assert settings.auth.groups == {"platform": ["alice"]}
    (issuer,) = settings.auth.trusted_issuers
    assert issuer.issuer == "https://idp.corp.example"
    assert issuer.audience == "registry-gate"
    assert issuer.jwks_file == Path("/etc/registry-gate/idp-jwks.json")
    assert issuer.algorithms == ["RS256", "ES256"]


def test_upstream_registry_names_are_normalised(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        {"upstreams": [{"registry": "Index.Docker.IO", "url": "https://registry-1.docker.io/"}]},
    )
    assert settings.upstreams[0].registry == "docker.io"
    assert settings.upstreams[0].url == "https://registry-1.docker.io"


def upstream_with(tmp_path: Path, **extra: Any) -> Any:
    table = [{"registry": "quay.io", "url": "http://127.0.0.1:5000", **extra}]
    return load(tmp_path, {"upstreams": table}).upstreams[0]


def test_realm_and_redirect_host_lists_are_separate_and_normalised(tmp_path: Path) -> None:
    upstream = upstream_with(
        tmp_path,
        allowed_redirect_hosts=["CDN.Example.net", "*.cdn.example.com", "127.0.0.2"],
        allowed_realm_hosts=["Login.Example.net", "[::1]", "a.*.example.org"],
    )
    assert upstream.allowed_redirect_hosts == ["cdn.example.net", "*.cdn.example.com", "127.0.0.2"]
    assert upstream.allowed_realm_hosts == ["login.example.net", "::1", "a.*.example.org"]
    assert upstream_with(tmp_path).allowed_realm_hosts == []


@pytest.mark.parametrize("key", ["allowed_redirect_hosts", "allowed_realm_hosts"])
@pytest.mark.parametrize(
    "entry",
    [
        "https://auth.example.com",
        "auth.example.com:443",
        "auth.example.com/token",
        "",
        "*",
        "*.*",
        "a..b",
        "user@auth.example.com",
        "auth example.com",
    ],
)
def test_host_list_entries_name_a_host_only(tmp_path: Path, key: str, entry: str) -> None:
    with pytest.raises(ConfigError, match=key):
        upstream_with(tmp_path, **{key: [entry]})


def test_circuit_settings(tmp_path: Path) -> None:
    assert upstream_with(tmp_path).circuit.failures == 5
    assert upstream_with(tmp_path).circuit.cooldown == 10.0
    upstream = upstream_with(tmp_path, circuit={"failures": 2, "cooldown": 0})
    assert (upstream.circuit.failures, upstream.circuit.cooldown) == (2, 0)
    for bad in ({"failures": 0}, {"cooldown": -1}, {"probe": 1}):
        with pytest.raises(ConfigError, match="circuit"):
            upstream_with(tmp_path, circuit=bad)


def test_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, MINIMAL)
    assert settings.listen == "127.0.0.1:5000"
    assert settings.storage.path.is_absolute()
    assert settings.storage.path.name == "registry-gate"
    assert settings.storage.max_size == 20 * 1024**3
    assert settings.auth.mode == "none"
    assert settings.auth.token_ttl == 300
    assert settings.log_format == "auto"
    assert (settings.request_body_timeout, settings.shutdown_timeout) == (30.0, 25.0)


def test_upload_rate_defaults_and_forms(tmp_path: Path) -> None:
    uploads = load(tmp_path, MINIMAL).uploads
    assert (uploads.min_rate, uploads.min_rate_window) == (1024, 30.0)
    for value, expected in (("1KiB/s", 1024), ("64KiB", 65536), (0, 0), ("2 MiB/s", 2 * 1024**2)):
        doc = with_(MINIMAL, uploads={"min_rate": value, "min_rate_window": 5})
        assert load(tmp_path, doc).uploads.min_rate == expected
    overridden = load_settings(
        write(tmp_path, MINIMAL), {"REGISTRY_GATE_UPLOADS__MIN_RATE": "10KiB/s"}
    )
    assert overridden.uploads.min_rate == 10 * 1024


def test_embedded_default() -> None:
    settings = load_settings(None, {})
    assert settings.listen == "127.0.0.1:5000"
    assert [u.registry for u in settings.upstreams] == ["docker.io"]
    assert settings.upstreams[0].url == "https://registry-1.docker.io"
    assert settings.storage.path.name == "registry-gate"
    assert EMBEDDED_DEFAULT["listen"] == "127.0.0.1:5000"


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "registry-gate"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "registry-gate"


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load(tmp_path, MINIMAL)
    with pytest.raises(Exception, match="frozen"):
        settings.listen = "0.0.0.0:1"  # type: ignore[misc]


# --- every bad key is named ----------------------------------------------------------------

BAD_UPSTREAM = {"registry": "quay.io", "url": "https://quay.io"}


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        pytest.param(with_(MINIMAL, bogus=1), "bogus", id="unknown-top-key"),
        pytest.param(with_(MINIMAL, storage={"max_size": "lots"}), "storage.max_size", id="size"),
        pytest.param(with_(MINIMAL, storage={"max_size": -1}), "storage.max_size", id="negative"),
        pytest.param(with_(MINIMAL, storage={"max_size": True}), "storage.max_size", id="bool"),
        pytest.param(with_(MINIMAL, storage={"maxsize": "1GiB"}), "storage.maxsize", id="typo"),
        pytest.param(with_(MINIMAL, storage={"tag_ttl": -5}), "storage.tag_ttl", id="ttl"),
        pytest.param(
            {"upstreams": [{"registry": "quay.io", "url": "ftp://quay.io"}]},
            "upstreams.0.url",
            id="url-scheme",
        ),
        pytest.param(
            {"upstreams": [BAD_UPSTREAM, {"registry": "ghcr.io", "url": "https://"}]},
            "upstreams.1.url",
            id="url-host",
        ),
        pytest.param(
            {"upstreams": [{"registry": "q.io", "url": "https://u:p@q.io"}]},
            "upstreams.0.url",
            id="url-credentials",
        ),
        pytest.param(
            {"upstreams": [{"registry": "q.io", "url": "https://q.io/?x=1"}]},
            "upstreams.0.url",
            id="url-query",
        ),
        pytest.param(
            {"upstreams": [{"registry": "Not A Host", "url": "https://q.io"}]},
            "upstreams.0.registry",
            id="registry",
        ),
        pytest.param(
            {"upstreams": [{"url": "https://q.io"}]}, "upstreams.0.registry", id="missing"
        ),
        pytest.param(
            {"upstreams": [dict(BAD_UPSTREAM, pasword_env="X")]},
            "upstreams.0.pasword_env",
            id="upstream-typo",
        ),
        pytest.param(
            {"upstreams": [dict(BAD_UPSTREAM, password_env="X")]},
            "upstreams.0",
            id="password-without-user",
        ),
        pytest.param(
            {"upstreams": [dict(BAD_UPSTREAM, username="u", password_env="X", password_file="f")]},
            "upstreams.0",
            id="two-password-sources",
        ),
        pytest.param(
            {"upstreams": [dict(BAD_UPSTREAM, insecure="maybe")]},
            "upstreams.0.insecure",
            id="bool",
        ),
        pytest.param(
            {"upstreams": [dict(BAD_UPSTREAM, timeouts={"connect": 0})]},
            "upstreams.0.timeouts.connect",
            id="timeout",
        ),
        pytest.param({"upstreams": []}, "upstreams", id="no-upstreams"),
        pytest.param({}, "upstreams", id="missing-upstreams"),
        pytest.param({"upstreams": "quay.io"}, "upstreams", id="not-a-list"),
        pytest.param(with_(MINIMAL, listen="localhost"), "listen", id="listen-no-port"),
        pytest.param(with_(MINIMAL, listen="0.0.0.0:70000"), "listen", id="listen-port"),
        pytest.param(with_(MINIMAL, listen=5000), "listen", id="listen-int"),
        pytest.param(with_(MINIMAL, policy={"files": "x.yaml"}), "policy.files", id="files"),
        pytest.param(with_(MINIMAL, policy={"file": ["x"]}), "policy.file", id="policy-typo"),
        pytest.param(with_(MINIMAL, auth={"mode": "ldap"}), "auth.mode", id="auth-mode"),
        pytest.param(with_(MINIMAL, auth={"mode": "token"}), "auth", id="token-needs-key"),
        pytest.param(with_(MINIMAL, auth={"token_ttl": 5}), "auth.token_ttl", id="ttl-min"),
        pytest.param(
            with_(MINIMAL, auth={"groups": {"platform": "alice"}}),
            "auth.groups.platform",
            id="groups",
        ),
        pytest.param(
            with_(
                MINIMAL,
                auth={"trusted_issuers": [{"issuer": "https://i", "audience": "a"}]},
            ),
            "auth.trusted_issuers.0",
            id="issuer-no-key",
        ),
        pytest.param(
            with_(
                MINIMAL,
                auth={
                    "trusted_issuers": [
                        {"issuer": "i", "audience": "a", "jwks_file": "j", "public_key_file": "p"}
                    ]
                },
            ),
            "auth.trusted_issuers.0",
            id="issuer-two-keys",
        ),
        pytest.param(
            with_(
                MINIMAL,
                auth={
                    "trusted_issuers": [
                        {"issuer": "i", "audience": "a", "jwks_file": "j", "algorithms": ["HS256"]}
                    ]
                },
            ),
            "auth.trusted_issuers.0.algorithms.0",
            id="issuer-hs256",
        ),
        pytest.param(
            with_(
                MINIMAL,
                auth={"trusted_issuers": [{"issuer": "i", "jwks_file": "j"}]},
            ),
            "auth.trusted_issuers.0.audience",
            id="issuer-no-audience",
        ),
        pytest.param(
            with_(MINIMAL, auth={"login_limits": {"per_user": {"burst": 0, "interval": 5}}}),
            "auth.login_limits.per_user.burst",
            id="login-burst",
        ),
        pytest.param(
            with_(MINIMAL, auth={"login_limits": {"per_client": {"burst": 5, "interval": 0}}}),
            "auth.login_limits.per_client.interval",
            id="login-interval",
        ),
        pytest.param(
            with_(MINIMAL, auth={"login_limits": {"per_ip": {"burst": 5, "interval": 1}}}),
            "auth.login_limits.per_ip",
            id="login-typo",
        ),
        pytest.param(
            with_(MINIMAL, auth={"operators": {"users": "alice"}}),
            "auth.operators.users",
            id="operators",
        ),
        pytest.param(with_(MINIMAL, audit={"path": ["x"]}), "audit.path", id="audit"),
        pytest.param(with_(MINIMAL, log_level="verbose"), "log_level", id="log-level"),
        pytest.param(
            with_(MINIMAL, metrics={"enabled": "sometimes"}), "metrics.enabled", id="metrics"
        ),
        pytest.param(
            with_(MINIMAL, request_body_timeout=0), "request_body_timeout", id="body-timeout"
        ),
        pytest.param(with_(MINIMAL, shutdown_timeout=-1), "shutdown_timeout", id="drain-negative"),
        pytest.param(with_(MINIMAL, shutdown_timeout=7200), "shutdown_timeout", id="drain-huge"),
        pytest.param(
            with_(MINIMAL, uploads={"min_rate": "fast"}), "uploads.min_rate", id="min-rate"
        ),
        pytest.param(
            with_(MINIMAL, uploads={"min_rate": -5}), "uploads.min_rate", id="min-rate-negative"
        ),
        pytest.param(
            with_(MINIMAL, uploads={"min_rate_window": 0}),
            "uploads.min_rate_window",
            id="min-rate-window",
        ),
        pytest.param(
            with_(MINIMAL, redis={"url": "redis://r:6379/0", "key_prefix": "two words"}),
            "redis.key_prefix",
            id="redis-prefix-space",
        ),
        pytest.param(
            with_(MINIMAL, redis={"url": "redis://r:6379/0", "key_prefix": ""}),
            "redis.key_prefix",
            id="redis-prefix-empty",
        ),
        pytest.param(
            with_(MINIMAL, redis={"url": "redis://r:6379/0", "key_prefix": "gate{a}:"}),
            "redis.key_prefix",
            id="redis-prefix-braces",
        ),
    ],
)
def test_bad_keys_are_named(tmp_path: Path, doc: dict[str, Any], key: str) -> None:
    message = error_of(tmp_path, doc)
    assert message.startswith(str(tmp_path / "gate.yaml") + ": ")
    assert f": {key}: " in message


def test_duplicate_upstreams_after_normalisation(tmp_path: Path) -> None:
    doc = {
        "upstreams": [
            {"registry": "docker.io", "url": "https://registry-1.docker.io"},
            {"registry": "index.docker.io", "url": "https://mirror.example"},
        ]
    }
    message = error_of(tmp_path, doc)
    assert "upstream registries listed twice" in message
    assert "docker.io" in message


def test_push_registry_must_be_an_upstream(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_(MINIMAL, push_registry="docker.io"))
    assert "push_registry 'docker.io' is not an upstream" in message


def test_push_registry_is_normalised_before_the_check(tmp_path: Path) -> None:
    doc = {
        "upstreams": [{"registry": "docker.io", "url": "https://registry-1.docker.io"}],
        "push_registry": "index.docker.io",
    }
    assert load(tmp_path, doc).push_registry == "index.docker.io"


def test_several_problems_are_counted(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_(MINIMAL, a=1, b=2, c=3))
    assert "(and 2 more problems)" in message
    message = error_of(tmp_path, with_(MINIMAL, a=1, b=2))
    assert "(and 1 more problem)" in message


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "listen: 127.0.0.1:5000\nupstreams: [\n  - x: [\n")
    assert "invalid YAML" in message
    assert "line" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    assert "(top level)" in error_of(tmp_path, text)


def test_empty_file_needs_upstreams(tmp_path: Path) -> None:
    assert ": upstreams: " in error_of(tmp_path, "")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml", {})


# --- sizes and listen addresses ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("20GiB", 20 * 1024**3),
        ("20gib", 20 * 1024**3),
        ("5GiB", 5 * 1024**3),
        ("500MB", 500 * 1000**2),
        ("500M", 500 * 1000**2),
        ("1.5GiB", int(1.5 * 1024**3)),
        ("1Ki", 1024),
        ("1KiB", 1024),
        ("2TiB", 2 * 1024**4),
        ("1PB", 1000**5),
        ("1024", 1024),
        ("1024B", 1024),
        (" 7 MiB ", 7 * 1024**2),
        (1048576, 1048576),
        (0, 0),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "lots", "-1GiB", "1XB", "GiB", "1 2", True, -1, "1e3"])
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:5000", ("127.0.0.1", 5000)),
        ("0.0.0.0:443", ("0.0.0.0", 443)),
        (":5000", ("0.0.0.0", 5000)),
        ("[::1]:5000", ("::1", 5000)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_host_port(listen: str, expected: tuple[str, int]) -> None:
    assert host_port(listen) == expected


@pytest.mark.parametrize("listen", ["5000", "host:", "host:0", "host:65536", "host:http", "a:-1"])
def test_host_port_refuses(listen: str) -> None:
    with pytest.raises(ValueError):
        host_port(listen)


# --- environment overrides ---------------------------------------------------------------


def test_env_override_storage_max_size(tmp_path: Path) -> None:
    settings = load(tmp_path, DESIGN_GATE_YAML, REGISTRY_GATE_STORAGE__MAX_SIZE="5GiB")
    assert settings.storage.max_size == 5 * 1024**3
    # The rest of the section is kept.
    assert settings.storage.path == Path("/var/lib/registry-gate")


def test_env_overrides_top_level_and_nested(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        DESIGN_GATE_YAML,
        REGISTRY_GATE_LISTEN="0.0.0.0:5000",
        REGISTRY_GATE_AUTH__MODE="none",
        REGISTRY_GATE_LOG_LEVEL="debug",
        REGISTRY_GATE_METRICS__LISTEN="127.0.0.1:9090",
        REGISTRY_GATE_POLICY__FILES="[a.yaml, b.yaml]",
    )
    assert settings.listen == "0.0.0.0:5000"
    assert settings.log_level == "debug"
    assert settings.metrics.listen == "127.0.0.1:9090"
    assert settings.policy.files == [tmp_path / "a.yaml", tmp_path / "b.yaml"]


def test_env_override_creates_missing_sections(tmp_path: Path) -> None:
    settings = load(tmp_path, MINIMAL, REGISTRY_GATE_AUDIT__STDOUT="true")
    assert settings.audit.stdout is True


def test_env_overrides_are_validated_with_the_key_path(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL, REGISTRY_GATE_STORAGE__MAX_SIZE="huge")
    assert ": storage.max_size: " in message
    message = error_of(tmp_path, MINIMAL, REGISTRY_GATE_STORAGE__COLOUR="blue")
    assert ": storage.colour: " in message


def test_env_override_with_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL, REGISTRY_GATE_LISTEN="[oops")
    assert "REGISTRY_GATE_LISTEN" in message


def test_unrelated_env_ignored(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        MINIMAL,
        REGISTRY_GATE_CONFIG="/etc/elsewhere.yaml",
        REGISTRY_GATE_="x",
        HOME="/root",
        registry_gate_listen="1.2.3.4:1",
    )
    assert settings.listen == "127.0.0.1:5000"


def test_apply_env_overrides_does_not_mutate_input() -> None:
    raw = {"storage": {"max_size": "1GiB"}}
    result = apply_env_overrides(raw, {"REGISTRY_GATE_STORAGE__MAX_SIZE": "2GiB"})
    assert raw == {"storage": {"max_size": "1GiB"}}
    assert result == {"storage": {"max_size": "2GiB"}}


def test_env_applies_to_the_embedded_default() -> None:
    settings = load_settings(None, {"REGISTRY_GATE_LISTEN": "127.0.0.1:6000"})
    assert settings.listen == "127.0.0.1:6000"


def test_os_environ_is_the_default_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_GATE_STORAGE__MAX_SIZE", "3GiB")
    assert load_settings(write(tmp_path, MINIMAL)).storage.max_size == 3 * 1024**3


# --- upstream passwords --------------------------------------------------------------------


def test_password_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(tmp_path, DESIGN_GATE_YAML)
    hub = settings.upstream("docker.io")
    assert hub is not None
    monkeypatch.setenv("DOCKERHUB_TOKEN", "dckr_pat_secret")
    assert hub.password() == "dckr_pat_secret"
    monkeypatch.delenv("DOCKERHUB_TOKEN")
    with pytest.raises(ConfigError) as info:
        hub.password()
    message = str(info.value)
    assert "password_env" in message
    assert "DOCKERHUB_TOKEN" in message
    assert "docker.io" in message


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "secrets" / "hub"
    secret.parent.mkdir()
    secret.write_text("s3cret\n")
    doc = {
        "upstreams": [
            {
                "registry": "docker.io",
                "url": "https://registry-1.docker.io",
                "username": "u",
                "password_file": str(secret),
            }
        ]
    }
    settings = load(tmp_path, doc)
    assert settings.upstreams[0].password() == "s3cret"
    secret.unlink()
    with pytest.raises(ConfigError) as info:
        settings.upstreams[0].password()
    assert "password_file" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_no_password(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL).upstreams[0].password() is None


def test_password_never_in_validation_errors(tmp_path: Path) -> None:
    doc = {
        "upstreams": [
            {"registry": "quay.io", "url": "https://user:hunter2@quay.io", "username": "user"}
        ]
    }
    message = error_of(tmp_path, doc)
    assert ": upstreams.0.url: " in message
    assert "hunter2" not in message


# --- relative paths ----------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc" / "gate"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    text = textwrap.dedent(
        """\
        storage: {path: cache}
        upstreams:
          - registry: docker.io
            url: https://registry-1.docker.io
            username: u
            password_file: secrets/hub
            ca_file: certs/ca.pem
        policy:
          files: [policies/a.yaml, /abs/b.yaml]
          registries_conf: registries.conf
          pins_path: state/pins.json
        auth:
          mode: token
          htpasswd: htpasswd
          signing_key: keys/token.pem
          groups_file: groups.yaml
          trusted_issuers:
            - issuer: https://idp.example
              audience: registry-gate
              jwks_file: idp/jwks.json
            - issuer: https://idp2.example
              audience: registry-gate
              public_key_file: idp2.pem
        audit: {path: logs/audit.jsonl}
        """
    )
    path = write(config_dir, text)
    settings = load_settings(Path("..") / "etc" / "gate" / "gate.yaml", {})
    base = path.parent.resolve()
    assert settings.storage.path == base / "cache"
    assert settings.policy.files == [base / "policies" / "a.yaml", Path("/abs/b.yaml")]
    assert settings.policy.registries_conf == base / "registries.conf"
    assert settings.policy.pins_path == base / "state" / "pins.json"
    assert settings.auth.htpasswd == base / "htpasswd"
    assert settings.auth.signing_key == base / "keys" / "token.pem"
    assert settings.auth.groups_file == base / "groups.yaml"
    assert settings.audit.path == base / "logs" / "audit.jsonl"
    upstream = settings.upstreams[0]
    assert upstream.password_file == base / "secrets" / "hub"
    assert upstream.ca_file == base / "certs" / "ca.pem"
    first, second = settings.auth.trusted_issuers
    assert first.jwks_file == base / "idp" / "jwks.json"
    assert second.public_key_file == base / "idp2.pem"


def test_relative_password_file_is_read_from_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "hub.secret").write_text("from-config-dir\n")
    monkeypatch.chdir(tmp_path)
    doc = {
        "upstreams": [
            {
                "registry": "docker.io",
                "url": "https://registry-1.docker.io",
                "username": "u",
                "password_file": "hub.secret",
            }
        ]
    }
    settings = load_settings(write(tmp_path / "conf", doc), {})
    assert settings.upstreams[0].password() == "from-config-dir"


_ONE_UPSTREAM = {"upstreams": [{"registry": "docker.io", "url": "https://registry-1.docker.io"}]}


@pytest.mark.parametrize(
    "url",
    [
        "registry.example.com",
        "ftp://registry.example.com",
        "https://u:p@r.example.com",
        "https://r.example.com/sub",
        "https://r.example.com/?x=1",
    ],
)
def test_public_url_must_be_a_bare_http_url(tmp_path: Path, url: str) -> None:
    assert "public_url" in error_of(tmp_path, with_(_ONE_UPSTREAM, public_url=url))


def test_token_realm_prefers_auth_realm_then_public_url(tmp_path: Path) -> None:
    plain = load(tmp_path, _ONE_UPSTREAM)
    assert plain.token_realm("http", "10.0.0.5:5000") == "http://10.0.0.5:5000/token"
    public = load(tmp_path, with_(_ONE_UPSTREAM, public_url="https://r.example.com/"))
    assert public.token_realm("http", "10.0.0.5:5000") == "https://r.example.com/token"
    realm = "https://auth.example.com/issue"
    both = load(
        tmp_path,
        with_(_ONE_UPSTREAM, public_url="https://r.example.com", auth={"realm": realm}),
    )
    assert both.token_realm("http", "10.0.0.5:5000") == realm


def test_redis_key_prefix(tmp_path: Path) -> None:
    shared = with_(MINIMAL, upload_secret="s" * 32)
    settings = load(tmp_path, with_(shared, redis={"url": "redis://redis:6379/0"}))
    assert settings.redis is not None and settings.redis.key_prefix == "registry-gate:"
    settings = load(
        tmp_path, with_(shared, redis={"url": "redis://redis:6379/0", "key_prefix": "gate/b:"})
    )
    assert settings.redis is not None and settings.redis.key_prefix == "gate/b:"


def test_event_loop_is_asyncio_unless_uvloop_is_chosen(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL).event_loop == "asyncio"
    assert load(tmp_path, with_(MINIMAL, event_loop="uvloop")).event_loop == "uvloop"
    assert "event_loop" in error_of(tmp_path, with_(MINIMAL, event_loop="trio"))
