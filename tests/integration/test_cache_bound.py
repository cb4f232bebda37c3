"""The cache cap as a disk bound, and metrics and settings that must not lie (issue 11,
items 20 and 21), through a real gate process in front of a real Distribution registry.

The registry is reached through a ``FaultProxy`` only so the test can hold transfers
mid-body (``stall``: a slow link, which a loopback registry never is) and decide when the
fills overlap, or take the upstream away (``down``) or make it hang; the content always
comes from Distribution. Disk use is sampled in a thread the whole time the fills run:
every file under the cache directory, temporary fills included, in allocated blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.integration.test_cache import (
    ACCEPT_LINES,
    MIB,
    push_blob,
    push_image,
    sha256,
    unique_repo,
    wait_for,
)
from tests.support.fault_proxy import FaultProxy, LoopThread
from tests.support.gate import GateFactory, GateProcess
from tests.support.metrics import scrape, wait_for_value
from tests.support.registries import DistributionRegistry
from tests.support.registry_client import RegistryClient
from tests.support.wire import request

ORIGIN = "origin.example"
# What the cache directory holds besides blob bytes, which the cap does not bound (README
# "Cache"): the sqlite index and its journal, manifests, pins, and the rounding of each
# file up to whole filesystem blocks.
SLACK = 1 * MIB


@pytest.fixture(scope="module")
def loops() -> Iterator[LoopThread]:
    thread = LoopThread("cache-bound-proxies")
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    registry = DistributionRegistry(tmp_path_factory.mktemp("bound-origin"), name="bound-origin")
    with registry:
        yield registry


@pytest.fixture(scope="module")
def origin_client(origin: DistributionRegistry) -> RegistryClient:
    return RegistryClient(origin.host)


@pytest.fixture
def proxy(origin: DistributionRegistry, loops: LoopThread) -> Iterator[FaultProxy]:
    with FaultProxy(lambda: origin.url, name="bound-proxy", loop=loops) as proxy:
        yield proxy


def make_gate(gate_factory: GateFactory, proxy: FaultProxy, **config: Any) -> GateProcess:
    timeouts = {"connect": 2.0, "read": 60.0, **config.pop("timeouts", {})}
    upstream = {"registry": ORIGIN, "url": proxy.url, "timeouts": timeouts}
    return gate_factory({"upstreams": [upstream], **config}, name="bound-gate")


def disk_use(folder: Path) -> int:
    """Allocated bytes of every file under `folder` (what `du` counts), each inode once:
    a fill published (renamed from tmp/ to blobs/) during the walk is seen twice."""
    blocks: dict[int, int] = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # published or removed meanwhile
                st = os.lstat(os.path.join(root, name))
                blocks[st.st_ino] = st.st_blocks * 512
    return sum(blocks.values())


@dataclass
class Sampler:
    """Samples the disk use of a folder until stopped; keeps the peak."""

    folder: Path
    peak: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, disk_use(self.folder))
            self.samples += 1

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self.run, name="du-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Pull:
    """One blob GET read as it arrives (`received` grows while the body streams)."""

    url: str
    path: str
    received: int = 0
    status: int | None = None
    length: int | None = None
    digest: str | None = None
    error: str | None = None

    def run(self) -> None:
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=120)
        hasher = hashlib.sha256()
        try:
            conn.request("GET", self.path)
            response = conn.getresponse()
            self.status = response.status
            length = response.getheader("Content-Length")
            self.length = int(length) if length is not None else None
            while chunk := response.read1(MIB):
                hasher.update(chunk)
                self.received += len(chunk)
        except (OSError, http.client.HTTPException) as exc:
            self.error = repr(exc)
        finally:
            conn.close()
        self.digest = "sha256:" + hasher.hexdigest()


def test_concurrent_cold_fills_never_take_more_disk_than_the_cap(
    gate_factory: GateFactory, proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    cap, size, count = 15 * MIB, 6 * MIB, 5  # each blob is more than cap / 3
    gate = make_gate(gate_factory, proxy, storage={"max_size": cap})
    storage = Path(gate.config["storage"]["path"])
    repo = unique_repo("bound")
    blobs = [os.urandom(size) for _ in range(count)]
    digests = [push_blob(origin_client, repo, blob) for blob in blobs]
    for digest in digests:  # the repository is known to hold them: no HEAD, straight to fills
        assert request(gate.url, "HEAD", f"/v2/{ORIGIN}/{repo}/blobs/{digest}").status == 200

    pulls = [Pull(gate.url, f"/v2/{ORIGIN}/{repo}/blobs/{d}") for d in digests]
    threads = [threading.Thread(target=p.run) for p in pulls]
    # Every transfer stops at 4 MiB until released: all five overlap for certain.
    proxy.set_fault("stall", contains=repo, keep=4 * MIB, timeout=120)
    with Sampler(storage) as sampler:
        for thread in threads:
            thread.start()
        wait_for(
            lambda: all(p.received >= 3 * MIB for p in pulls),
            "every client to be 3 MiB into its blob",
            timeout=60,
        )
        during = scrape(gate.url)
        at_stall = disk_use(storage)
        proxy.release()
        for thread in threads:
            thread.join(120)
        wait_for(lambda: not any((storage / "tmp").iterdir()), "the fills to be published")
    # A client has its last byte a moment before its fill is published and counted out.
    after = wait_for_value(
        gate.url, "registry_gate_inflight_fills", lambda v: v == 0, upstream=ORIGIN
    )
    print(
        f"\n{count} x {size // MIB} MiB cold fills under a {cap // MIB} MiB cap: "
        f"peak {sampler.peak / MIB:.2f} MiB over {sampler.samples} samples, "
        f"{at_stall / MIB:.2f} MiB while all overlapped; "
        f"filling {during.value('registry_gate_cache_bytes', state='filling') / MIB:.0f} MiB"
    )

    for pull, digest in zip(pulls, digests, strict=True):
        assert (pull.status, pull.error) == (200, None), pull
        assert pull.received == size and pull.digest == digest, pull
    assert sampler.peak <= cap + SLACK, sampler.peak
    # Two fills fit (their reservations), three were relayed uncached.
    assert during.value("registry_gate_cache_bytes", state="filling") == 2 * size
    assert during.value("registry_gate_inflight_fills", upstream=ORIGIN) == count
    assert after.value("registry_gate_inflight_fills", upstream=ORIGIN) == 0
    assert after.value("registry_gate_cache_bytes", state="filling") == 0
    assert after.value("registry_gate_cache_bytes", state="published") == 2 * size
    failures = after.value("registry_gate_cache_fill_failures_total", upstream=ORIGIN)
    assert failures == after.value(
        "registry_gate_cache_fill_failures_total", upstream=ORIGIN, outcome="no_room"
    )
    assert failures == count - 2
    published = sorted((storage / "blobs" / "sha256").iterdir())
    assert len(published) == 2 and sum(p.stat().st_size for p in published) == 2 * size

    # Once nothing is in use, a relayed blob is cached after all (LRU eviction).
    relayed = next(d for d in digests if not (published[0].name in d or published[1].name in d))
    again = Pull(gate.url, f"/v2/{ORIGIN}/{repo}/blobs/{relayed}")
    again.run()
    assert again.digest == relayed
    wait_for(
        (storage / "blobs" / "sha256" / relayed.removeprefix("sha256:")).exists,
        "the relayed blob to be cached",
    )
    assert disk_use(storage) <= cap + SLACK


def test_a_fill_failing_before_the_upstream_answers_names_the_registry(
    gate_factory: GateFactory, proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    gate = make_gate(gate_factory, proxy)
    repo = unique_repo("unanswered")
    image = push_image(origin_client, repo, "v1", [os.urandom(4096)])
    reply = request(gate.url, "GET", f"/v2/{ORIGIN}/{repo}/manifests/v1", ACCEPT_LINES)
    assert reply.status == 200, reply  # the gate now knows the repository holds the layer
    proxy.down()
    layer = sha256(image.layers[0])
    reply = request(gate.url, "GET", f"/v2/{ORIGIN}/{repo}/blobs/{layer}")
    assert reply.status in (502, 503, 504), reply
    metrics = scrape(gate.url)
    assert metrics.value("registry_gate_cache_fill_failures_total", upstream=ORIGIN) == 1
    assert metrics.value("registry_gate_cache_fill_failures_total", upstream="unknown") == 0
    assert metrics.value("registry_gate_inflight_fills", upstream=ORIGIN) == 0


def test_stale_serves_are_counted(
    gate_factory: GateFactory, proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    gate = make_gate(gate_factory, proxy, storage={"tag_ttl": 0})
    repo = unique_repo("stale")
    push_image(origin_client, repo, "v1", [os.urandom(1024)])
    path = f"/v2/{ORIGIN}/{repo}/manifests/v1"
    assert request(gate.url, "GET", path, ACCEPT_LINES).status == 200
    assert scrape(gate.url).value("registry_gate_stale_served_total") == 0
    proxy.down()
    for method in ("GET", "HEAD"):
        reply = request(gate.url, method, path, ACCEPT_LINES)
        assert reply.status == 200 and reply.header("Warning"), reply
    metrics = scrape(gate.url)
    assert metrics.value("registry_gate_stale_served_total", upstream=ORIGIN, kind="tag") == 2


def test_total_manifest_is_a_deadline_on_manifest_fetches(
    gate_factory: GateFactory, proxy: FaultProxy, origin_client: RegistryClient
) -> None:
    # The per-read timeout (60 s) would wait; the total deadline (1 s) does not.
    gate = make_gate(gate_factory, proxy, timeouts={"total_manifest": 1.0})
    repo = unique_repo("deadline")
    push_image(origin_client, repo, "v1", [os.urandom(1024)])
    with proxy.fault("hang", kinds={"manifest"}, timeout=120):
        reply = request(
            gate.url, "GET", f"/v2/{ORIGIN}/{repo}/manifests/v1", ACCEPT_LINES, timeout=30
        )
    assert reply.status == 504 and reply.error_codes == ["UNAVAILABLE"], reply
    assert "within 1 s" in reply.error_messages[0], reply


def test_public_url_is_the_token_realm_clients_are_sent_to(
    gate_factory: GateFactory, proxy: FaultProxy, tmp_path: Path
) -> None:
    key = tmp_path / "token.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = "https://registry.example.test"  # behind a TLS-terminating proxy
    gate = make_gate(
        gate_factory,
        proxy,
        public_url=public,
        auth={"mode": "token", "signing_key": str(key)},
    )
    reply = request(gate.url, "GET", "/v2/")
    assert reply.status == 401, reply
    assert f'realm="{public}/token"' in (reply.header("WWW-Authenticate") or ""), reply
