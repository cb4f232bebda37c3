"""A real full disk under the audit log, through the real gate process (issue 11 #17).

Each gate runs in its own mount namespace (``unshare --mount``) where its audit folder is
a 256 KiB tmpfs; the test reaches that file system through ``/proc/<pid>/root`` and fills
it with a filler file until the kernel answers ENOSPC, then frees it again. Nothing here
is mocked: the gate's writes fail the way they fail on a full volume.

- ``fail_closed`` (the default): once a write failed, pulls get 503 ``UNAVAILABLE`` at
  once (never a hang), ``/readyz`` is 503, and after the filler is removed the gate
  recovers by itself; every pull it served is in the audit log, which verifies.
- ``fail_open``: pulls are served, the records not written are counted in
  ``registry_gate_audit_dropped_total`` and logged, ``/readyz`` stays 200 ("degraded"),
  and SIGTERM on the full disk exits promptly.
- the stdout sink as the only sink, its stdout a file on the full tmpfs: the same as
  ``fail_closed`` with a file.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import run_cli
from tests.support.gate import GateProcess, standard_upstreams
from tests.support.metrics import wait_for_value
from tests.support.registry_client import MANIFEST_ACCEPT
from tests.support.upstreams import Upstreams
from tests.support.wire import Reply, request

MANIFEST = "/v2/docker.io/library/alpine/manifests/3.19"
ACCEPT = [("Accept", media_type) for media_type in MANIFEST_ACCEPT]
DROPPED = "registry_gate_audit_dropped_total"
MOUNT = 'mount -t tmpfs -o size=256k registry-gate-audit "$0" && exec "$@"'


def can_mount() -> bool:
    probe = ["unshare", "--mount", "--propagation", "private", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


pytestmark = pytest.mark.skipif(
    not can_mount(), reason="needs unshare --mount (root or CAP_SYS_ADMIN) for a small tmpfs"
)


class SmallDiskGate:
    """A gate whose audit folder is a private 256 KiB tmpfs."""

    def __init__(self, process: GateProcess, folder: Path) -> None:
        self.process = process
        self.folder = folder

    @property
    def disk(self) -> Path:
        """The tmpfs as the gate sees it, from outside its mount namespace."""
        return Path(f"/proc/{self.process.pid}/root{self.folder}")

    def fill(self) -> None:
        """Write a filler file until the file system is full (ENOSPC)."""
        fd = os.open(self.disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)

    def free(self) -> None:
        (self.disk / "filler").unlink()

    def pull(self) -> Reply:
        return request(self.process.url, "GET", MANIFEST, ACCEPT)

    def ready(self) -> Reply:
        return request(self.process.url, "GET", "/readyz")


Make = Callable[..., SmallDiskGate]


@pytest.fixture
def small_disk_gate(upstreams: Upstreams, tmp_path: Path) -> Iterator[Make]:
    made: list[GateProcess] = []

    def make(on_failure: str | None, *, stdout_only: bool = False) -> SmallDiskGate:
        """``on_failure`` None: the default; ``stdout_only``: no audit file, stdout is
        ``stdout.jsonl`` on the tmpfs."""
        folder = tmp_path / "audit-fs"
        folder.mkdir()
        script = MOUNT + (' >"$0/stdout.jsonl"' if stdout_only else "")
        audit: dict[str, Any] = {} if on_failure is None else {"on_failure": on_failure}
        if stdout_only:
            audit.update(path=None, stdout=True)
        else:
            audit["path"] = str(folder / "audit.jsonl")
        launcher = ["unshare", "--mount", "--propagation", "private", "--"]
        launcher += ["sh", "-c", script, str(folder)]
        process = GateProcess(
            tmp_path / "gate",
            {"upstreams": standard_upstreams(upstreams), "audit": audit},
            launcher=launcher,
            name="small-disk",
        )
        made.append(process)
        gate = SmallDiskGate(process, folder)
        process.start()
        return gate

    yield make
    for process in made:
        process.stop()


def until(condition: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    """Poll a condition that the gate reaches by itself (not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not reached in {seconds:.0f} s"
        time.sleep(0.1)


def pull_until_refused(gate: SmallDiskGate) -> tuple[int, Reply]:
    """Pull until the gate notices the full disk; (pulls served before, the refusal).

    The first records may still fit in a page the audit file already holds, and a
    record is queued before its write fails, so a few pulls are served first.
    """
    served = 0
    for _ in range(60):
        reply = gate.pull()
        if reply.status != 200:
            return served, reply
        served += 1
        time.sleep(0.05)
    raise AssertionError(f"{served} pulls served on a full audit disk, none refused")


def audit_lines(path: Path) -> list[dict[str, Any]]:
    """The records of an audit file; the torn bytes of a write the full disk cut off (kept,
    and accounted for by an ``audit_recovery`` record) are no record."""
    records = []
    for line in path.read_bytes().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def assert_verifies(path: Path) -> None:
    (result,) = run_cli(["audit", "verify", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def check_fail_closed(gate: SmallDiskGate, log: Path) -> None:
    assert gate.pull().status == 200
    assert gate.ready().status == 200
    gate.fill()
    served, refused = pull_until_refused(gate)
    assert refused.status == 503 and refused.error_codes == ["UNAVAILABLE"], refused
    assert "audit log" in refused.error_messages[0]
    assert str(gate.folder) not in refused.body.decode()  # no path for the client
    # Refused at once from now on, blob and tag requests too, and not ready.
    for _ in range(5):
        assert gate.pull().status == 503
    tags = request(gate.process.url, "GET", "/v2/docker.io/library/alpine/tags/list")
    assert tags.status == 503, tags
    unready = gate.ready()
    assert unready.status == 503 and "No space left" in unready.json()["audit"], unready

    gate.free()
    until(lambda: gate.ready().status == 200, "readiness after space was freed")
    assert gate.pull().status == 200
    # Every pull served is recorded, those queued while the disk was full included.
    pulls = 2 + served
    until(
        lambda: sum(r["event"] == "manifest_pull" for r in audit_lines(gate.disk / log)) == pulls,
        f"{pulls} manifest_pull records",
    )
    assert_verifies(gate.disk / log)


def test_fail_closed_refuses_at_once_is_unready_and_recovers(small_disk_gate: Make) -> None:
    """No ``audit.on_failure`` in gate.yaml: fail_closed is the default."""
    check_fail_closed(small_disk_gate(None), Path("audit.jsonl"))


def test_the_stdout_sink_alone_fails_closed_the_same_way(small_disk_gate: Make) -> None:
    check_fail_closed(small_disk_gate("fail_closed", stdout_only=True), Path("stdout.jsonl"))


def test_fail_open_serves_counts_the_records_it_lost_and_stops_promptly(
    small_disk_gate: Make,
) -> None:
    gate = small_disk_gate("fail_open")
    assert gate.pull().status == 200
    gate.fill()
    for _ in range(20):
        assert gate.pull().status == 200
        time.sleep(0.05)
    after = wait_for_value(gate.process.url, DROPPED, lambda v: v >= 1, reason="failing")
    assert after.value(DROPPED, reason="refused") == 0
    degraded = gate.ready()
    assert degraded.status == 200, degraded
    assert degraded.json()["status"] == "degraded" and "No space left" in degraded.json()["audit"]
    log = gate.process.log_text()
    assert "audit record not written" in log and MANIFEST.split("/")[-3] in log
    # SIGTERM with the disk still full: the queue is counted and logged, not waited for
    # (a stop that needed SIGKILL would return -9).
    assert gate.process.stop(timeout=30) == 0, gate.process.log_tail()
    assert "audit log closed with" in gate.process.log_text()
