"""A real Docker daemon (Debian ``docker.io`` 20.10) whose ``registry-mirrors`` is the gate.

Every daemon is configured with the ``daemon.json`` that ``registry-gate client-config
docker`` generates (``tests/support/dockerd.py``), runs with private state in its own
mount namespace, and only inside a loopback-only network namespace: a daemon falls back
to ``registry-1.docker.io`` on any mirror error, and here that fallback fails with
"network is unreachable". So a pull that succeeds was served by the gate, and the
content (the ``gate.origin`` label, the repo digest) says from which upstream.

What is proved:

- the wire pattern Docker uses (``GET /v2/``, ``HEAD`` by tag with six ``Accept``
  lines including ``application/json``, ``Connection: close`` on every request, ``Range:
  bytes=N-`` with ``Accept-Encoding: gzip`` on a resumed blob) is served well;
- un-prefixed mirror pulls are short names: the default search list gives Docker Hub,
  a corp-first list gives corp (OCI index, Docker manifest list, schema2, user image,
  by tag and by digest);
- a denied pull: the user sees only Docker Hub's network error (fail-open), the gate's
  audit log has the denial and ``registry_gate_denials_to_docker_clients_total`` moved;
- ``docker login`` + ``docker push GATE/registry.corp.example/team/app:1`` with token
  auth; the image lands on the corp upstream;
- a layer transfer truncated between gate and upstream: the gate cuts the client's
  response short, the daemon retries with ``Range: bytes=N-`` and the gate answers 206.
"""

from __future__ import annotations

import io
import json
import platform
import random
import re
import socket
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import in_ci
from tests.support import dockerd as dockerd_support
from tests.support.dockerd import (
    DockerDaemon,
    DockerdStartError,
    DockerError,
    docker_missing,
    loopback_only_netns,
    short_state_dir,
)
from tests.support.gate import GateFactory, GateProcess, policy_document, standard_upstreams
from tests.support.images import (
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    ORIGIN_LABEL,
    Layout,
    PushedRef,
    PushSpec,
    build_image,
    push,
)
from tests.support.registries import RegistryFactory
from tests.support.registry_client import RegistryClient
from tests.support.upstreams import Upstreams
from tests.support.wire import Reply, raw_request

pytestmark = pytest.mark.e2e

# What dockerd 20.10 sends (observed): its user agent, and one Accept line per type.
DOCKER_UA = (
    "docker/20.10.24+dfsg1 go/go1.19.8 git-commit/5d6db84 kernel/6.1.0 os/linux arch/amd64 "
    "UpstreamClient(Docker-Client/20.10.24+dfsg1 \\(linux\\))"
)
DOCKER_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
)
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
# What a Hub fallback looks like inside the loopback-only namespace.
HUB_UNREACHABLE = re.compile(
    r"registry-1\.docker\.io.*(network is unreachable|no such host|lookup|connection refused)",
    re.DOTALL,
)
DockerdFactory = Callable[..., DockerDaemon]


def skip_or_fail(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dockerd_allowed() -> None:
    """Skip (fail under CI=true) when docker.io is missing or this is not a private,
    loopback-only network namespace. Session scope and first in the tests' signatures:
    checked before the registries start."""
    reason = docker_missing()
    if reason:
        skip_or_fail(f"Docker daemon tests need docker.io: {reason}")
    if not loopback_only_netns():
        skip_or_fail(
            "Docker daemon tests run only inside a private loopback-only network namespace "
            "(dockerd falls back to registry-1.docker.io): run them with tests/run"
        )


@pytest.fixture
def dockerd_factory(
    dockerd_allowed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DockerdFactory]:
    """``make(gate, **kwargs) -> DockerDaemon`` (started, mirror = the gate), stopped
    and wiped after the test (the log is printed on failure by ``pulled``)."""
    daemons: list[DockerDaemon] = []

    def make(gate: GateProcess, **kwargs: Any) -> DockerDaemon:
        directory = short_state_dir(tmp_path_factory.mktemp("dockerd"))
        daemon = DockerDaemon(directory, gate.url, **kwargs)
        daemons.append(daemon)
        return daemon.start()

    yield make
    for daemon in daemons:
        daemon.wipe()


def pulled(daemon: DockerDaemon, gate: GateProcess, reference: str) -> str:
    """``docker pull reference``; on failure the error shows the gate's and the
    daemon's logs (the CLI shows only Docker Hub's error after a fallback)."""
    try:
        return daemon.pull(reference).stdout
    except DockerError as exc:
        raise AssertionError(
            f"{exc}\n--- gate log ---\n{gate.log_tail()}\n--- dockerd log ---\n{daemon.log_tail()}"
        ) from None


def repo_digest(daemon: DockerDaemon, reference: str) -> str:
    """The manifest digest the daemon pulled ``reference`` by (from RepoDigests)."""
    digests = daemon.inspect(reference).get("RepoDigests") or []
    assert digests, f"{reference} has no RepoDigests"
    return str(digests[0]).rpartition("@")[2]


def metric(gate: GateProcess, name: str, **labels: str) -> float:
    """One sample of the gate's ``/metrics`` (0 when absent)."""
    with urllib.request.urlopen(f"{gate.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        key, _, rest = sample.partition("{")
        if key != name:
            continue
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if got == want:
            return float(value)
    return 0.0


def audit_records(gate: GateProcess) -> list[dict[str, Any]]:
    path = gate.directory / "audit.jsonl"
    deadline = time.monotonic() + 5
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll (the audit writer is a thread): True once ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def docker_lines() -> list[tuple[str, str]]:
    """Docker's headers for a manifest request: its UA, six Accept lines in random order."""
    accept = list(DOCKER_ACCEPT)
    random.shuffle(accept)
    return [("User-Agent", DOCKER_UA), *(("Accept", a) for a in accept)]


def gate_request(gate: GateProcess, method: str, path: str, headers: Any = ()) -> Reply:
    """One request with ``Connection: close``, read to EOF: it returns only because the
    gate closes the connection as asked."""
    return raw_request("127.0.0.1", gate.port, method, path, headers)


# -- Docker's wire pattern, request by request -------------------------------------------------


def test_docker_request_pattern_is_served(gate: GateProcess, upstreams: Upstreams) -> None:
    """``GET /v2/``; ``HEAD`` by tag answered with ``Docker-Content-Digest`` (so the
    daemon does not fall back to GET by tag); GET by that digest; every request with
    ``Connection: close`` and the gate closing the connection."""
    ping = gate_request(gate, "GET", "/v2/", [("User-Agent", DOCKER_UA)])
    assert ping.status == 200
    assert ping.header("Docker-Distribution-API-Version") == "registry/2.0"

    for tag, media_type in (("3.19", MT_OCI_INDEX), ("3.19-v2s2", MT_DOCKER_LIST)):
        pushed = upstreams.hub[f"library/alpine:{tag}"]
        head = gate_request(gate, "HEAD", f"/v2/library/alpine/manifests/{tag}", docker_lines())
        assert head.status == 200, head
        assert head.header("Docker-Content-Digest") == pushed.digest
        assert head.header("Content-Type") == media_type
        assert head.header("Content-Length") == str(len(pushed.raw))
        get = gate_request(
            gate, "GET", f"/v2/library/alpine/manifests/{pushed.digest}", docker_lines()
        )
        assert get.status == 200, get
        assert get.body == pushed.raw
        assert get.header("Content-Type") == media_type


def test_resumed_blob_with_docker_headers(gate_factory: GateFactory, upstreams: Upstreams) -> None:
    """What a resuming daemon sends for a layer (``Range: bytes=N-``, ``Accept-Encoding:
    gzip``, ``Connection: close``) gets 206 with ``Content-Range`` and the exact tail,
    uncompressed: on a cold cache (streamed from the fill) and from the cache."""
    gate = gate_factory({"upstreams": standard_upstreams(upstreams)}, name="range-gate")
    pushed = upstreams.hub["library/busybox:1.36"]
    layer = pushed.manifest.layers[0]
    data = upstreams.hub.images.blob_bytes(layer.digest)
    offset = len(data) // 3
    headers = [
        ("User-Agent", DOCKER_UA),
        ("Range", f"bytes={offset}-"),
        ("Accept-Encoding", "gzip"),
    ]
    path = f"/v2/library/busybox/blobs/{layer.digest}"
    for attempt in ("cold", "cached"):
        reply = gate_request(gate, "GET", path, headers)
        assert reply.status == 206, (attempt, reply)
        assert reply.header("Content-Range") == f"bytes {offset}-{len(data) - 1}/{len(data)}"
        assert reply.header("Content-Length") == str(len(data) - offset)
        assert reply.header("Content-Encoding") in (None, "identity"), attempt
        assert reply.body == data[offset:], attempt


# -- pulls through a daemon ------------------------------------------------------------------


def test_daemon_pulls_short_names_from_hub_by_default(
    dockerd_factory: DockerdFactory, gate_factory: GateFactory, upstreams: Upstreams
) -> None:
    """No policy file: the default search list is docker.io, so the daemon's
    ``/v2/library/alpine/...`` is Docker Hub's. Index, manifest list, schema2, a user
    image, and a pull by digest, each proved by digest (and label where there is one)."""
    gate = gate_factory({"upstreams": standard_upstreams(upstreams)}, name="hub-gate")
    daemon = dockerd_factory(gate)
    assert daemon.generated["registry-mirrors"] == [gate.url]
    assert daemon.mirrors() == [f"{gate.url}/"]
    assert "egress" in daemon.warning.lower()

    hub = upstreams.hub
    pulled(daemon, gate, "alpine:3.19")
    assert daemon.label("alpine:3.19", ORIGIN_LABEL) == "hub"
    assert repo_digest(daemon, "alpine:3.19") == hub["library/alpine:3.19"].digest

    index_digest = hub["library/alpine:3.19"].digest  # the OCI index, by digest
    pulled(daemon, gate, f"alpine@{index_digest}")
    assert repo_digest(daemon, f"alpine@{index_digest}") == index_digest

    pulled(daemon, gate, "team/app:1")  # a user image: single OCI manifest
    assert daemon.label("team/app:1", ORIGIN_LABEL) == "hub"
    assert repo_digest(daemon, "team/app:1") == hub["team/app:1"].digest

    pulled(daemon, gate, "alpine:3.19-v2s2")  # Docker manifest list
    assert daemon.label("alpine:3.19-v2s2", ORIGIN_LABEL) == "hub"
    assert repo_digest(daemon, "alpine:3.19-v2s2") == hub["library/alpine:3.19-v2s2"].digest

    schema2: PushedRef = hub["library/busybox:1.36-v2s2"]  # Docker schema2, by digest
    assert schema2.media_type == MT_DOCKER_MANIFEST
    pulled(daemon, gate, f"busybox@{schema2.digest}")
    assert repo_digest(daemon, f"busybox@{schema2.digest}") == schema2.digest


def test_daemon_pulls_short_names_corp_first(
    dockerd_factory: DockerdFactory, gate_factory: GateFactory, upstreams: Upstreams
) -> None:
    """With the enterprise search order ``[registry.corp.example, docker.io]`` the same
    ``docker pull team/app:1`` is corp's image (label ``corp``, corp's digest). The
    daemon's ``library/`` belongs to Docker Hub (design §2): ``alpine`` is looked up as
    ``registry.corp.example/alpine`` (absent) and then ``docker.io/library/alpine``. Corp's
    ``library/alpine`` is pulled by its full name through the gate (path prefix)."""
    gate = gate_factory(
        # A Docker daemon pulls anonymously: let anyone pin on this auth-less gate.
        {"upstreams": standard_upstreams(upstreams), "policy": {"pin_creators": "anyone"}},
        policy=policy_document(["registry.corp.example", "docker.io"]),
        name="corp-gate",
    )
    daemon = dockerd_factory(gate)
    pulled(daemon, gate, "team/app:1")
    assert daemon.label("team/app:1", ORIGIN_LABEL) == "corp"
    assert repo_digest(daemon, "team/app:1") == upstreams.corp["team/app:1"].digest
    assert upstreams.corp["team/app:1"].digest != upstreams.hub["team/app:1"].digest
    # The resolution is pinned: the same command keeps meaning corp's image.
    pins = json.loads((gate.directory / "storage" / "pins.json").read_text())["pins"]
    assert pins["team/app"]["repository"] == "registry.corp.example/team/app"

    pulled(daemon, gate, "alpine:3.19")
    assert daemon.label("alpine:3.19", ORIGIN_LABEL) == "hub"
    assert repo_digest(daemon, "alpine:3.19") == upstreams.hub["library/alpine:3.19"].digest

    corp_alpine = f"{gate.host}/registry.corp.example/library/alpine:3.19"
    pulled(daemon, gate, corp_alpine)
    assert daemon.label(corp_alpine, ORIGIN_LABEL) == "corp"
    assert repo_digest(daemon, corp_alpine) == upstreams.corp["library/alpine:3.19"].digest


def test_denied_pull_falls_back_to_hub_and_is_counted(
    dockerd_factory: DockerdFactory, gate_factory: GateFactory, upstreams: Upstreams
) -> None:
    """A policy denial is invisible to the Docker user: the daemon falls back to Docker
    Hub and reports Hub's (here: network) error. The gate's audit log and the
    ``denials_to_docker_clients`` metric are where the denial shows."""
    rule = {
        "name": "no-latest",
        "match": "docker.io/library/*",
        "actions": ["pull"],
        "allow": True,
        "deny_tags": ["latest"],
    }
    gate = gate_factory(
        {"upstreams": standard_upstreams(upstreams)},
        policy=policy_document(["docker.io"], rules=[rule]),
        name="deny-gate",
    )
    daemon = dockerd_factory(gate)
    denials = "registry_gate_denials_to_docker_clients_total"
    before = metric(gate, denials, action="pull")

    failed = daemon.docker("pull", "alpine:latest", check=False)
    assert failed.returncode != 0
    # Fail-open: what the user sees is Docker Hub's error, not the gate's denial.
    assert HUB_UNREACHABLE.search(failed.stderr), failed.stderr
    assert "denied" not in failed.stderr.lower()
    assert "no-latest" not in failed.stderr

    # The gate's answer is only in the daemon's log (journalctl -u docker on a host).
    # (logfmt: the quotes inside msg="..." are escaped).
    assert re.search(
        r'msg="Attempting next endpoint.*denied by rule \\"no-latest', daemon.log_text()
    )

    def denial_recorded() -> bool:
        return any(
            r["event"] == "denial"
            and r["decision"] == "deny"
            and r["rule"] == "no-latest"
            and r["status"] == 403
            and str(r["resolved"]).startswith("docker.io/library/alpine")
            and "latest" in str(r["reason"])
            for r in audit_records(gate)
        )

    assert wait_for(denial_recorded), json.dumps(audit_records(gate), indent=1)
    assert metric(gate, denials, action="pull") > before

    # The same daemon, an allowed tag: served by the gate.
    pulled(daemon, gate, "alpine:3.19")
    assert daemon.label("alpine:3.19", ORIGIN_LABEL) == "hub"


# -- login and push ------------------------------------------------------------------------------

PUSHER, PUSHER_PASSWORD = "alice", "alice-pushes"


def write_auth_files(directory: Path) -> tuple[Path, Path]:
    """An htpasswd (bcrypt, as ``htpasswd -B`` writes it) and an EC P-256 signing key."""
    directory.mkdir(parents=True, exist_ok=True)
    htpasswd = directory / "htpasswd"
    hashed = bcrypt.hashpw(PUSHER_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"{PUSHER}:$2y${hashed[4:]}\n")
    key = directory / "signing-key.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return htpasswd, key


def rootfs_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1704067200
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_login_and_push_through_the_gate(
    dockerd_factory: DockerdFactory,
    gate_factory: GateFactory,
    registry_factory: RegistryFactory,
    upstreams: Upstreams,
    tmp_path: Path,
) -> None:
    """``docker login GATE`` with htpasswd credentials, then ``docker push
    GATE/registry.corp.example/team/app:1``: the image lands on the corp upstream
    (schema2, the label the test set), and pulls back with the same credentials."""
    corp = registry_factory("corp-push")
    htpasswd, key = write_auth_files(tmp_path / "auth")
    rule = {
        "name": "alice-team",
        "match": "registry.corp.example/team/**",
        "actions": ["pull", "push"],
        "allow": True,
        "users": [PUSHER],
    }
    gate = gate_factory(
        {
            "upstreams": [
                {"registry": "docker.io", "url": upstreams.hub.url},
                {"registry": "registry.corp.example", "url": corp.url},
            ],
            "auth": {"mode": "token", "htpasswd": str(htpasswd), "signing_key": str(key)},
        },
        policy=policy_document(["docker.io"], default="deny", rules=[rule]),
        name="push-gate",
    )
    daemon = dockerd_factory(gate)
    target = f"{gate.host}/registry.corp.example/team/app:1"
    tar = rootfs_tar({"app/VERSION": b"1\n", "app/ORIGIN": b"pushed through the gate\n"})
    daemon.docker("import", "--change", f"LABEL {ORIGIN_LABEL}=docker-push", "-", target, input=tar)

    anonymous = daemon.docker("push", target, check=False)
    assert anonymous.returncode != 0
    assert re.search(r"unauthorized|authentication required|denied", anonymous.stderr, re.I), (
        anonymous.stderr
    )

    wrong = daemon.docker(
        "login", gate.host, "-u", PUSHER, "--password-stdin", input="wrong", check=False
    )
    assert wrong.returncode != 0
    login = daemon.docker(
        "login", gate.host, "-u", PUSHER, "--password-stdin", input=PUSHER_PASSWORD
    )
    assert "Login Succeeded" in login.stdout

    try:
        out = daemon.docker("push", target).stdout
    except DockerError as exc:
        raise AssertionError(f"{exc}\n--- gate log ---\n{gate.log_tail()}") from None
    match = re.search(r"digest: (sha256:[0-9a-f]{64})", out)
    assert match, out

    # On the corp upstream itself, not through the gate.
    stored = RegistryClient(corp.host).get_manifest("team/app", "1")
    assert stored.digest == match.group(1)
    manifest = json.loads(stored.body)
    assert manifest["mediaType"] == MT_DOCKER_MANIFEST
    config = json.loads(
        RegistryClient(corp.host).get_blob("team/app", manifest["config"]["digest"])
    )
    assert config["config"]["Labels"][ORIGIN_LABEL] == "docker-push"

    assert wait_for(
        lambda: any(
            r["event"] == "push" and (r["principal"] or {}).get("user") == PUSHER
            for r in audit_records(gate)
        )
    ), json.dumps(audit_records(gate), indent=1)

    # Pull it back with the same credentials.
    daemon.docker("image", "rm", target)
    pulled(daemon, gate, target)
    assert daemon.label(target, ORIGIN_LABEL) == "docker-push"


# -- a truncated layer transfer, resumed ----------------------------------------------------------


class TruncatingProxy:
    """Between the gate and an upstream: relays everything, except that the first GET of
    each blob in ``truncate`` sends the full ``Content-Length`` but only half the body,
    then drops the connection."""

    def __init__(self, upstream_port: int, truncate: set[str]) -> None:
        self.upstream_port = upstream_port
        self.truncate = set(truncate)
        self.requests: list[tuple[str, str, str | None]] = []
        self.truncated: list[tuple[str, int]] = []
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _relay(self) -> None:
                with lock:
                    proxy.requests.append((self.command, self.path, self.headers.get("Range")))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                status, headers, data = proxy.forward(self.command, self.path, self.headers, body)
                digest = self.path.rpartition("/blobs/")[2] if "/blobs/" in self.path else ""
                cut = False
                with lock:
                    if self.command == "GET" and status == 200 and digest in proxy.truncate:
                        proxy.truncate.discard(digest)
                        proxy.truncated.append((digest, len(data) // 2))
                        cut = True
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if not cut:
                    self.wfile.write(data)
                    return
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                time.sleep(0.3)  # let the half reach the daemon before the cut
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def forward(
        self, method: str, path: str, headers: Any, body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", f"127.0.0.1:{self.upstream_port}")
            for name, value in headers.items():
                if name.lower() not in ("host", "connection", "content-length"):
                    conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            data = response.read()
            return response.status, response.getheaders(), data
        finally:
            conn.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def truncating_proxy() -> Iterator[Callable[[int, set[str]], TruncatingProxy]]:
    made: list[TruncatingProxy] = []

    def make(port: int, truncate: set[str]) -> TruncatingProxy:
        made.append(TruncatingProxy(port, truncate))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


def test_truncated_layer_is_resumed_with_a_range_request(
    dockerd_factory: DockerdFactory,
    gate_factory: GateFactory,
    registry_factory: RegistryFactory,
    truncating_proxy: Callable[[int, set[str]], TruncatingProxy],
    tmp_path: Path,
) -> None:
    """The first transfer of a 2 MiB layer breaks off half way between gate and
    upstream. The gate must end its own response short (not pad, not pretend success);
    the daemon keeps the bytes it has, retries with ``Range: bytes=N-``, and the gate
    answers 206 from a fresh fill. The image then verifies and carries its label."""
    upstream = registry_factory("resume-upstream")
    layout = Layout(tmp_path / "layout")
    data = random.Random(20240101).randbytes(2 << 20)
    desc = build_image(
        layout,
        HOST_ARCH,
        [{"data/random.bin": data}],
        labels={ORIGIN_LABEL: "resume"},
        compresslevel=0,
    )
    layout.tag("resume", desc)
    seeded = push(layout, upstream.host, [PushSpec("resume", "gate/resume", "1")])
    manifest = seeded["gate/resume:1"].manifest
    layer = manifest.layers[0]
    assert layer.size > 1 << 20

    proxy = truncating_proxy(upstream.port, {layer.digest})
    gate = gate_factory({"upstreams": [{"registry": "docker.io", "url": proxy.url}]})
    daemon = dockerd_factory(gate, max_download_attempts=3)
    blob_206 = {"route": "blob", "method": "GET", "status": "206"}
    before = metric(gate, "registry_gate_requests_total", **blob_206)

    started = time.monotonic()
    out = pulled(daemon, gate, "gate/resume:1")
    elapsed = time.monotonic() - started

    assert proxy.truncated, f"the layer was never fetched: {proxy.requests}"
    assert "Retrying in" in out, out  # the daemon saw the transfer break off
    layer_gets = [r for r in proxy.requests if r[0] == "GET" and r[1].endswith(layer.digest)]
    assert len(layer_gets) >= 2, proxy.requests
    assert daemon.label("gate/resume:1", ORIGIN_LABEL) == "resume"
    assert repo_digest(daemon, "gate/resume:1") == manifest.digest
    # The retry was a Range request the gate answered with 206 (no restart from 0).
    assert metric(gate, "registry_gate_requests_total", **blob_206) > before, (
        f"no 206 for a blob after {elapsed:.1f} s; pull output:\n{out}\n{daemon.log_tail()}"
    )


# -- the fixture's own safety ------------------------------------------------------------------


def test_dockerd_refuses_to_start_outside_a_private_netns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard runs before anything is created or spawned: outside a loopback-only
    namespace a daemon would reach the real Docker Hub on its first fallback."""
    monkeypatch.setattr(dockerd_support, "loopback_only_netns", lambda: False)
    never = Path("/nonexistent/rg-dockerd")
    daemon = DockerDaemon(never, "http://127.0.0.1:5000")
    with pytest.raises(DockerdStartError, match="loopback-only network namespace"):
        daemon.start()
    assert daemon.pid is None
    assert not never.exists()
    with pytest.raises(ValueError, match="loopback"):
        DockerDaemon(never, "https://mirror.example.com")
