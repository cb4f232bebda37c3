"""proxy/cli/workers.py: how many workers, what makes each a replica, and the one-line
refusal of `--workers N` for settings whose workers could not share one cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import workers
from proxy.settings import ConfigError, Settings

REPO = Path(__file__).resolve().parent.parent


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    shared: dict[str, Any] = {
        "storage": {
            "path": str(tmp_path / "storage"),
            "backend": "s3",
            "s3": {"endpoint": "http://127.0.0.1:9", "bucket": "bucket", "region": "r"},
        },
        "redis": {"url": "redis://127.0.0.1:9/0"},
        "upload_secret": "x" * 32,
        "replica": {"id": "gate"},
        "audit": {"path": str(tmp_path / "{replica}.jsonl")},
        "upstreams": [{"registry": "docker.io", "url": "http://127.0.0.1:9"}],
    }
    shared.update(overrides)
    return Settings.model_validate(shared)


def test_the_default_is_the_cores_capped_when_workers_can_share(tmp_path: Path) -> None:
    cores = workers.usable_cores()
    assert workers.worker_count(settings(tmp_path), None) == min(cores, workers.WORKER_CAP)
    assert workers.worker_count(settings(tmp_path), 3) == 3


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"redis": None}, "redis and storage.backend s3"),
        ({"storage": {"path": "/tmp/x"}}, "redis and storage.backend s3"),
        ({"audit": {"path": "/tmp/audit.jsonl"}}, "audit.path"),
    ],
)
def test_settings_that_cannot_share_default_to_one_and_refuse_more(
    tmp_path: Path, overrides: dict[str, Any], named: str
) -> None:
    config = settings(tmp_path, **overrides)
    assert workers.worker_count(config, None) == 1
    assert workers.worker_count(config, 1) == 1
    with pytest.raises(ConfigError, match=named):
        workers.worker_count(config, 2)


@pytest.mark.parametrize(
    ("cpu_max", "limit"),
    [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("garbage", None)],
)
def test_usable_cores_follow_the_cgroup_cpu_limit(
    tmp_path: Path, cpu_max: str, limit: int | None
) -> None:
    cores = len(os.sched_getaffinity(0))
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert workers.usable_cores(path) == (cores if limit is None else min(cores, limit))
    assert workers.usable_cores(tmp_path / "absent") == cores


def test_zero_workers_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        workers.worker_count(settings(tmp_path), 0)


def test_a_worker_is_a_replica_of_its_own_with_the_one_pin_archive(tmp_path: Path) -> None:
    base = settings(tmp_path)
    one = workers.worker_settings(base, 1, "http://127.0.0.1:4000")
    assert one.replica.id == "gate-w1"
    assert one.peer_url() == "http://127.0.0.1:4000"
    assert one.audit_file == tmp_path / "gate-w1.jsonl"
    assert one.storage.path == tmp_path / "storage" / "workers" / "w1"
    assert one.policy.pins_path == tmp_path / "storage" / "pins.json"
    assert (one.listen, one.redis) == (base.listen, base.redis)


def test_the_peer_socket_is_a_free_port_on_the_peer_host(tmp_path: Path) -> None:
    sock, url = workers.peer_socket(settings(tmp_path))
    with sock:
        assert url == f"http://127.0.0.1:{sock.getsockname()[1]}"
    named = settings(tmp_path, replica={"id": "g", "peer_url": "https://127.0.0.1:5000"})
    sock, url = workers.peer_socket(named)
    with sock:
        assert url == f"https://127.0.0.1:{sock.getsockname()[1]}" and not url.endswith(":5000")


def test_serve_workers_2_without_shared_state_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "gate.yaml"
    config.write_text(
        f"storage:\n  path: {tmp_path / 'cache'}\nupstreams:\n"
        "  - {registry: docker.io, url: 'http://127.0.0.1:9'}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--workers", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [
        "registry-gate: configuration error: --workers 2: workers share the cache through "
        "redis and storage.backend s3 (see README)"
    ]
