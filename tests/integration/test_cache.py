"""The cache against real Distribution upstreams, with a fault-injecting proxy between.

Every gate here reaches its upstreams through a ``FaultProxy`` (tests/support/
fault_proxy.py): it counts what reached the real registry and, when told, corrupts,
truncates, stalls, hangs, fails or goes away. ``docker.io`` is the seeded hub (plus the
100 MiB ``big_image``); ``origin.example`` is a registry of this module's own, where each
test pushes fresh random content, so a cold miss is always cold. Each test starts its own
gate (fresh storage, fresh circuit breakers, fresh metrics).

What is proved (issue 4, design §6, security.md 3, 4, 10, 14): a warm pull sends no GET
upstream; concurrent cold misses make one upstream GET; ``Range`` on a miss is answered
while the fill is still running; a client leaving does not abort the fill; bad bytes are
never cached and every client of a bad fill sees its body end short; tag HEADs revalidate
with one upstream HEAD, also under a stampede of 32 clients on an expired tag behind a
slow upstream (issue 11, item 16); a dead upstream leaves cached images pullable (stale tags with a
``Warning``) and opens its circuit breaker; ``kill -9`` mid-fill leaves nothing
unverified behind; the size cap holds (LRU); a blob cached for one repository is not
served for another that lacks it upstream.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support.fault_proxy import FaultProxy, LoopThread
from tests.support.gate import PROJECT_ROOT, GateFactory, GateProcess
from tests.support.images import MT_OCI_CONFIG, MT_OCI_LAYER_GZIP, MT_OCI_MANIFEST, PushedRef
from tests.support.registries import DistributionRegistry, RegistryFactory
from tests.support.registry_client import MANIFEST_ACCEPT, RegistryClient
from tests.support.upstreams import Upstreams
from tests.support.wire import Reply, request

MIB = 1024 * 1024
ORIGIN = "origin.example"
HUB = "docker.io"
ACCEPT_LINES = [("Accept", mt) for mt in MANIFEST_ACCEPT]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


# -- content on the origin registry -------------------------------------------------------


@dataclass(frozen=True)
class Image:
    repo: str
    tag: str
    manifest: bytes
    config: bytes
    layers: tuple[bytes, ...]

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def blobs(self) -> dict[str, bytes]:
        return {sha256(b): b for b in (self.config, *self.layers)}


def push_blob(client: RegistryClient, repo: str, data: bytes) -> str:
    """A monolithic upload (POST, then PUT with the digest); returns the digest."""
    digest = sha256(data)
    started = client.request("POST", f"/v2/{repo}/blobs/uploads/")
    location = urlsplit(started.headers["Location"])
    query = f"{location.query}&digest={digest}" if location.query else f"digest={digest}"
    client.request(
        "PUT",
        f"{location.path}?{query}",
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    return digest


def push_image(client: RegistryClient, repo: str, tag: str, layers: list[bytes]) -> Image:
    """An OCI image of random-content layers (gzip is not checked by the registry)."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(b) for b in layers]},
            "config": {"Labels": {"test": f"{repo}:{tag}"}},
        }
    ).encode()
    for blob in (config, *layers):
        push_blob(client, repo, blob)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [
                {"mediaType": MT_OCI_LAYER_GZIP, "digest": sha256(b), "size": len(b)}
                for b in layers
            ],
        }
    ).encode()
    client.put_manifest(repo, tag, manifest, MT_OCI_MANIFEST)
    return Image(repo, tag, manifest, config, tuple(layers))


def unique_repo(prefix: str = "cache") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


# -- talking to the gate ------------------------------------------------------------------


@dataclass
class Fetched:
    """A streamed GET: what was announced and what actually arrived."""

    status: int
    headers: Message
    length: int | None
    received: int
    digest: str
    error: str | None
    body: bytes | None

    @property
    def complete(self) -> bool:
        return self.error is None and (self.length is None or self.received == self.length)


def fetch(
    base_url: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    *,
    keep_body: bool = False,
    stop_after: int | None = None,
    on_headers: Callable[[], None] | None = None,
    timeout: float = 60.0,
) -> Fetched:
    """GET ``path``, hashing the body as it streams; an early end is recorded, not raised.
    ``stop_after``: close the connection after that many body bytes (a client leaving)."""
    parts = urlsplit(base_url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        response = conn.getresponse()
        if on_headers is not None:
            on_headers()
        length_header = response.getheader("Content-Length")
        length = int(length_header) if length_header is not None else None
        hasher, chunks, received, error = hashlib.sha256(), [], 0, None
        try:
            while True:
                chunk = response.read(MIB)
                if not chunk:
                    break
                hasher.update(chunk)
                received += len(chunk)
                if keep_body:
                    chunks.append(chunk)
                if stop_after is not None and received >= stop_after:
                    error = "client closed the connection"
                    break
        except (OSError, http.client.HTTPException) as exc:
            error = repr(exc)
        return Fetched(
            response.status,
            response.headers,
            length,
            received,
            "sha256:" + hasher.hexdigest(),
            error,
            b"".join(chunks) if keep_body else None,
        )
    finally:
        conn.close()


def get(gate: GateProcess, path: str, method: str = "GET", **headers: str) -> Reply:
    lines = [*ACCEPT_LINES, *headers.items()]
    return request(gate.url, method, path, lines, timeout=30)


def blob_path(registry: str, repo: str, digest: str) -> str:
    return f"/v2/{registry}/{repo}/blobs/{digest}"


def manifest_path(registry: str, repo: str, reference: str) -> str:
    return f"/v2/{registry}/{repo}/manifests/{reference}"


def metric(gate: GateProcess, name: str, **labels: str) -> float:
    """The sum of a metric family's samples matching ``labels``."""
    text = request(gate.url, "GET", "/metrics").body.decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        series, _, label_text = sample.partition("{")
        if series != name:
            continue
        found = dict(
            (k, v.strip('"'))
            for k, _, v in (p.partition("=") for p in label_text.rstrip("}").split(",") if p)
        )
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def cache_cli(gate: GateProcess, command: str) -> subprocess.CompletedProcess[str]:
    """``registry-gate cache COMMAND --config gate.yaml`` (beside the gate, or without it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_GATE_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "proxy", "cache", command, "--config", str(gate.config_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def cache_stats(gate: GateProcess) -> dict[str, Any]:
    done = cache_cli(gate, "stats")
    assert done.returncode == 0, done.stderr + done.stdout
    stats: dict[str, Any] = json.loads(done.stdout)
    return stats


def assert_verify_clean(gate: GateProcess) -> str:
    done = cache_cli(gate, "verify")
    assert done.returncode == 0, f"cache verify failed:\n{done.stdout}{done.stderr}"
    assert "0 corrupt entries" in done.stdout, done.stdout
    return done.stdout


def storage(gate: GateProcess) -> Path:
    return Path(gate.config["storage"]["path"])


def stored_blob(gate: GateProcess, digest: str) -> Path:
    return storage(gate) / "blobs" / "sha256" / digest.removeprefix("sha256:")


def wait_published(gate: GateProcess, digest: str) -> Path:
    """The published blob, once there: a client has its last byte as soon as the content
    verified, a moment before the fill's flush to disk and rename complete."""
    path = stored_blob(gate, digest)
    wait_for(path.exists, f"{digest[:19]} to be published in the cache")
    return path


def blobs_on_disk(gate: GateProcess) -> tuple[int, int]:
    """(count, bytes) of published blobs: what ``cache stats`` reports, without the
    second a CLI run costs."""
    sizes = [p.stat().st_size for p in (storage(gate) / "blobs" / "sha256").iterdir()]
    return len(sizes), sum(sizes)


def partial_fills(gate: GateProcess) -> list[Path]:
    tmp = storage(gate) / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


def audit_records(gate: GateProcess) -> list[dict[str, Any]]:
    path = Path(gate.config["audit"]["path"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loops() -> Iterator[LoopThread]:
    thread = LoopThread("cache-fault-proxies")
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def origin(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DistributionRegistry]:
    """This module's own registry: tests push fresh random content here."""
    registry = DistributionRegistry(tmp_path_factory.mktemp("origin"), name="origin")
    with registry:
        yield registry


@pytest.fixture(scope="module")
def origin_client(origin: DistributionRegistry) -> RegistryClient:
    return RegistryClient(origin.host)


@pytest.fixture(scope="module")
def hub_proxy_module(upstreams: Upstreams, loops: LoopThread) -> Iterator[FaultProxy]:
    with FaultProxy(upstreams.hub.registry.url, name="hub-proxy", loop=loops) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def origin_proxy_module(origin: DistributionRegistry, loops: LoopThread) -> Iterator[FaultProxy]:
    with FaultProxy(lambda: origin.url, name="origin-proxy", loop=loops) as proxy:
        yield proxy


def _fresh(proxy: FaultProxy) -> Iterator[FaultProxy]:
    proxy.clear_fault()
    proxy.reset()
    yield proxy
    proxy.clear_fault()


@pytest.fixture
def hub_proxy(hub_proxy_module: FaultProxy) -> Iterator[FaultProxy]:
    yield from _fresh(hub_proxy_module)


@pytest.fixture
def origin_proxy(origin_proxy_module: FaultProxy) -> Iterator[FaultProxy]:
    yield from _fresh(origin_proxy_module)


def upstream_table(proxies: Mapping[str, FaultProxy], read_timeout: float) -> list[dict[str, Any]]:
    timeouts = {"connect": 2.0, "read": read_timeout}
    return [{"registry": r, "url": p.url, "timeouts": timeouts} for r, p in proxies.items()]


GateMaker = Callable[..., GateProcess]


@pytest.fixture(scope="module")
def shared_gate(
    hub_proxy_module: FaultProxy,
    origin_proxy_module: FaultProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GateProcess]:
    """One default-configured gate for the tests that only need their own content
    (a gate costs over a second to start); tests needing other settings, a crash or
    a breaker of their own use ``make_gate``."""
    table = {HUB: hub_proxy_module, ORIGIN: origin_proxy_module}
    process = GateProcess(
        tmp_path_factory.mktemp("cache-gate"),
        {"upstreams": upstream_table(table, 10.0)},
        name="shared-cache-gate",
    )
    with process:
        yield process


@pytest.fixture
def cache_gate(
    shared_gate: GateProcess, hub_proxy: FaultProxy, origin_proxy: FaultProxy
) -> GateProcess:
    """The shared gate, its fault proxies reset and healthy."""
    return shared_gate


@pytest.fixture
def make_gate(
    gate_factory: GateFactory, hub_proxy: FaultProxy, origin_proxy: FaultProxy
) -> GateMaker:
    """``make_gate(storage={...}, read_timeout=10, proxies=None)``: a fresh gate whose
    docker.io and origin.example go through the (reset) fault proxies."""

    def make(
        storage: Mapping[str, Any] | None = None,
        *,
        read_timeout: float = 10.0,
        proxies: Mapping[str, FaultProxy] | None = None,
    ) -> GateProcess:
        table = proxies if proxies is not None else {HUB: hub_proxy, ORIGIN: origin_proxy}
        config: dict[str, Any] = {"upstreams": upstream_table(table, read_timeout)}
        if storage:
            config["storage"] = dict(storage)
        return gate_factory(config, name="cache-gate")

    return make


def big_layer(big_image: PushedRef) -> tuple[str, int]:
    layer = big_image.manifest.layers[0]
    return layer.digest, layer.size


# -- warm and cold ---------------------------------------------------------------------------


def skopeo_copy(gate: GateProcess, reference: str, dest: Path) -> None:
    conf = dest.parent / "registries.conf"
    conf.write_text("# empty on purpose\n")
    env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}
    done = subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--all",
            "--src-tls-verify=false",
            f"docker://{gate.host}/{reference}",
            f"oci:{dest}:x",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_warm_pull_sends_no_manifest_or_blob_get_upstream(
    cache_gate: GateProcess, hub_proxy: FaultProxy, upstreams: Upstreams, tmp_path: Path
) -> None:
    gate = cache_gate
    alpine = upstreams.hub["library/alpine:3.19"].manifest
    blobs = {b.digest for b in alpine.all_blobs()}
    skopeo_copy(gate, "docker.io/library/alpine:3.19", tmp_path / "cold")
    print(f"\ncold pull, upstream saw: {hub_proxy.summary()}")
    # Cold: every blob crossed the upstream link exactly once.
    for digest in blobs:
        assert hub_proxy.count("GET", "blob", digest) == 1, (digest, hub_proxy.summary())
    assert hub_proxy.count("GET", "blob") == len(blobs)

    hub_proxy.reset()
    skopeo_copy(gate, "docker.io/library/alpine:3.19", tmp_path / "warm")
    print(f"warm pull, upstream saw: {hub_proxy.summary()}")
    assert hub_proxy.count("GET", "blob") == 0, hub_proxy.summary()
    assert hub_proxy.count("GET", "manifest") == 0, hub_proxy.summary()
    # The same by hand: manifest by tag and by digest, every blob; HEADs too.
    for method in ("GET", "HEAD"):
        reply = get(gate, manifest_path(HUB, "library/alpine", "3.19"), method)
        assert reply.status == 200 and reply.header("Docker-Content-Digest") == alpine.digest
        for child in alpine.children:
            assert (
                get(gate, manifest_path(HUB, "library/alpine", child.digest), method).status == 200
            )
        for digest in blobs:
            reply = get(gate, blob_path(HUB, "library/alpine", digest), method)
            assert reply.status == 200, reply
            if method == "GET":
                assert sha256(reply.body) == digest
    assert hub_proxy.count("GET", "blob") == 0, hub_proxy.summary()
    assert hub_proxy.count("GET", "manifest") == 0, hub_proxy.summary()
    assert hub_proxy.count() == 0, f"a warm pull within the tag TTL: {hub_proxy.summary()}"


@pytest.mark.slow
def test_20_concurrent_cold_gets_of_a_big_blob_make_one_upstream_get(
    cache_gate: GateProcess, hub_proxy: FaultProxy, big_image: PushedRef
) -> None:
    gate = cache_gate
    digest, size = big_layer(big_image)
    clients = 20
    barrier = threading.Barrier(clients)

    def one(_: int) -> Fetched:
        barrier.wait()
        return fetch(gate.url, blob_path(HUB, "gate/big", digest))

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    elapsed = time.monotonic() - started
    print(
        f"\n{clients} concurrent cold GETs of a {size / MIB:.0f} MiB blob: {elapsed:.2f} s wall, "
        f"{clients * size / MIB / elapsed:.0f} MiB/s to clients; upstream saw: "
        f"{hub_proxy.summary()}, {hub_proxy.body_bytes('blob') / MIB:.1f} MiB of blob bodies"
    )
    for result in results:
        assert result.status == 200, result
        assert result.complete, result
        assert result.received == size
        assert result.digest == digest
    assert hub_proxy.count("GET", "blob", digest) == 1, hub_proxy.summary()
    # The repository check before the fill is shared too: one HEAD, not one per client.
    assert hub_proxy.count("HEAD", "blob", digest) <= 1, hub_proxy.summary()
    assert hub_proxy.body_bytes("blob") == size
    assert wait_published(gate, digest).stat().st_size == size


def test_range_on_a_cold_miss_is_answered_while_the_fill_runs(
    cache_gate: GateProcess, origin_proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    gate = cache_gate
    repo, data = unique_repo(), os.urandom(8 * MIB)
    digest = push_blob(origin_client, repo, data)
    # The upstream sends 2 MiB, then nothing until released: the fill cannot finish.
    origin_proxy.set_fault("stall", keep=2 * MIB, contains=digest)
    started = time.monotonic()
    partial = fetch(
        gate.url, blob_path(ORIGIN, repo, digest), {"Range": "bytes=1000-1999"}, keep_body=True
    )
    elapsed = time.monotonic() - started
    (upstream_get,) = [p for p in origin_proxy.log() if p.method == "GET" and p.kind == "blob"]
    print(
        f"\nRange on a cold miss: 206 after {elapsed * 1000:.0f} ms, upstream had sent "
        f"{upstream_get.body_bytes / MIB:.1f} of {len(data) / MIB:.0f} MiB"
    )
    assert partial.status == 206, partial
    assert partial.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    assert partial.body == data[1000:2000]
    # The upstream had handed over at most 2 of 8 MiB: the fill was far from complete.
    assert upstream_get.body_bytes <= 2 * MIB, upstream_get
    assert not stored_blob(gate, digest).exists()

    origin_proxy.clear_fault()  # releases the stall: the fill completes
    wait_for(lambda: stored_blob(gate, digest).exists(), "the fill to be published")
    tail = fetch(
        gate.url, blob_path(ORIGIN, repo, digest), {"Range": "bytes=-1000"}, keep_body=True
    )
    assert tail.status == 206 and tail.body == data[-1000:], tail
    whole = fetch(gate.url, blob_path(ORIGIN, repo, digest))
    assert whole.complete and whole.digest == digest
    assert origin_proxy.count("GET", "blob", digest) == 1, origin_proxy.summary()


def test_a_client_leaving_mid_blob_does_not_abort_the_fill(
    cache_gate: GateProcess, origin_proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    gate = cache_gate
    repo, data = unique_repo(), os.urandom(8 * MIB)
    digest = push_blob(origin_client, repo, data)
    origin_proxy.set_fault("stall", keep=4 * MIB, contains=digest)
    count_before, bytes_before = blobs_on_disk(gate)
    left = fetch(gate.url, blob_path(ORIGIN, repo, digest), stop_after=MIB)
    assert left.status == 200 and not left.complete and left.received >= MIB, left
    assert not stored_blob(gate, digest).exists()
    origin_proxy.clear_fault()  # the upstream goes on sending to a fill nobody reads

    wait_for(lambda: stored_blob(gate, digest).exists(), "the abandoned fill to be published")
    stats = cache_stats(gate)
    assert stats["blobs"] == count_before + 1, stats
    assert stats["blob_bytes"] == bytes_before + len(data), stats
    again = fetch(gate.url, blob_path(ORIGIN, repo, digest))
    assert again.complete and again.digest == digest, again
    assert origin_proxy.count("GET", "blob", digest) == 1, origin_proxy.summary()
    assert sha256(wait_published(gate, digest).read_bytes()) == digest


# -- bad upstream bytes --------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["corrupt", "truncate", "short", "html"])
def test_bad_upstream_bytes_poison_nothing(
    cache_gate: GateProcess, origin_proxy: FaultProxy, origin_client: RegistryClient, fault: str
) -> None:
    """corrupt: one flipped byte; truncate: the connection dies halfway; short: a body
    with no length that ends early; html: an HTML 200 page instead of the blob."""
    gate = cache_gate
    repo, data = unique_repo(), os.urandom(4 * MIB)
    digest = push_blob(origin_client, repo, data)
    path = blob_path(ORIGIN, repo, digest)
    counted = metric(gate, "registry_gate_digest_mismatches_total", upstream=ORIGIN)
    failed_fills = metric(gate, "registry_gate_cache_fill_failures_total", upstream=ORIGIN)
    # Paused after 1 MiB so every client joins the same (doomed) fill first.
    origin_proxy.set_fault(fault, contains=digest, pause_at=MIB)
    clients = 3
    joined = threading.Semaphore(0)
    with ThreadPoolExecutor(clients) as pool:
        futures = [
            pool.submit(fetch, gate.url, path, on_headers=joined.release) for _ in range(clients)
        ]
        for _ in range(clients):
            assert joined.acquire(timeout=20), "a client got no response headers"
        origin_proxy.release()
        results = [f.result() for f in futures]
    mismatches = metric(gate, "registry_gate_digest_mismatches_total", upstream=ORIGIN) - counted
    print(
        f"\n{fault}: clients got {[(r.status, r.length, r.received) for r in results]}; "
        f"digest mismatches counted: {mismatches:.0f}; upstream: {origin_proxy.summary()}"
    )
    for result in results:
        # Headers were already sent: the only signal left is a body that ends short
        # (of its Content-Length, or of its chunked encoding), and the client errs.
        assert result.status == 200, result
        assert not result.complete, result
        assert result.digest != digest
        if result.length is not None:
            assert result.received < result.length
    assert origin_proxy.count("GET", "blob", digest) == 1, "each waiter refetched"
    if fault != "truncate":
        # The whole (wrong) body arrived and hashed wrong; a transfer that died is a
        # failed fill, not a mismatch.
        assert mismatches == 1
    # Every bad transfer is one failed fill, whatever went wrong with it.
    failed = metric(gate, "registry_gate_cache_fill_failures_total", upstream=ORIGIN)
    assert failed - failed_fills == 1
    wait_for(lambda: not partial_fills(gate), "the failed fill's temp file to go")
    assert not stored_blob(gate, digest).exists()
    assert_verify_clean(gate)

    origin_proxy.clear_fault()
    good = fetch(gate.url, path)
    assert good.complete and good.digest == digest and good.received == len(data), good
    assert origin_proxy.count("GET", "blob", digest) == 2, "the bad fill was served from cache"
    assert sha256(wait_published(gate, digest).read_bytes()) == digest


def test_a_corrupted_manifest_is_502_and_not_cached(
    cache_gate: GateProcess, origin_proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    gate = cache_gate
    image = push_image(origin_client, unique_repo(), "1", [os.urandom(4096)])
    by_tag = manifest_path(ORIGIN, image.repo, image.tag)
    by_digest = manifest_path(ORIGIN, image.repo, image.digest)
    counted = metric(gate, "registry_gate_digest_mismatches_total", upstream=ORIGIN)
    with origin_proxy.fault("corrupt", kinds={"manifest"}, offset=len(image.manifest) - 3):
        for path in (by_tag, by_digest):
            reply = get(gate, path)
            assert_unavailable(reply, ORIGIN)
            assert reply.status == 502
            assert image.manifest[:-3] not in reply.body
    mismatches = metric(gate, "registry_gate_digest_mismatches_total", upstream=ORIGIN) - counted
    bad_gets = origin_proxy.count("GET", "manifest")
    print(
        f"\ncorrupted manifest: upstream saw {origin_proxy.summary()}; "
        f"digest mismatches counted: {mismatches:.0f}"
    )
    assert bad_gets >= 2
    assert mismatches == bad_gets, "every bad manifest is counted"
    for path in (by_digest, by_tag):
        reply = get(gate, path)
        assert reply.status == 200 and reply.body == image.manifest, reply
    assert origin_proxy.count("GET", "manifest") == bad_gets + 1, "a bad manifest was cached"


# -- tags: TTL and revalidation ---------------------------------------------------------------


def test_manifest_head_by_tag_revalidates_with_one_upstream_head(
    make_gate: GateMaker, origin_proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    ttl = 1.5
    gate = make_gate({"tag_ttl": ttl})
    repo = unique_repo()
    image = push_image(origin_client, repo, "v1", [os.urandom(4096)])
    by_tag = manifest_path(ORIGIN, repo, "v1")

    fetched_at = time.monotonic()
    reply = get(gate, by_tag)
    assert reply.status == 200 and reply.body == image.manifest, reply
    print(f"\ncold GET by tag, upstream saw: {origin_proxy.summary()}")

    origin_proxy.reset()
    for method in ("HEAD", "GET"):
        reply = get(gate, by_tag, method)
        assert reply.status == 200 and reply.header("Docker-Content-Digest") == image.digest
    reply = get(gate, manifest_path(ORIGIN, repo, image.digest), "HEAD")
    assert reply.status == 200 and reply.header("Content-Length") == str(len(image.manifest))
    assert time.monotonic() - fetched_at < ttl, "too slow to test the fresh case"
    assert origin_proxy.count() == 0, f"fresh and cached: {origin_proxy.summary()}"

    time.sleep(max(0.0, fetched_at + ttl + 0.2 - time.monotonic()))
    reply = get(gate, by_tag, "HEAD")
    assert reply.status == 200 and reply.header("Docker-Content-Digest") == image.digest
    assert reply.header("Content-Length") == str(len(image.manifest))
    assert origin_proxy.counts() == {("HEAD", "manifest"): 1}, origin_proxy.summary()

    # Expired again, by GET: still one HEAD, no GET (the digest is cached).
    time.sleep(ttl + 0.2)
    origin_proxy.reset()
    reply = get(gate, by_tag)
    assert reply.status == 200 and reply.body == image.manifest
    assert origin_proxy.counts() == {("HEAD", "manifest"): 1}, origin_proxy.summary()

    # The tag moves upstream: after the TTL the HEAD sees it and the new manifest is
    # fetched (once).
    moved = push_image(origin_client, repo, "v1", [os.urandom(4096)])
    time.sleep(ttl + 0.2)
    origin_proxy.reset()
    reply = get(gate, by_tag)
    assert reply.status == 200 and reply.body == moved.manifest
    assert origin_proxy.count("HEAD", "manifest") == 1
    assert origin_proxy.count("GET", "manifest") == 1, origin_proxy.summary()


STAMPEDE_CLIENTS = 32


def pull_decisions(gate: GateProcess) -> float:
    return metric(gate, "registry_gate_policy_decisions_total", action="pull", decision="allow")


def stampede(gate: GateProcess, proxy: FaultProxy, path: str) -> list[Reply]:
    """``STAMPEDE_CLIENTS`` concurrent GETs of ``path`` while the upstream holds every
    manifest HEAD; released once all of them have passed policy (and so, with no await
    in between, joined or started the tag's revalidation)."""
    decided = pull_decisions(gate)
    proxy.set_fault("hang", kinds={"manifest"}, methods={"HEAD"}, timeout=60)
    try:
        with ThreadPoolExecutor(STAMPEDE_CLIENTS) as pool:
            futures = [pool.submit(get, gate, path) for _ in range(STAMPEDE_CLIENTS)]
            wait_for(
                lambda: pull_decisions(gate) >= decided + STAMPEDE_CLIENTS,
                f"{STAMPEDE_CLIENTS} pull decisions",
                timeout=60,
            )
            proxy.release()
            return [future.result() for future in futures]
    finally:
        proxy.clear_fault()


@pytest.mark.parametrize("grace", [0, 30])
def test_an_expired_tag_under_a_stampede_costs_one_upstream_head(
    make_gate: GateMaker, origin_proxy: FaultProxy, origin_client: RegistryClient, grace: int
) -> None:
    """Issue 11 item 16: one revalidation per tag at a time, however many ask."""
    ttl = 1.0
    gate = make_gate({"tag_ttl": ttl, "revalidate_grace": grace}, read_timeout=60)
    repo = unique_repo()
    image = push_image(origin_client, repo, "v1", [os.urandom(4096)])
    by_tag = manifest_path(ORIGIN, repo, "v1")
    assert get(gate, by_tag).body == image.manifest
    expected = image
    if grace == 0:
        # The tag moves while cached: the revalidation sees it, and the new manifest is
        # fetched once for every waiter.
        expected = push_image(origin_client, repo, "v1", [os.urandom(4096)])
    time.sleep(ttl + 0.2)
    origin_proxy.reset()

    replies = stampede(gate, origin_proxy, by_tag)

    heads = origin_proxy.count("HEAD", "manifest")
    followers = {
        how: metric(gate, "registry_gate_tag_revalidation_followers_total", how=how)
        for how in ("served_cached", "waited")
    }
    print(
        f"\n{STAMPEDE_CLIENTS} clients, grace {grace} s: upstream saw {origin_proxy.summary()}; "
        f"followers {followers}"
    )
    for reply in replies:
        assert reply.status == 200, reply
        assert reply.body == expected.manifest
    assert heads <= 2, origin_proxy.summary()
    assert origin_proxy.count("GET", "manifest") == (1 if grace == 0 else 0)
    moved = metric(gate, "registry_gate_tag_revalidations_total", outcome="moved")
    assert moved == (1 if grace == 0 else 0)
    # Within the grace every follower had the cached answer at once; without it they
    # waited for the one revalidation.
    waited = "waited" if grace == 0 else "served_cached"
    assert followers[waited] >= STAMPEDE_CLIENTS - heads


def test_a_revalidation_outlives_the_client_that_started_it(
    make_gate: GateMaker, origin_proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    ttl = 1.0
    gate = make_gate({"tag_ttl": ttl, "revalidate_grace": 60}, read_timeout=60)
    image = push_image(origin_client, unique_repo(), "v1", [os.urandom(4096)])
    by_tag = manifest_path(ORIGIN, image.repo, "v1")
    assert get(gate, by_tag).body == image.manifest
    time.sleep(ttl + 0.2)
    origin_proxy.reset()
    with origin_proxy.fault("hang", kinds={"manifest"}, methods={"HEAD"}, timeout=60):
        # The first client leads the revalidation and gives up waiting for it.
        with pytest.raises(TimeoutError):
            request(gate.url, "GET", by_tag, ACCEPT_LINES, timeout=1.0)
        wait_for(lambda: origin_proxy.count("HEAD", "manifest") == 1, "the revalidation HEAD")
        # The revalidation goes on without it: the next client is a follower, answered
        # from the cache within the grace, and sends nothing upstream.
        reply = get(gate, by_tag)
        assert reply.status == 200 and reply.body == image.manifest, reply
        assert origin_proxy.count("HEAD", "manifest") == 1, origin_proxy.summary()
        followers = metric(
            gate, "registry_gate_tag_revalidation_followers_total", how="served_cached"
        )
        assert followers == 1
    # Released: the one revalidation completes and refreshes the tag.
    wait_for(
        lambda: metric(gate, "registry_gate_tag_revalidations_total", outcome="unchanged") == 1,
        "the revalidation to complete",
    )
    assert origin_proxy.count("HEAD", "manifest") == 1, origin_proxy.summary()


# -- upstream failures -----------------------------------------------------------------------


def pull_by_hand(gate: GateProcess, registry: str, image: Image) -> Reply:
    """GET the manifest by tag and every blob (the bytes checked); the manifest reply."""
    reply = get(gate, manifest_path(registry, image.repo, image.tag))
    assert reply.status == 200, reply
    assert reply.body == image.manifest
    for digest, data in image.blobs.items():
        blob = get(gate, blob_path(registry, image.repo, digest))
        assert blob.status == 200 and blob.body == data, blob
    return reply


def assert_unavailable(reply: Reply, upstream: str) -> None:
    assert reply.status in (502, 503, 504), reply
    assert upstream in " ".join(reply.error_messages), reply


@pytest.mark.parametrize("how", ["proxy_down", "registry_stopped"])
def test_upstream_down_cached_image_still_pulls(
    make_gate: GateMaker,
    registry_factory: RegistryFactory,
    loops: LoopThread,
    tmp_path: Path,
    how: str,
) -> None:
    registry = registry_factory(name="doomed")
    client = RegistryClient(registry.host)
    with FaultProxy(lambda: registry.url, name="doomed-proxy", loop=loops) as proxy:
        # TTL 0: every tag request asks upstream, so a dead upstream is noticed at once.
        gate = make_gate({"tag_ttl": 0}, proxies={ORIGIN: proxy})
        cached = push_image(client, "team/cached", "1", [os.urandom(64 * 1024), b"layer 2"])
        uncached = push_image(client, "team/uncached", "1", [os.urandom(4096)])
        pull_by_hand(gate, ORIGIN, cached)
        skopeo_copy(gate, f"{ORIGIN}/team/cached:1", tmp_path / "before")

        if how == "proxy_down":
            proxy.down()
        else:
            registry.stop()

        # The cached image: tags served stale (Warning), blobs from the cache.
        reply = pull_by_hand(gate, ORIGIN, cached)
        warning = reply.header("Warning") or ""
        assert warning.startswith("110 ") and "stale" in warning.lower(), reply.headers
        skopeo_copy(gate, f"{ORIGIN}/team/cached:1", tmp_path / "after")
        head = get(gate, manifest_path(ORIGIN, "team/cached", "1"), "HEAD")
        assert head.status == 200 and head.header("Docker-Content-Digest") == cached.digest
        # Content never cached: an error naming the upstream.
        timings = []
        for path in (
            manifest_path(ORIGIN, "team/uncached", "1"),
            blob_path(ORIGIN, "team/uncached", sha256(uncached.layers[0])),
            manifest_path(ORIGIN, "team/uncached", uncached.digest),
        ):
            started = time.monotonic()
            reply = get(gate, path)
            timings.append(time.monotonic() - started)
            assert_unavailable(reply, ORIGIN)
        # Enough consecutive failures happened above: the breaker is open.
        state = metric(gate, "registry_gate_circuit_breaker_state", upstream=ORIGIN)
        assert state == 2, f"circuit breaker state {state}"
        started = time.monotonic()
        reply = get(gate, manifest_path(ORIGIN, "team/uncached", "1"))
        open_ms = (time.monotonic() - started) * 1000
        assert_unavailable(reply, ORIGIN)
        print(
            f"\n{how}: uncached requests failed in "
            f"{', '.join(f'{t * 1000:.0f}' for t in timings)} ms; "
            f"with the breaker open: {open_ms:.1f} ms ({reply.error_messages[0]!r})"
        )
        stale = [r for r in audit_records(gate) if r.get("event") == "stale_serve"]
        assert stale, "no stale_serve audit record"
        assert stale[-1]["digest"] == cached.digest and stale[-1]["upstream"] == ORIGIN


def test_upstream_hanging_is_cut_short_by_the_circuit_breaker(
    make_gate: GateMaker, origin_proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    read_timeout = 0.5
    gate = make_gate({"tag_ttl": 0}, read_timeout=read_timeout)
    image = push_image(origin_client, unique_repo(), "1", [os.urandom(4096)])
    pull_by_hand(gate, ORIGIN, image)
    origin_proxy.reset()
    origin_proxy.set_fault("hang", timeout=30)
    timings = []
    for _ in range(8):
        started = time.monotonic()
        reply = get(gate, manifest_path(ORIGIN, image.repo, image.tag))
        timings.append(time.monotonic() - started)
        assert reply.status == 200 and reply.body == image.manifest, reply
        assert "stale" in (reply.header("Warning") or "").lower()
    state = metric(gate, "registry_gate_circuit_breaker_state", upstream=ORIGIN)
    print(
        f"\nstale tag while the upstream hangs (read timeout {read_timeout} s): "
        + ", ".join(f"{t * 1000:.0f}" for t in timings)
        + f" ms; breaker state {state:.0f}; upstream saw {origin_proxy.summary()}"
    )
    assert state == 2
    # Requests once the breaker opened never reached the upstream.
    assert origin_proxy.count() == 5, origin_proxy.summary()


def test_upstream_5xx_and_429_serve_stale_and_429_passes_through(
    make_gate: GateMaker, origin_proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    gate = make_gate({"tag_ttl": 0})
    image = push_image(origin_client, unique_repo(), "1", [os.urandom(4096)])
    pull_by_hand(gate, ORIGIN, image)
    fresh = push_image(origin_client, unique_repo(), "1", [os.urandom(4096)])
    with origin_proxy.fault("status", status=503):
        reply = get(gate, manifest_path(ORIGIN, image.repo, image.tag))
        assert reply.status == 200 and reply.body == image.manifest, reply
        assert "stale" in (reply.header("Warning") or "").lower()
        assert_unavailable(get(gate, manifest_path(ORIGIN, fresh.repo, "1")), ORIGIN)
        reply = get(gate, blob_path(ORIGIN, fresh.repo, sha256(fresh.layers[0])))
        assert_unavailable(reply, ORIGIN)
    with origin_proxy.fault("429", retry_after="42"):
        reply = get(gate, manifest_path(ORIGIN, fresh.repo, "1"))
        assert reply.status == 429 and reply.header("Retry-After") == "42", reply
        assert reply.error_codes == ["TOOMANYREQUESTS"]
        # A cached tag is served stale while the upstream rate-limits the gate too.
        cached = get(gate, manifest_path(ORIGIN, image.repo, image.tag))
        assert cached.status == 200 and cached.body == image.manifest, cached
        assert "stale" in (cached.header("Warning") or "").lower()
    pull_by_hand(gate, ORIGIN, fresh)
    assert metric(gate, "registry_gate_circuit_breaker_state", upstream=ORIGIN) == 0


# -- crash, size cap, repositories ---------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_mid_fill_leaves_the_cache_clean(
    make_gate: GateMaker, hub_proxy: FaultProxy, big_image: PushedRef
) -> None:
    gate = make_gate()
    digest, size = big_layer(big_image)
    path = blob_path(HUB, "gate/big", digest)
    stall_at = min(30 * MIB, size // 2)
    hub_proxy.set_fault("stall", keep=stall_at, contains=digest)
    with ThreadPoolExecutor(1) as pool:
        client = pool.submit(fetch, gate.url, path)
        wait_for(
            lambda: [p for p in hub_proxy.log() if p.kind == "blob" and p.body_bytes >= stall_at],
            "the upstream to stall mid-blob",
        )
        parts = wait_for(lambda: partial_fills(gate), "a partial fill on disk")
        print(f"\nkill -9 with {[p.stat().st_size for p in parts]} bytes in {parts[0].parent}")
        gate.kill9()
        hub_proxy.clear_fault()
        crashed = client.result()
    assert not crashed.complete, crashed
    assert not stored_blob(gate, digest).exists()

    gate.start()
    assert partial_fills(gate) == [], "the restarted gate kept a dead fill"
    assert_verify_clean(gate)
    assert blobs_on_disk(gate) == (0, 0)
    after = fetch(gate.url, path)
    assert after.complete and after.received == size and after.digest == digest, after
    assert hub_proxy.count("GET", "blob", digest) == 2, hub_proxy.summary()
    wait_published(gate, digest)
    assert blobs_on_disk(gate) == (1, size)
    assert_verify_clean(gate)


def test_size_cap_holds_with_lru_eviction(
    make_gate: GateMaker, origin_proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    cap = 3 * MIB
    gate = make_gate({"max_size": cap})
    repo = unique_repo()
    blobs = [os.urandom(1_000_000) for _ in range(5)]
    digests = [push_blob(origin_client, repo, b) for b in blobs]

    def pull(i: int) -> None:
        got = fetch(gate.url, blob_path(ORIGIN, repo, digests[i]))
        assert got.complete and got.digest == digests[i], got
        wait_published(gate, digests[i])
        # The rename shows on disk a moment before the gate's index takes the blob (and
        # its place in the LRU order); a hit in that moment would reorder what this test
        # expects to be evicted.
        wait_for(
            lambda: metric(gate, "registry_gate_cache_bytes", state="filling") == 0,
            "the fill to be published in the gate's index",
        )
        count, size = blobs_on_disk(gate)
        assert size <= cap, (count, size)

    for i in (0, 1, 2):
        pull(i)
    assert blobs_on_disk(gate) == (3, 3_000_000)
    pull(0)  # a hit: 0 is now the most recently used
    pull(3)  # evicts 1, the least recently used
    pull(4)  # evicts 2
    stats = cache_stats(gate)
    print(f"\nafter 5 x 1 MB under a {cap} byte cap: {stats}")
    assert stats["blobs"] == 3 and stats["blob_bytes"] == 3_000_000, stats
    kept = {i for i, d in enumerate(digests) if stored_blob(gate, d).exists()}
    assert kept == {0, 3, 4}, kept
    assert metric(gate, "registry_gate_cache_evictions_total") == 2

    origin_proxy.reset()
    pull(0)
    assert origin_proxy.count("GET", "blob") == 0, "a kept blob was fetched again"
    pull(1)
    assert origin_proxy.count("GET", "blob", digests[1]) == 1, "an evicted blob served"
    assert blobs_on_disk(gate)[1] <= cap
    assert_verify_clean(gate)


def test_a_blob_cached_for_one_repository_is_not_served_for_another(
    cache_gate: GateProcess,
    origin_proxy: FaultProxy,
    hub_proxy: FaultProxy,
    origin_client: RegistryClient,
) -> None:
    gate = cache_gate
    secret_repo, other_repo = unique_repo("private"), unique_repo("public")
    secret = os.urandom(256 * 1024)
    digest = push_blob(origin_client, secret_repo, secret)
    push_blob(origin_client, other_repo, os.urandom(1024))  # exists, lacks the secret

    reply = get(gate, blob_path(ORIGIN, secret_repo, digest))
    assert reply.status == 200 and reply.body == secret, reply
    wait_published(gate, digest)

    for registry, repo in ((HUB, secret_repo), (HUB, "library/alpine"), (ORIGIN, other_repo)):
        for method in ("GET", "HEAD"):
            reply = get(gate, blob_path(registry, repo, digest), method)
            assert reply.status == 404, (registry, repo, method, reply)
            assert secret not in reply.body
            if method == "GET":
                assert reply.error_codes == ["BLOB_UNKNOWN"], reply
        ranged = get(gate, blob_path(registry, repo, digest), Range="bytes=0-99")
        assert ranged.status == 404 and secret[:100] not in ranged.body, ranged
    # Each refusal was the upstream's answer for that repository...
    assert hub_proxy.count("GET", "blob", digest) == 0, hub_proxy.summary()
    assert hub_proxy.count("HEAD", "blob", digest) >= 1, hub_proxy.summary()
    # ...and the owner still gets it from the cache.
    origin_proxy.reset()
    reply = get(gate, blob_path(ORIGIN, secret_repo, digest))
    assert reply.status == 200 and reply.body == secret
    assert origin_proxy.count() == 0, origin_proxy.summary()
