"""Real clients pulling through the gate: skopeo, podman and containerd (``ctr``).

Each client is configured only through files written here (no host configuration is
read: a private ``HOME`` for containers/image, a private containerd), every fallback a
client has (podman's ``[[registry]] location``, containerd's ``server``, ``_default``)
points at a loopback stand-in that records requests and answers 404, and the tests run
only inside a private network namespace whose only interface is ``lo`` (``tests/run``,
``.ci/run``): a misconfigured client fails instead of reaching a real registry.

What each client proves, by manifest digest and by the ``gate.origin`` label of the
image it got:

- skopeo: path prefix (docker.io, quay.io, the token-auth upstream) and short names,
  ``inspect`` and ``copy --all``; skopeo cannot send ``?ns=``.
- podman: a ``registries.conf`` mirror for docker.io (the daemon-style
  ``/v2/library/alpine`` short name) and for quay.io (``location = GATE/quay.io``, path
  prefix), and short names via ``unqualified-search-registries``.
- containerd: ``ctr images pull --hosts-dir`` with the gate as a ``[host]`` mirror for
  docker.io and quay.io: every request carries ``?ns=<registry>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.gate import PRIVATE_REGISTRY, GateProcess
from tests.support.images import MT_OCI_INDEX, ORIGIN_LABEL, ManifestInfo, PushedRef
from tests.support.netns import in_private_netns
from tests.support.upstreams import TokenUpstream, Upstreams

pytestmark = pytest.mark.e2e

CLIENT_TIMEOUT = 120
BUSYBOX_V2S2 = "library/busybox:1.36-v2s2"  # Docker schema2, no origin label
NETNS_REASON = (
    "client end-to-end tests run only inside a private loopback-only network namespace "
    "(run the suite with tests/run, or: unshare --net -- bash -c "
    "'ip link set lo up && exec python3 -m pytest tests/e2e')"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


# Session scope: autouse fixtures come first within a scope, so this runs before the
# session-scoped registries and gate are started for nothing.
@pytest.fixture(scope="session", autouse=True)
def private_network() -> None:
    if not in_private_netns():
        skip_or_fail(NETNS_REASON)


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        skip_or_fail(f"missing client tools: {', '.join(missing)}")


def run(argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv),
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=CLIENT_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        output = f"{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}"
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{output}")
    return proc


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_label(config: bytes | str) -> str:
    return str(json.loads(config)["config"]["Labels"][ORIGIN_LABEL])


# Go's GOARCH for this machine: what a client picks from a multi-arch index.
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def platform_manifest(pushed: PushedRef) -> ManifestInfo:
    """The manifest a client on this machine ends up with for ``pushed``."""
    return pushed.manifest.child(HOST_ARCH) if pushed.manifest.is_index else pushed.manifest


# -- the loopback stand-in for every real registry ------------------------------------------


class StandIn:
    """Where a client's fallbacks point: records each request and answers 404."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        lock = threading.Lock()
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                with lock:
                    requests.append(f"{self.command} {self.path}")
                body = b'{"errors":[{"code":"NAME_UNKNOWN","message":"stand-in"}]}'
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_PUT = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    server = StandIn()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def no_fallback(standin: StandIn) -> Iterator[StandIn]:
    """The stand-in must see nothing during the test: the gate served every request."""
    standin.requests.clear()
    yield standin
    assert standin.requests == [], f"a client fell back past the gate: {standin.requests}"


# -- containers/image clients (skopeo, podman) -------------------------------------------------


def containers_env(home: Path, registries_conf: str) -> dict[str, str]:
    """An environment where containers/image reads only files written here.

    A registries.conf in ``$HOME/.config/containers`` is the one way to keep the system
    drop-ins (Debian's ``registries.conf.d/shortnames.conf``, aliases to the real Docker
    Hub) out: with ``CONTAINERS_REGISTRIES_CONF`` set, podman 4.3 still loads them.
    """
    conf_dir = home / ".config" / "containers"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "registries.conf").write_text(registries_conf)
    policy = {"default": [{"type": "insecureAcceptAnything"}]}
    (conf_dir / "policy.json").write_text(json.dumps(policy))
    containers_conf = home / "containers.conf"
    containers_conf.write_text('[engine]\nevents_logger = "file"\ncgroup_manager = "cgroupfs"\n')
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CONTAINERS_", "REGISTRIES_", "XDG_")) and "proxy" not in k.lower()
    }
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_RUNTIME_DIR=str(home / "run"),
        CONTAINERS_CONF=str(containers_conf),
    )
    (home / "run").mkdir(exist_ok=True)
    return env


EMPTY_REGISTRIES_CONF = 'unqualified-search-registries = []\nshort-name-mode = "enforcing"\n'


@pytest.fixture(scope="module")
def skopeo_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    require("skopeo")
    return containers_env(tmp_path_factory.mktemp("skopeo-home"), EMPTY_REGISTRIES_CONF)


def skopeo(env: dict[str, str], *args: str) -> str:
    return run(["skopeo", "--insecure-policy", *args], env).stdout


SKOPEO_NAMES = [
    # (reference under the gate, role that must serve it, repo:tag on that role)
    ("docker.io/library/alpine:3.19", "hub", "library/alpine:3.19"),
    ("quay.io/gate/origin:latest", "quay", "gate/origin:latest"),
    ("registry.corp.example/library/alpine:3.19", "corp", "library/alpine:3.19"),
    ("gate/origin:latest", "hub", "gate/origin:latest"),  # short name
    ("alpine:3.19", "hub", "library/alpine:3.19"),  # short name, docker.io library/
]


@pytest.mark.parametrize(("name", "role", "ref"), SKOPEO_NAMES)
def test_skopeo_inspect(
    gate: GateProcess,
    upstreams: Upstreams,
    skopeo_env: dict[str, str],
    name: str,
    role: str,
    ref: str,
) -> None:
    pushed = upstreams.by_role(role)[ref]
    image = f"docker://{gate.host}/{name}"
    raw = skopeo(skopeo_env, "inspect", "--tls-verify=false", "--raw", image)
    assert raw.encode() == pushed.raw
    config = skopeo(skopeo_env, "inspect", "--tls-verify=false", "--config", image)
    assert config_label(config) == role
    info = json.loads(skopeo(skopeo_env, "inspect", "--tls-verify=false", image))
    assert info["Digest"] == pushed.digest


def test_skopeo_copy_all_preserves_the_index(
    gate: GateProcess, upstreams: Upstreams, skopeo_env: dict[str, str], tmp_path: Path
) -> None:
    pushed = upstreams.hub["library/alpine:3.19"]
    dest = tmp_path / "layout"
    skopeo(
        skopeo_env,
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        f"docker://{gate.host}/docker.io/library/alpine:3.19",
        f"oci:{dest}:alpine",
    )
    index = json.loads((dest / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [pushed.digest]
    assert index["manifests"][0]["mediaType"] == MT_OCI_INDEX
    blobs = dest / "blobs" / "sha256"
    for child in pushed.manifest.children:
        assert (blobs / child.digest.removeprefix("sha256:")).read_bytes() == child.raw
        for blob in child.blobs:
            data = (blobs / blob.digest.removeprefix("sha256:")).read_bytes()
            assert data == upstreams.hub.images.blob_bytes(blob.digest)


def test_skopeo_copy_from_the_token_upstream(
    gate: GateProcess, token_upstream: TokenUpstream, skopeo_env: dict[str, str], tmp_path: Path
) -> None:
    """The client sends no credentials; the gate does the token dance upstream."""
    pushed = token_upstream["team/private:1"]
    dest = tmp_path / "dir"
    skopeo(
        skopeo_env,
        "copy",
        "--src-tls-verify=false",
        "--src-no-creds",
        f"docker://{gate.host}/{PRIVATE_REGISTRY}/team/private:1",
        f"dir:{dest}",
    )
    assert (dest / "manifest.json").read_bytes() == pushed.raw
    assert pushed.manifest.config is not None
    config = (dest / pushed.manifest.config.digest.removeprefix("sha256:")).read_bytes()
    assert config_label(config) == "token"


# -- podman ---------------------------------------------------------------------------------------


class Podman:
    """podman with private storage (vfs), file events, cgroupfs, and a private HOME."""

    def __init__(self, root: Path, registries_conf: str, runroot: Path) -> None:
        self.root = root
        self.runroot = runroot
        self.env = containers_env(root / "home", registries_conf)

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(
            [
                "podman",
                "--root",
                str(self.root / "storage"),
                "--runroot",
                str(self.runroot),
                "--tmpdir",
                str(self.root / "tmp"),
                "--storage-driver",
                "vfs",
                "--events-backend",
                "file",
                "--cgroup-manager",
                "cgroupfs",
                *args,
            ],
            self.env,
        )

    def inspect(self, image: str) -> dict[str, Any]:
        document = json.loads(self("image", "inspect", image).stdout)
        assert len(document) == 1
        return dict(document[0])


def podman_registries_conf(gate: GateProcess, standin: StandIn) -> str:
    """docker.io and quay.io mirrored by the gate; each ``location`` (the fallback
    after the mirror) is the loopback stand-in. Short names search docker.io."""
    return f"""\
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"

[[registry]]
prefix = "docker.io"
location = "{standin.host}"
insecure = true

[[registry.mirror]]
location = "{gate.host}"
insecure = true

[[registry]]
prefix = "quay.io"
location = "{standin.host}"
insecure = true

[[registry.mirror]]
location = "{gate.host}/quay.io"
insecure = true

[[registry]]
prefix = "{gate.host}"
location = "{gate.host}"
insecure = true
"""


@pytest.fixture(scope="module")
def podman(
    gate: GateProcess, standin: StandIn, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Podman]:
    require("podman")
    with short_dir() as runroot:
        yield Podman(
            tmp_path_factory.mktemp("podman"), podman_registries_conf(gate, standin), runroot
        )


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A directory with a short path: podman refuses a runroot over 50 characters,
    which pytest's temporary directories can exceed."""
    path = Path(tempfile.mkdtemp(prefix="gate-pm-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(
    ("image", "role", "ref"),
    [
        # The docker.io mirror: the gate sees /v2/library/alpine/... (a short name).
        ("docker.io/library/alpine:3.19", "hub", "library/alpine:3.19"),
        ("docker.io/library/busybox:1.36-v2s2", "hub", BUSYBOX_V2S2),
        # The quay.io mirror at GATE/quay.io: the gate sees a path prefix.
        ("quay.io/coreos/etcd:v3.5.0", "quay", "coreos/etcd:v3.5.0"),
    ],
)
def test_podman_pull_through_a_registries_conf_mirror(
    podman: Podman,
    upstreams: Upstreams,
    no_fallback: StandIn,
    image: str,
    role: str,
    ref: str,
) -> None:
    pushed = upstreams.by_role(role)[ref]
    podman("pull", image)
    info = podman.inspect(image)
    assert info["Digest"] == pushed.digest
    if ref != BUSYBOX_V2S2:  # the only seeded image without an origin label
        assert info["Labels"][ORIGIN_LABEL] == role
    config = platform_manifest(pushed).config
    assert config is not None
    assert info["Id"] == config.digest.removeprefix("sha256:")


def test_podman_pull_short_name_via_unqualified_search(
    podman: Podman, upstreams: Upstreams, no_fallback: StandIn
) -> None:
    """``podman pull team/app:1``: podman qualifies it as docker.io/team/app (its only
    search registry), the docker.io mirror sends it to the gate as a short name, and
    the gate's own search order (docker.io before corp, which has one too) picks the
    hub."""
    proc = podman("--log-level=debug", "pull", "team/app:1")
    assert "registries.conf.d" not in proc.stderr, "podman read the system drop-ins"
    info = podman.inspect("docker.io/team/app:1")
    assert info["Labels"][ORIGIN_LABEL] == "hub"
    assert info["Digest"] == upstreams.hub["team/app:1"].digest


def test_podman_pull_short_name_from_the_gate_as_search_registry(
    gate: GateProcess, podman: Podman, upstreams: Upstreams, no_fallback: StandIn, tmp_path: Path
) -> None:
    """The gate itself as the unqualified-search registry: ``alpine:3.19`` reaches it
    as ``/v2/alpine/...`` and resolves by the gate's search list (docker.io first)."""
    conf = podman_registries_conf(gate, no_fallback).replace(
        'unqualified-search-registries = ["docker.io"]',
        f'unqualified-search-registries = ["{gate.host}"]',
    )
    # Its own storage: the module's podman already holds docker.io/library/alpine.
    with short_dir() as runroot:
        local = Podman(tmp_path, conf, runroot)
        local("pull", "alpine:3.19")
        info = local.inspect(f"{gate.host}/alpine:3.19")
    assert info["Labels"][ORIGIN_LABEL] == "hub"
    assert info["Digest"] == upstreams.hub["library/alpine:3.19"].digest


# -- containerd ----------------------------------------------------------------------------------


CONTAINERD_CONFIG = """\
version = 2
root = "{state}/root"
state = "{state}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{state}/containerd.sock"

[ttrpc]
  address = "{state}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{state}/opt"
"""


class Containerd:
    """A private containerd daemon (state under a temp dir, CRI off) and ``ctr``."""

    namespace = "gate-e2e"

    def __init__(self, state: Path) -> None:
        self.state = state
        self.socket = state / "containerd.sock"
        self.config = state / "config.toml"
        self.log = state / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Containerd:
        self.state.mkdir(parents=True, exist_ok=True)
        self.config.write_text(CONTAINERD_CONFIG.format(state=self.state))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited:\n{self.log.read_text()[-3000:]}")
            probe = subprocess.run(
                ["ctr", "--address", str(self.socket), "version"],
                check=False,
                capture_output=True,
                timeout=10,
            )
            if probe.returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"containerd did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(["ctr", "--address", str(self.socket), "--namespace", self.namespace, *args])


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    require("containerd", "ctr")
    daemon = Containerd(tmp_path_factory.mktemp("ctrd"))
    try:
        yield daemon.start()
    finally:
        daemon.stop()


def write_hosts_dir(directory: Path, gate: GateProcess, standin: StandIn) -> Path:
    """docker.io and quay.io go to the gate first; ``server`` (tried last) and every
    other registry (``_default``) go to the stand-in. containerd 1.6 ignores a
    hosts.toml without a ``[host]`` table, so each file has one."""
    mirrored = f"""\
server = "http://{standin.host}"

[host."http://{gate.host}"]
  capabilities = ["pull", "resolve"]
"""
    fallback = f"""\
server = "http://{standin.host}"

[host."http://{standin.host}"]
  capabilities = ["pull", "resolve"]
"""
    for registry, text in (("docker.io", mirrored), ("quay.io", mirrored), ("_default", fallback)):
        (directory / registry).mkdir(parents=True, exist_ok=True)
        (directory / registry / "hosts.toml").write_text(text)
    return directory


@pytest.fixture(scope="module")
def hosts_dir(
    gate: GateProcess, standin: StandIn, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return write_hosts_dir(tmp_path_factory.mktemp("certs.d"), gate, standin)


@pytest.mark.parametrize(
    ("image", "role", "ref", "ns"),
    [
        ("docker.io/library/alpine:3.19", "hub", "library/alpine:3.19", "docker.io"),
        ("quay.io/coreos/etcd:v3.5.0", "quay", "coreos/etcd:v3.5.0", "quay.io"),
        ("docker.io/library/busybox:1.36-v2s2", "hub", BUSYBOX_V2S2, "docker.io"),
    ],
)
def test_containerd_pull_with_hosts_dir_sends_ns(
    containerd: Containerd,
    hosts_dir: Path,
    upstreams: Upstreams,
    no_fallback: StandIn,
    image: str,
    role: str,
    ref: str,
    ns: str,
) -> None:
    pushed = upstreams.by_role(role)[ref]
    proc = containerd.ctr(
        "images", "pull", "--plain-http", "--http-dump", "--hosts-dir", str(hosts_dir), image
    )
    dump = proc.stdout + proc.stderr
    # Every request containerd made went to the gate with ?ns=<registry>.
    assert f"ns={ns}" in dump, dump[-3000:]
    listing = containerd.ctr("images", "ls").stdout
    line = next(li for li in listing.splitlines() if li.startswith(image + " "))
    assert pushed.digest in line.split(), line
    manifest = platform_manifest(pushed)
    assert manifest.config is not None
    config = containerd.ctr("content", "get", manifest.config.digest).stdout
    assert sha256(config.encode()) == manifest.config.digest
    if ref != BUSYBOX_V2S2:
        assert config_label(config) == role


# -- the generated client configuration --------------------------------------------------------


def client_config_files(gate: GateProcess, client: str, output: Path) -> dict[str, str]:
    """``registry-gate client-config CLIENT --output DIR`` for this gate: the files it
    wrote, as {absolute path on a client: content}."""
    proc = run(
        [
            sys.executable,
            "-m",
            "proxy",
            "client-config",
            client,
            "--url",
            gate.url,
            "--config",
            str(gate.config_path),
            "--output",
            str(output),
        ]
    )
    written = {Path(line) for line in proc.stdout.splitlines() if line.strip()}
    files = {
        "/" + str(path.relative_to(output)): path.read_text()
        for path in output.rglob("*")
        if path.is_file()
    }
    assert {output / p.lstrip("/") for p in files} == written, (files, proc.stdout)
    return files


def test_generated_containerd_hosts_pull_without_fallback(
    containerd: Containerd,
    gate: GateProcess,
    upstreams: Upstreams,
    no_fallback: StandIn,
    tmp_path: Path,
) -> None:
    """The hosts.toml files `client-config containerd` prints, installed as they are:
    the gate is both the host and the `server`, so nothing can fall back."""
    files = client_config_files(gate, "containerd", tmp_path / "generated")
    assert "/etc/containerd/certs.d/_default/hosts.toml" in files
    for path, content in files.items():
        registry = Path(path).parent.name
        (tmp_path / registry).mkdir()
        (tmp_path / registry / "hosts.toml").write_text(content)
        assert f'server = "{gate.url}"' in content
    image = "quay.io/coreos/etcd:v3.5.0"
    proc = containerd.ctr(
        "images", "pull", "--plain-http", "--http-dump", "--hosts-dir", str(tmp_path), image
    )
    assert "ns=quay.io" in proc.stdout + proc.stderr
    listing = containerd.ctr("images", "ls").stdout
    line = next(li for li in listing.splitlines() if li.startswith(image + " "))
    assert upstreams.quay["coreos/etcd:v3.5.0"].digest in line.split(), line


def test_generated_podman_registries_conf_pulls_by_path_prefix(
    gate: GateProcess, upstreams: Upstreams, no_fallback: StandIn, tmp_path: Path
) -> None:
    """The registries.conf `client-config podman` prints: every registry's location is
    the gate with a path prefix, so podman never talks to a registry directly."""
    require("podman")
    (conf,) = client_config_files(gate, "podman", tmp_path / "generated").values()
    assert f'location = "{gate.host}/quay.io"' in conf
    with short_dir() as runroot:
        local = Podman(tmp_path, conf, runroot)
        local("pull", "quay.io/coreos/etcd:v3.5.0")
        info = local.inspect("quay.io/coreos/etcd:v3.5.0")
    assert info["Digest"] == upstreams.quay["coreos/etcd:v3.5.0"].digest
    assert info["Labels"][ORIGIN_LABEL] == "quay"
