"""proxy/cli/main.py: `check-config` exit statuses and one-line reasons (design §9)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.cli.main import EXIT_CONFIG, main
from tests.support.deployment import self_signed_cert
from tests.support.gate import GateProcess
from tests.support.registries import free_port

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
listen: 127.0.0.1:5000
storage:
  path: cache
  max_size: 20GiB
upstreams:
  - registry: docker.io
    url: https://registry-1.docker.io
    username: corp-mirror
    password_env: DOCKERHUB_TOKEN
  - registry: quay.io
    url: https://quay.io
  - registry: registry.corp.example
    url: http://127.0.0.1:5003
push_registry: registry.corp.example
policy:
  files: [@REPO@/policies/enterprise.yaml]
auth:
  mode: none
audit:
  path: audit.jsonl
"""


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_GATE_")}
    environ.setdefault("DOCKERHUB_TOKEN", "test-token")
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write(tmp_path: Path, text: str, name: str = "gate.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("@REPO@", str(REPO)))
    return path


def assert_one_line_config_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == EXIT_CONFIG == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("registry-gate: configuration error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in line
    return line


def test_good_config_exits_0(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(write(tmp_path, GOOD)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 3 upstreams, listen 127.0.0.1:5000, policy ")
    assert "(4 rules)" in result.stdout
    assert result.stderr == ""


def test_check_config_reads_what_serve_reads(tmp_path: Path) -> None:
    # The password variable named by password_env is unset: serve would fail, so must this.
    environ_without = {"DOCKERHUB_TOKEN": ""}
    result = run_cli("check-config", "--config", str(write(tmp_path, GOOD)), env=environ_without)
    assert result.returncode == 0  # set but empty is a value
    os_env = {k: v for k, v in os.environ.items() if k != "DOCKERHUB_TOKEN"}
    completed = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(tmp_path / "gate.yaml")],
        cwd=REPO,
        env={k: v for k, v in os_env.items() if not k.startswith("REGISTRY_GATE_")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert_one_line_config_error(completed, "password_env", "DOCKERHUB_TOKEN")


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        pytest.param("url: https://quay.io", "url: ftp://quay.io", "upstreams.1.url", id="url"),
        pytest.param("max_size: 20GiB", "max_size: plenty", "storage.max_size", id="size"),
        pytest.param("mode: none", "mode: kerberos", "auth.mode", id="auth-mode"),
        pytest.param("audit:\n", "audit:\n  colour: red\n", "audit.colour", id="unknown-key"),
        pytest.param("listen: 127.0.0.1:5000", "listen: nowhere", "listen", id="listen"),
        pytest.param(
            "    username: corp-mirror\n",
            "    usrname: corp-mirror\n",
            "upstreams.0.usrname",
            id="typo",
        ),
    ],
)
def test_bad_config_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, key: str
) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(SystemExit) as info:
        main(["check-config", "--config", str(path)])
    assert info.value.code == EXIT_CONFIG
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"registry-gate: configuration error: {path}: {key}: ")


def test_bad_config_exits_2_as_a_process(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("url: https://quay.io", "url: ftp://quay.io"))
    line = assert_one_line_config_error(run_cli("check-config", "--config", str(path)))
    assert f"{path}: upstreams.1.url: " in line


def test_env_override_is_checked_too(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = run_cli(
        "check-config", "--config", str(path), env={"REGISTRY_GATE_STORAGE__MAX_SIZE": "5 bananas"}
    )
    assert_one_line_config_error(result, "storage.max_size")
    result = run_cli(
        "check-config", "--config", str(path), env={"REGISTRY_GATE_STORAGE__MAX_SIZE": "5GiB"}
    )
    assert result.returncode == 0, result.stderr


def test_env_override_that_is_not_yaml_exits_2(tmp_path: Path) -> None:
    result = run_cli(
        "check-config", "--config", str(write(tmp_path, GOOD)), env={"REGISTRY_GATE_LISTEN": "[x"}
    )
    assert_one_line_config_error(result, "REGISTRY_GATE_LISTEN")


def test_invalid_yaml_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "  - [unclosed\n")
    assert_one_line_config_error(run_cli("check-config", "--config", str(path)), "invalid YAML")


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(tmp_path / "absent.yaml"))
    assert_one_line_config_error(result, "absent.yaml", "cannot read")


def test_check_config_requires_config() -> None:
    result = run_cli("check-config")
    assert result.returncode == 2
    assert "--config" in result.stderr


def test_serve_with_unset_password_env_exits_2(tmp_path: Path) -> None:
    # Settings load fine (the variable is read when the upstream client is built), but
    # serving must still fail as bad configuration: status 2, one line, no traceback.
    text = GOOD.replace("DOCKERHUB_TOKEN", "REGISTRY_GATE_TEST_UNSET_VARIABLE_0")
    result = run_cli("serve", "--config", str(write(tmp_path, text)))
    assert_one_line_config_error(result, "password_env", "REGISTRY_GATE_TEST_UNSET_VARIABLE_0")


def test_serve_bad_config_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("https://quay.io", "quay.io"))
    assert_one_line_config_error(run_cli("serve", "--config", str(path)), "upstreams.1.url")


def test_main_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKERHUB_TOKEN", "test-token")
    assert main(["check-config", "--config", str(write(tmp_path, GOOD))]) == 0
    assert capsys.readouterr().out.startswith("ok: 3 upstreams")


# -- start-up failures: one line naming the setting, from serve and check-config alike -----

START_UP = """\
listen: 127.0.0.1:@PORT@
storage:
  path: cache
upstreams:
  - registry: docker.io
    url: http://127.0.0.1:9
audit:
  path: audit/audit.jsonl
"""


def _start_up_config(tmp_path: Path, extra: dict[str, object], port: int | None = None) -> Path:
    document = yaml.safe_load(START_UP.replace("@PORT@", str(port or free_port())))
    for key, value in extra.items():
        node = document
        *parents, last = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    return write(tmp_path, yaml.safe_dump(document))


def _broken_setup(tmp_path: Path, case: str) -> tuple[dict[str, object], str]:
    """gate.yaml keys that break start-up in one way, and the setting the error names."""
    (tmp_path / "a-file").write_text("not a folder")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    for folder in ("tls", "other"):
        (tmp_path / folder).mkdir()
    cert, key = self_signed_cert(tmp_path / "tls")
    _other_cert, other_key = self_signed_cert(tmp_path / "other")
    return {
        "audit folder is a file": (
            {"audit.path": str(tmp_path / "a-file/audit.jsonl")},
            "audit.path",
        ),
        "storage folder under a file": (
            {"storage.path": str(tmp_path / "a-file/cache")},
            "storage.path",
        ),
        "pins path under a file": (
            {"policy.pins_path": str(tmp_path / "a-file/pins.json")},
            "policy.pins_path",
        ),
        "tls key missing": (
            {"tls": {"cert_file": str(cert), "key_file": str(tmp_path / "missing.pem")}},
            "tls",
        ),
        "tls key garbage": ({"tls": {"cert_file": str(cert), "key_file": str(garbage)}}, "tls"),
        "tls certificate and key mismatch": (
            {"tls": {"cert_file": str(cert), "key_file": str(other_key)}},
            "tls",
        ),
        "signing key garbage": (
            {"auth": {"mode": "token", "signing_key": str(garbage)}},
            "auth.signing_key",
        ),
        "htpasswd missing": (
            {
                "auth": {
                    "mode": "token",
                    "signing_key": str(key),
                    "htpasswd": str(tmp_path / "missing-htpasswd"),
                }
            },
            "htpasswd",
        ),
    }[case]


BROKEN = [
    "audit folder is a file",
    "storage folder under a file",
    "pins path under a file",
    "tls key missing",
    "tls key garbage",
    "tls certificate and key mismatch",
    "signing key garbage",
    "htpasswd missing",
]


@pytest.mark.parametrize("case", BROKEN)
@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_start_up_failures_are_one_line_naming_the_setting(
    tmp_path: Path, case: str, command: str
) -> None:
    extra, setting = _broken_setup(tmp_path, case)
    config = _start_up_config(tmp_path, extra)
    assert_one_line_config_error(run_cli(command, "--config", str(config)), setting)


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_listen_address_in_use(tmp_path: Path) -> None:
    with _listening_socket() as busy:
        config = _start_up_config(tmp_path, {}, port=busy.getsockname()[1])
        line = assert_one_line_config_error(run_cli("serve", "--config", str(config)), "listen")
        assert "address already in use" in line
        # check-config binds only when asked to (the gate may be running already).
        assert run_cli("check-config", "--config", str(config)).returncode == 0
        assert_one_line_config_error(
            run_cli("check-config", "--check-listen", "--config", str(config)), "listen:"
        )


def test_a_metrics_listen_address_in_use(tmp_path: Path) -> None:
    with _listening_socket() as busy:
        config = _start_up_config(
            tmp_path, {"metrics.listen": f"127.0.0.1:{busy.getsockname()[1]}"}
        )
        assert_one_line_config_error(run_cli("serve", "--config", str(config)), "metrics.listen")


def test_storage_in_use_by_another_gate(tmp_path: Path) -> None:
    """A failure only the opening itself finds (the storage lock) still names its setting."""
    with GateProcess(
        tmp_path / "first", {"upstreams": [{"registry": "docker.io", "url": "http://127.0.0.1:9"}]}
    ) as first:
        config = _start_up_config(tmp_path, {"storage.path": first.config["storage"]["path"]})
        assert_one_line_config_error(run_cli("serve", "--config", str(config)), "storage.path")


def test_pins_set_list_remove(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKERHUB_TOKEN", "test-token")
    config = str(write(tmp_path, GOOD))

    def pins(*args: str) -> tuple[int, str]:
        status = main(["policy", "pins", "--config", config, *args])
        return status, capsys.readouterr().out

    status, out = pins("set", "ubuntu", "registry.corp.example/ubuntu")
    assert status == 0 and '"repository": "registry.corp.example/ubuntu"' in out
    status, out = pins("list")
    assert status == 0 and out.count("\n") == 1 and '"name": "ubuntu"' in out
    assert pins("set", "ubuntu", "ghcr.io/ubuntu") == (
        2,
        "registry-gate: ghcr.io is not a configured upstream\n",
    )
    status, out = pins("set", "ubuntu", "ubuntu")
    assert status == 2 and "not a fully-qualified repository" in out
    status, out = pins("set", "quay.io/x", "quay.io/x")
    assert status == 2 and "not a short name" in out
    assert pins("remove", "ubuntu") == (0, "removed pin ubuntu\n")
    assert pins("list") == (0, "")
    with pytest.raises(SystemExit):
        pins("set", "ubuntu")
