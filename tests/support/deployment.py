"""Running the gate the way its deployments do, without Docker or Kubernetes.

Owns what ``test_dockerfile.py`` and ``test_helm_chart.py`` need to check that a
packaged configuration really starts a gate:

- ``AtomicDir``: a folder laid out like a kubelet ConfigMap/Secret/projected volume
  (timestamped payload folder, a ``..data`` symlink swapped atomically on update, and
  user-visible symlinks through ``..data``), so a test can update it the way Kubernetes
  does and see whether the gate notices;
- ``GateRun``: ``python3 -m proxy ARGS`` with a scrubbed environment, waiting until a
  health URL answers, stopped with SIGTERM (the container's stop signal);
- ``http_get``: one GET, HTTPS without certificate checks (like a kubelet probe);
- ``self_signed_cert``: a throwaway certificate and key for TLS checks.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

PROJECT_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
# Inherited variables that would change what the gate does (config overrides, proxies).
_SCRUBBED_PREFIX = "REGISTRY_GATE_"
_SCRUBBED = frozenset(
    {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    | {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"}
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET `url`; (status, body). HTTPS is not verified (a probe only asks "up?")."""
    context = ssl._create_unverified_context()
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


class AtomicDir:
    """A folder updated like a kubelet atomic-writer volume.

    Payload files live in ``..<timestamp>/``; ``..data`` points at the current payload;
    each top-level name (``gate.yaml``, ``policies``) is a symlink through ``..data``.
    ``write()`` lays a new payload and swaps ``..data`` with one rename.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._generation = 0

    def write(self, files: Mapping[str, bytes], mode: int = 0o440) -> None:
        """Replace the whole payload with `files` (relative path -> content)."""
        self._generation += 1
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y_%m_%d_%H_%M_%S")
        payload = self.root / f"..{stamp}.{self._generation:09d}"
        for relative, content in files.items():
            target = payload / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(mode)
        data = self.root / "..data"
        previous = data.resolve() if data.is_symlink() else None
        staging = self.root / "..data_tmp"
        staging.unlink(missing_ok=True)
        staging.symlink_to(payload.name)
        staging.rename(data)
        for top in {Path(relative).parts[0] for relative in files}:
            link = self.root / top
            if not link.is_symlink():
                link.symlink_to(Path("..data") / top)
        if previous is not None and previous != payload:
            shutil.rmtree(previous)


class GateStartError(RuntimeError):
    """The gate exited, or its health URL did not answer in time (message has its log)."""


class GateRun:
    """``python3 -m proxy ARGS`` as a child process, for use as a context manager."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        health_url: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.args = list(args)
        self.health_url = health_url
        self.log_path = log_path
        self.cwd = cwd
        environ = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(_SCRUBBED_PREFIX) and key not in _SCRUBBED
        }
        environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), environ.get("PYTHONPATH", "")) if p
        )
        environ.update(env or {})
        self.env = environ
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def log(self) -> str:
        """What the gate wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> GateRun:
        """Start the gate and wait until its health URL answers 200."""
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.returncode = self.process.returncode
                raise GateStartError(f"gate exited with status {self.returncode}:\n{self.log()}")
            try:
                status, _ = http_get(self.health_url, timeout=1.0)
            except OSError:
                status = 0
            if status == 200:
                return self
            time.sleep(0.1)
        self.kill()
        raise GateStartError(f"{self.health_url} did not answer in time:\n{self.log()}")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send `signum` and wait for the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        self.returncode = self.process.returncode
        return self.returncode

    def kill(self) -> None:
        """SIGKILL and reap (cleanup after a failure)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> GateRun:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.stop()
            finally:
                self.kill()


def self_signed_cert(directory: Path, host: str = "localhost") -> tuple[Path, Path]:
    """Write a throwaway EC certificate and key for `host` (and 127.0.0.1)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
