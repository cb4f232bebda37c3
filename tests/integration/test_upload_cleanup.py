"""Uploads the gate ends leave nothing upstream (issue 11, items 14 and 7).

Each test pushes through a real gate process to a real, private Distribution 2.8
registry and then looks into the registry's storage: no ``_uploads/<id>`` folder may be
left in the repository, and neither the digest the client claimed nor the digest of the
bytes it sent may exist as a blob. Distribution keeps the data of a session whose
monolithic PUT failed its digest check (its cancel refuses a committed writer), so the
gate must never hand it such a PUT; these tests prove it does not, for:

- a monolithic PUT (POST, then PUT with the body) with the wrong digest;
- a monolithic POST ``?digest=`` with the wrong digest;
- POST, PATCH, then a body-less PUT with the wrong digest;
- a client that disconnects in the middle of a PATCH body;
- a client that drips a PATCH body below ``uploads.min_rate`` (answered 408);
- an upstream that fails a PATCH (through the fault proxy);
- a policy that stops allowing the push in the middle of the upload;
- a session continued on another gate replica, which cannot verify it;

and that the ordinary flows still land byte-exact blobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.gate import GateFactory, GateProcess, policy_document
from tests.support.metrics import scrape
from tests.support.registries import DistributionRegistry, RegistryFactory

CORP = "registry.corp.example"
REPO = "team/app"
NAME = f"{CORP}/{REPO}"
OCTET = {"Content-Type": "application/octet-stream"}
SECRET = "upload-cleanup-test-secret-0123456789"
CLEANUP_WAIT = 15.0


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_bytes(seed: int, size: int = 200_000) -> bytes:
    return random.Random(seed).randbytes(size)


# -- what the registry's storage holds ------------------------------------------------------------


def repositories_root(registry: DistributionRegistry) -> Path:
    return registry.storage / "docker/registry/v2/repositories"


def upload_folders(registry: DistributionRegistry) -> list[Path]:
    """Every upload session folder (``<repo>/_uploads/<id>``) in the registry's storage."""
    root = repositories_root(registry)
    return sorted(p for p in root.glob("**/_uploads/*")) if root.exists() else []


def upload_leftovers(registry: DistributionRegistry) -> list[Path]:
    """Files of upload sessions: their data, start time and hash states.

    One file is not counted: Distribution 2.8's own DELETE removes the session and then,
    closing its writer, writes the hash state of zero bytes again
    (``hashstates/sha256/0``, 108 bytes, nothing of the upload; a plain client's DELETE
    leaves the same). Anything else (``data``, ``startedat``, a hash state at an offset
    past 0) is content the registry still holds.
    """
    return [
        path
        for folder in upload_folders(registry)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).parts != ("hashstates", "sha256", "0")
    ]


def blob_stored(registry: DistributionRegistry, digest: str) -> bool:
    hex_digest = digest.split(":", 1)[1]
    blobs = registry.storage / "docker/registry/v2/blobs/sha256"
    return (blobs / hex_digest[:2] / hex_digest / "data").exists()


def wait_until_no_uploads(registry: DistributionRegistry) -> list[Path]:
    """The upload files left once the gate had time to cancel (cleanup after a client
    is gone runs after the client's connection closed, so it is waited for)."""
    deadline = time.monotonic() + CLEANUP_WAIT
    while True:
        left = upload_leftovers(registry)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def assert_nothing_left(registry: DistributionRegistry, *digests: str) -> None:
    assert wait_until_no_uploads(registry) == []
    for digest in digests:
        assert not blob_stored(registry, digest), digest


# -- the gate and a small upload client -----------------------------------------------------------


def gate_config(upstream_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "upstreams": [{"registry": CORP, "url": upstream_url}],
        "upload_secret": SECRET,
        **extra,
    }


@pytest.fixture
def corp(registry_factory: RegistryFactory) -> DistributionRegistry:
    return registry_factory(name="cleanup-corp")


@pytest.fixture
def gate(gate_factory: GateFactory, corp: DistributionRegistry) -> GateProcess:
    return gate_factory(gate_config(corp.url), policy=policy_document([CORP]), name="cleanup")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        yield client


class Uploads:
    """Upload requests to one gate for ``NAME``."""

    def __init__(self, http: aiohttp.ClientSession, gate: GateProcess) -> None:
        self.http = http
        self.gate = gate

    def url(self, location: str, **query: str) -> str:
        parts = urllib.parse.urlsplit(location)
        url = self.gate.url + parts.path + (f"?{parts.query}" if parts.query else "")
        if query:
            url += ("&" if parts.query else "?") + urllib.parse.urlencode(query)
        return url

    async def call(
        self, method: str, url: str, data: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        async with self.http.request(method, url, data=data, headers=headers) as response:
            body = await response.read()
            document = json.loads(body) if body.startswith(b"{") else body
            return response.status, dict(response.headers), document

    async def start(self) -> str:
        status, headers, body = await self.call("POST", f"{self.gate.url}/v2/{NAME}/blobs/uploads/")
        assert status == 202, body
        return headers["Location"]

    async def patch(self, location: str, data: bytes) -> str:
        status, headers, body = await self.call("PATCH", self.url(location), data, OCTET)
        assert status == 202, body
        assert headers["Range"] == f"0-{len(data) - 1}"
        return headers["Location"]


def error_code(body: Any) -> str:
    assert isinstance(body, dict), body
    return str(body["errors"][0]["code"])


# -- the ordinary flows still land ----------------------------------------------------------------


async def test_monolithic_put_lands_byte_exact(
    http: aiohttp.ClientSession, gate: GateProcess, corp: DistributionRegistry
) -> None:
    up = Uploads(http, gate)
    data = blob_bytes(1)
    location = await up.start()
    status, headers, body = await up.call("PUT", up.url(location, digest=sha256(data)), data, OCTET)
    assert status == 201, body
    assert headers["Docker-Content-Digest"] == sha256(data)
    assert headers["Location"] == f"/v2/{NAME}/blobs/{sha256(data)}"
    assert blob_stored(corp, sha256(data))
    assert upload_leftovers(corp) == []


async def test_monolithic_post_completes_in_one_request(
    http: aiohttp.ClientSession, gate: GateProcess, corp: DistributionRegistry
) -> None:
    """POST ?digest= with the body: the gate completes it (Distribution 2.8 alone would
    drop the body and open a session)."""
    up = Uploads(http, gate)
    data = blob_bytes(2)
    url = f"{gate.url}/v2/{NAME}/blobs/uploads/?digest={sha256(data)}"
    status, headers, body = await up.call("POST", url, data, OCTET)
    assert status == 201, body
    assert headers["Location"] == f"/v2/{NAME}/blobs/{sha256(data)}"
    assert blob_stored(corp, sha256(data))
    assert upload_leftovers(corp) == []


async def test_chunked_then_put_with_a_last_chunk(
    http: aiohttp.ClientSession, gate: GateProcess, corp: DistributionRegistry
) -> None:
    up = Uploads(http, gate)
    data = blob_bytes(3, 300_000)
    location = await up.start()
    first = {**OCTET, "Content-Range": "0-99999"}
    status, headers, body = await up.call("PATCH", up.url(location), data[:100_000], first)
    assert status == 202, body
    location = headers["Location"]
    second = {**OCTET, "Content-Range": "100000-199999"}
    status, headers, body = await up.call("PATCH", up.url(location), data[100_000:200_000], second)
    assert status == 202, body
    assert headers["Range"] == "0-199999"
    status, headers, body = await up.call(
        "PUT", up.url(headers["Location"], digest=sha256(data)), data[200_000:], OCTET
    )
    assert status == 201, body
    assert blob_stored(corp, sha256(data))
    assert upload_leftovers(corp) == []


# -- rejected uploads leave nothing ---------------------------------------------------------------


async def test_monolithic_put_with_the_wrong_digest(
    http: aiohttp.ClientSession, gate: GateProcess, corp: DistributionRegistry
) -> None:
    up = Uploads(http, gate)
    data, claimed = blob_bytes(4), sha256(b"something else")
    location = await up.start()
    status, _, body = await up.call("PUT", up.url(location, digest=claimed), data, OCTET)
    assert status == 400, body
    assert error_code(body) == "DIGEST_INVALID"
    assert_nothing_left(corp, claimed, sha256(data))
    # The session is gone for the client too.
    status, _, body = await up.call("GET", up.url(location))
    assert status == 404, body


async def test_monolithic_post_with_the_wrong_digest(
    http: aiohttp.ClientSession, gate: GateProcess, corp: DistributionRegistry
) -> None:
    up = Uploads(http, gate)
    data, claimed = blob_bytes(5), sha256(b"not these bytes")
    url = f"{gate.url}/v2/{NAME}/blobs/uploads/?digest={claimed}"
    status, _, body = await up.call("POST", url, data, OCTET)
    assert status == 400, body
    assert error_code(body) == "DIGEST_INVALID"
    assert_nothing_left(corp, claimed, sha256(data))


async def test_patch_then_put_with_the_wrong_digest(
    http: aiohttp.ClientSession, gate: GateProcess, corp: DistributionRegistry
) -> None:
    up = Uploads(http, gate)
    data, claimed = blob_bytes(6), sha256(b"a different blob")
    location = await up.patch(await up.start(), data)
    assert len(upload_leftovers(corp)) >= 1  # the bytes are upstream, in the session
    status, _, body = await up.call("PUT", up.url(location, digest=claimed))
    assert status == 400, body
    assert error_code(body) == "DIGEST_INVALID"
    assert_nothing_left(corp, claimed, sha256(data))
    metrics = scrape(gate.url)
    aborts = "registry_gate_upload_aborts_total"
    assert metrics.value(aborts, reason="digest_mismatch", cancelled="yes") == 1


async def test_client_disconnect_mid_patch(gate: GateProcess, corp: DistributionRegistry) -> None:
    async with aiohttp.ClientSession() as http:
        location = await Uploads(http, gate).start()
    assert len(upload_leftovers(corp)) >= 1
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.port)
    head = (
        f"PATCH {location} HTTP/1.1\r\nHost: {gate.host}\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
    )
    writer.write(head.encode() + blob_bytes(7, 300_000))
    await writer.drain()
    writer.close()  # 700,000 bytes short
    await writer.wait_closed()
    assert_nothing_left(corp)
    del reader


async def test_dripping_client_is_cut_off_and_its_session_cancelled(
    gate_factory: GateFactory, corp: DistributionRegistry
) -> None:
    slow_gate = gate_factory(
        gate_config(corp.url, uploads={"min_rate": "64KiB", "min_rate_window": 0.5}),
        policy=policy_document([CORP]),
        name="slow-cut",
    )
    async with aiohttp.ClientSession() as http:
        location = await Uploads(http, slow_gate).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", slow_gate.port)
    head = (
        f"PATCH {location} HTTP/1.1\r\nHost: {slow_gate.host}\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
    )
    writer.write(head.encode() + b"x" * 100)
    await writer.drain()
    # Then nothing more: the gate answers on its own once the window has passed.
    status_line = await asyncio.wait_for(reader.readline(), 30)
    rest = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert status_line.split()[1] == b"408", status_line + rest
    assert b"BLOB_UPLOAD_INVALID" in rest, rest
    assert_nothing_left(corp)
    metrics = scrape(slow_gate.url)
    assert metrics.value("registry_gate_upload_aborts_total", reason="too_slow") == 1


@pytest.fixture
def corp_proxy(corp: DistributionRegistry) -> Iterator[FaultProxy]:
    with FaultProxy(lambda: corp.url, name="cleanup-proxy") as proxy:
        yield proxy


async def test_upstream_failing_a_patch(
    http: aiohttp.ClientSession,
    gate_factory: GateFactory,
    corp: DistributionRegistry,
    corp_proxy: FaultProxy,
) -> None:
    proxied = gate_factory(
        gate_config(corp_proxy.url), policy=policy_document([CORP]), name="proxied"
    )
    up = Uploads(http, proxied)
    location = await up.start()
    assert len(upload_leftovers(corp)) >= 1
    corp_proxy.set_fault(Fault("status", kinds={"upload"}, methods={"PATCH"}, times=1))
    status, _, body = await up.call("PATCH", up.url(location), blob_bytes(8), OCTET)
    assert status == 502, body
    assert_nothing_left(corp)
    assert corp_proxy.count("DELETE", "upload") == 1


async def test_policy_refusing_the_push_mid_upload(
    http: aiohttp.ClientSession, gate_factory: GateFactory, corp: DistributionRegistry
) -> None:
    allow = policy_document([CORP])
    watched = gate_factory(gate_config(corp.url), policy=allow, name="policy-change")
    up = Uploads(http, watched)
    location = await up.patch(await up.start(), blob_bytes(9))
    assert len(upload_leftovers(corp)) >= 1
    deny = policy_document(
        [CORP],
        rules=[{"name": "frozen", "match": f"{CORP}/**", "actions": ["push"], "allow": False}],
    )
    watched.policy_path.write_text(json.dumps(deny))
    # The gate polls its policy file: wait until a new upload is refused.
    deadline = time.monotonic() + CLEANUP_WAIT
    while True:
        status, headers, body = await up.call("POST", f"{watched.url}/v2/{NAME}/blobs/uploads/")
        if status != 202 or time.monotonic() > deadline:
            break
        await up.call("DELETE", up.url(headers["Location"]))
        await asyncio.sleep(0.2)
    assert status == 403, body
    status, _, body = await up.call("PATCH", up.url(location), b"more", OCTET)
    assert status == 403, body
    assert_nothing_left(corp)


async def test_session_continued_on_another_replica_is_cancelled(
    http: aiohttp.ClientSession,
    gate: GateProcess,
    gate_factory: GateFactory,
    corp: DistributionRegistry,
) -> None:
    """A replica that did not see the bytes cannot verify the digest: it cancels."""
    other = gate_factory(gate_config(corp.url), policy=policy_document([CORP]), name="replica")
    data = blob_bytes(10)
    location = await Uploads(http, gate).patch(await Uploads(http, gate).start(), data)
    status, _, body = await Uploads(http, other).call(
        "PUT", Uploads(http, other).url(location, digest=sha256(data))
    )
    assert status == 404, body
    assert error_code(body) == "BLOB_UPLOAD_UNKNOWN"
    assert_nothing_left(corp, sha256(data))
