"""proxy/cli.py: `check-config` exit statuses and one-line reasons (design §9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import EXIT_CONFIG, main

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
