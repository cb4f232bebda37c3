"""proxy/cli/client_config.py and `registry-gate client-config`: what an operator installs.

Through the real command line: a single-file target prints only that file (so
`client-config docker > daemon.json` is valid JSON), warnings go to stderr, and
`--output DIR` writes every file at its real path under DIR.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli import client_config
from tests.support.cli import run_cli

URL = "http://gate.example:5000"


def test_docker_stdout_is_the_daemon_json_alone_and_the_warning_goes_to_stderr() -> None:
    (proc,) = run_cli(["client-config", "docker", "--url", URL])
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert document == {
        "registry-mirrors": [URL],
        "insecure-registries": ["gate.example:5000"],
    }
    assert "WARNING" in proc.stderr and "egress" in proc.stderr.lower()


def test_podman_stdout_is_the_registries_conf_alone() -> None:
    (proc,) = run_cli(["client-config", "podman", "--url", URL])
    assert proc.returncode == 0, proc.stderr
    assert not proc.stdout.startswith("###")
    assert 'location = "gate.example:5000/docker.io"' in proc.stdout


def test_output_writes_each_file_at_its_real_path(tmp_path: Path) -> None:
    out = tmp_path / "root"
    docker, containerd, podman = run_cli(
        ["client-config", "docker", "--url", URL, "--output", str(out)],
        ["client-config", "containerd", "--url", URL, "--output", str(out)],
        ["client-config", "podman", "--url", URL, "--output", str(out)],
    )
    for proc in (docker, containerd, podman):
        assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "etc/docker/daemon.json").read_text())["registry-mirrors"] == [URL]
    hosts = (out / "etc/containerd/certs.d/docker.io/hosts.toml").read_text()
    assert f'server = "{URL}"' in hosts
    assert (out / "etc/containerd/certs.d/_default/hosts.toml").is_file()
    assert "[[registry]]" in (out / "etc/containers/registries.conf").read_text()
    # Each command lists what it wrote, one path a line.
    written = {Path(line) for line in containerd.stdout.splitlines()}
    assert out / "etc/containerd/certs.d/docker.io/hosts.toml" in written
    assert "WARNING" in docker.stderr


def test_output_into_an_unwritable_place_is_a_one_line_error_and_status_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    (proc,) = run_cli(["client-config", "docker", "--url", URL, "--output", str(blocker)])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("registry-gate: --output: cannot write")


def test_relative_path_never_leaves_the_output_folder() -> None:
    ok = client_config.GeneratedFile("/etc/docker/daemon.json", "{}")
    assert str(client_config.relative_path(ok)) == "etc/docker/daemon.json"
    for bad in ("/etc/../../x", "/", "../x"):
        with pytest.raises(ValueError):
            client_config.relative_path(client_config.GeneratedFile(bad, ""))


def test_no_subcommand_prints_the_help_and_version_prints_the_version() -> None:
    bare, version = run_cli([], ["--version"])
    assert bare.returncode == 0
    assert "usage: registry-gate" in bare.stdout and "client-config" in bare.stdout
    assert version.returncode == 0
    assert version.stdout.strip() == "registry-gate 0.1.0"
