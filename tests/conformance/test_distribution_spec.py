"""The OCI distribution-spec conformance assertions, against a registry and the gate.

The conformance suite itself (Go, distribution-spec/conformance) cannot be built offline,
so its assertions are re-implemented here (``../shared/protocol.md`` §2): section A
(v1.1.1: pull, push, content discovery, content management) and the Range tests of
section B. Every test runs twice, against the ``target`` fixture's two parameters:

- ``upstream``: a plain CNCF Distribution 2.8 registry, directly;
- ``gate``: the gate in front of another such registry (``registry.corp.example``,
  addressed by path prefix), auth off, policy ``default: allow``.

Where Distribution 2.8 itself fails an assertion, the ``upstream`` case is a strict
xfail naming the reason (it turns into a failure the day the registry passes); the gate
must pass everything the upstream passes. Requests go through ``tests.support.wire``
(stdlib ``http.client``), so the test client shares nothing with the gate's code.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from tests.support.gate import GateProcess, policy_document
from tests.support.registries import DistributionRegistry
from tests.support.upstreams import missing_tools
from tests.support.wire import HeaderLines, Reply, request

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_ARTIFACT = "application/vnd.example.conformance+type"
OCTET = {"Content-Type": "application/octet-stream"}
# The codes the v1.1.1 suite accepts in a 400 body (its list, not the spec's 14).
ERROR_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "MANIFEST_UNVERIFIED",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "TAG_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
}
CORP = "registry.corp.example"
NO_REFERRERS = "Distribution 2.8 has no referrers API (GET .../referrers/<digest> is 404)"
NO_CHUNK_ORDER = "Distribution 2.8 ignores Content-Range on PATCH and appends any chunk (202)"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# -- the two targets ---------------------------------------------------------------------


@dataclass
class Target:
    """One registry endpoint under test and the repository names it is addressed by."""

    id: str
    url: str
    prefix: str  # what goes before a repository path in a name ("" or "registry.corp.example/")

    def name(self, repo: str) -> str:
        return f"{self.prefix}conformance/{repo}"

    def req(
        self, method: str, path: str, headers: HeaderLines = (), body: bytes | None = None
    ) -> Reply:
        return request(self.url, method, path, headers, body)

    def path(self, location: str, **query: str) -> str:
        """A ``Location`` as a request target on this endpoint, query parameters kept."""
        parts = urlsplit(location)
        if parts.netloc:
            assert f"{parts.scheme}://{parts.netloc}" == self.url, (location, self.url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        if query:
            target += ("&" if parts.query else "?") + urlencode(query)
        return target

    # -- building blocks every workflow needs ---------------------------------------------

    def start_upload(self, name: str) -> str:
        reply = self.req("POST", f"/v2/{name}/blobs/uploads/", body=b"")
        assert reply.status == 202, reply
        location = reply.header("Location")
        assert location, reply.headers
        return location

    def push_blob(self, name: str, data: bytes) -> str:
        """POST then PUT ``?digest=``; returns the digest."""
        digest = sha256(data)
        location = self.start_upload(name)
        reply = self.req("PUT", self.path(location, digest=digest), OCTET, data)
        assert reply.status == 201, reply
        return digest

    def push_manifest(
        self, name: str, reference: str, raw: bytes, media_type: str = MT_MANIFEST
    ) -> Reply:
        return self.req(
            "PUT", f"/v2/{name}/manifests/{reference}", {"Content-Type": media_type}, raw
        )

    def push_image(
        self, name: str, tag: str | None, seed: int, **extra: Any
    ) -> tuple[bytes, str, list[str]]:
        """Config + one layer + an OCI manifest (tagged ``tag``, else by digest);
        returns (manifest bytes, manifest digest, blob digests)."""
        rng = random.Random(seed)
        config = canonical({"architecture": "amd64", "os": "linux", "seed": seed})
        layer = rng.randbytes(1024 + seed)
        blobs = [self.push_blob(name, config), self.push_blob(name, layer)]
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": blobs[0], "size": len(config)},
            "layers": [{"mediaType": MT_LAYER, "digest": blobs[1], "size": len(layer)}],
            **extra,
        }
        raw = canonical(manifest)
        digest = sha256(raw)
        reply = self.push_manifest(name, tag or digest, raw)
        assert reply.status == 201, reply
        return raw, digest, blobs


def _start_registry(directory: Any, name: str) -> DistributionRegistry:
    return DistributionRegistry(directory, name=name).start()


@pytest.fixture(scope="module", params=["upstream", "gate"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    missing = missing_tools()
    if missing:
        pytest.skip("conformance targets need: " + ", ".join(missing))
    registry = _start_registry(tmp_path_factory.mktemp(f"conf-{request.param}"), request.param)
    try:
        if request.param == "upstream":
            yield Target("upstream", registry.url, "")
            return
        gate = GateProcess(
            tmp_path_factory.mktemp("conf-gate"),
            {"upstreams": [{"registry": CORP, "url": registry.url}], "push_registry": CORP},
            policy=policy_document([CORP]),
            name="conformance-gate",
        )
        with gate:
            yield Target("gate", gate.url, f"{CORP}/")
    finally:
        registry.stop()


def known_gap(
    request: pytest.FixtureRequest, target: Target, *ids: str, reason: str, strict: bool = True
) -> None:
    """Expect this test to fail on the listed targets (strict: a pass fails the run, so
    the mark is removed the day the target passes)."""
    if target.id in ids:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=strict))


def assert_oci_error(reply: Reply, *codes: str) -> None:
    assert reply.error_codes, reply
    assert set(reply.error_codes) & set(codes or ERROR_CODES), reply


# -- ping --------------------------------------------------------------------------------


def test_ping(target: Target) -> None:
    reply = target.req("GET", "/v2/")
    assert reply.status == 200, reply
    assert reply.header("Docker-Distribution-API-Version") == "registry/2.0"


# -- pull ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_pull_missing_blob_is_404(target: Target, method: str) -> None:
    name = target.name("pull")
    target.push_blob(name, b"something so that the repository exists")
    reply = target.req(method, f"/v2/{name}/blobs/{sha256(b'never pushed')}")
    assert reply.status == 404, reply


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_pull_missing_manifest_is_404(target: Target, method: str) -> None:
    name = target.name("pull")
    target.push_blob(name, b"something so that the repository exists")
    for reference in ("no-such-tag", sha256(b"no such manifest")):
        reply = target.req(method, f"/v2/{name}/manifests/{reference}", {"Accept": MT_MANIFEST})
        assert reply.status == 404, (reference, reply)


def test_pull_blob(target: Target) -> None:
    name = target.name("pull-blob")
    data = random.Random(7).randbytes(4096)
    digest = target.push_blob(name, data)
    head = target.req("HEAD", f"/v2/{name}/blobs/{digest}")
    assert head.status == 200, head
    assert head.body == b""
    assert head.header("Content-Length") == str(len(data))
    if head.header("Docker-Content-Digest") is not None:
        assert head.header("Docker-Content-Digest") == digest
    got = target.req("GET", f"/v2/{name}/blobs/{digest}")
    assert got.status == 200, got
    assert got.body == data
    assert got.header("Docker-Content-Digest") in (None, digest)


def test_pull_manifest_by_tag_and_digest(target: Target) -> None:
    name = target.name("pull-manifest")
    raw, digest, _ = target.push_image(name, "tagtest0", seed=1)
    accept = {"Accept": MT_MANIFEST}
    for reference in ("tagtest0", digest):
        head = target.req("HEAD", f"/v2/{name}/manifests/{reference}", accept)
        assert head.status == 200, (reference, head)
        assert head.body == b""
        assert head.header("Docker-Content-Digest") in (None, digest)
        assert head.header("Content-Length") == str(len(raw))
        got = target.req("GET", f"/v2/{name}/manifests/{reference}", accept)
        assert got.status == 200, (reference, got)
        assert got.body == raw
        assert got.header("Docker-Content-Digest") == digest
        assert got.header("Content-Type") == MT_MANIFEST


def test_pull_manifest_by_digest_pushed_by_digest(target: Target) -> None:
    name = target.name("pull-manifest")
    raw, digest, _ = target.push_image(name, None, seed=2)
    got = target.req("GET", f"/v2/{name}/manifests/{digest}", {"Accept": MT_MANIFEST})
    assert got.status == 200, got
    assert got.body == raw


def test_pull_nonexistent_manifest(target: Target) -> None:
    """The suite's "nonexistent manifest" is a reference that is not even a valid tag:
    GET and HEAD answer 404 (MANIFEST_UNKNOWN on a body), not a 400."""
    name = target.name("pull-manifest")
    target.push_image(name, "tagtest0", seed=1)
    for method in ("GET", "HEAD"):
        reply = target.req(method, f"/v2/{name}/manifests/.INVALID_MANIFEST_NAME")
        assert reply.status == 404, (method, reply)
        if method == "GET" and target.id == "gate":
            # Distribution's router answers a plain-text 404 here; the suite checks only
            # the status, the gate also gives the spec's code.
            assert_oci_error(reply, "MANIFEST_UNKNOWN")


def test_pull_manifest_with_an_invalid_digest(
    request: pytest.FixtureRequest, target: Target
) -> None:
    known_gap(
        request,
        target,
        "upstream",
        reason="Distribution 2.8 reads sha256:totallywrong as a tag and answers 500",
    )
    name = target.name("pull-manifest")
    target.push_image(name, "tagtest0", seed=1)
    reply = target.req("GET", f"/v2/{name}/manifests/sha256:totallywrong")
    assert reply.status in (400, 404), reply
    if reply.status == 400:
        assert_oci_error(reply)


# -- push: blobs ----------------------------------------------------------------------------


def test_push_streamed(target: Target) -> None:
    """PATCH of the whole blob without ``Content-Range``, then PUT ``?digest``."""
    name = target.name("push")
    data = random.Random(11).randbytes(3000)
    location = target.start_upload(name)
    patched = target.req("PATCH", target.path(location), OCTET, data)
    assert patched.status == 202, patched
    assert patched.header("Location"), patched.headers
    done = target.req("PUT", target.path(patched.header("Location") or "", digest=sha256(data)))
    assert done.status == 201, done
    assert done.header("Location"), done.headers
    assert target.req("GET", f"/v2/{name}/blobs/{sha256(data)}").body == data


def test_push_monolithic_post_with_digest(target: Target) -> None:
    name = target.name("push")
    data = random.Random(12).randbytes(2000)
    digest = sha256(data)
    reply = target.req("POST", f"/v2/{name}/blobs/uploads/?digest={digest}", OCTET, data)
    assert reply.status in (201, 202), reply
    got = target.req("GET", f"/v2/{name}/blobs/{digest}")
    if reply.status == 201:
        assert reply.header("Location"), reply.headers
        assert got.status == 200 and got.body == data, got
    else:
        assert reply.header("Location"), reply.headers
        assert got.status == 404, got


def test_push_post_then_put(target: Target) -> None:
    name = target.name("push")
    data = random.Random(13).randbytes(2500)
    digest = sha256(data)
    location = target.start_upload(name)
    done = target.req("PUT", target.path(location, digest=digest), OCTET, data)
    assert done.status == 201, done
    blob_location = done.header("Location") or ""
    assert urlsplit(blob_location).path == f"/v2/{name}/blobs/{digest}", blob_location
    assert done.header("Docker-Content-Digest") == digest
    got = target.req("GET", target.path(blob_location))
    assert got.status == 200 and got.body == data, got


def test_push_chunked(request: pytest.FixtureRequest, target: Target) -> None:
    known_gap(request, target, "upstream", reason=NO_CHUNK_ORDER)
    name = target.name("push-chunked")
    data = random.Random(14).randbytes(6000)
    digest = sha256(data)
    location = target.start_upload(name)
    probe = target.req("GET", target.path(location))
    minimum = int(probe.header("OCI-Chunk-Min-Length") or 0)
    split = max(len(data) // 2, minimum)
    first, second = data[:split], data[split:]

    range1 = f"0-{split - 1}"
    headers = {**OCTET, "Content-Range": range1}
    chunk1 = target.req("PATCH", target.path(location), headers, first)
    assert chunk1.status == 202, chunk1
    assert chunk1.header("Range") == range1
    location = chunk1.header("Location") or ""
    assert location

    # The same chunk again is out of order now.
    again = target.req("PATCH", target.path(location), headers, first)
    assert again.status == 416, again

    status = target.req("GET", target.path(location))
    assert status.status == 204, status
    assert status.header("Location"), status.headers
    assert status.header("Range") == range1
    location = status.header("Location") or location

    range2 = f"{split}-{len(data) - 1}"
    chunk2 = target.req("PATCH", target.path(location), {**OCTET, "Content-Range": range2}, second)
    assert chunk2.status == 202, chunk2
    assert chunk2.header("Range") == f"0-{len(data) - 1}"
    done = target.req("PUT", target.path(chunk2.header("Location") or "", digest=digest))
    assert done.status == 201, done
    assert done.header("Location"), done.headers
    got = target.req("GET", f"/v2/{name}/blobs/{digest}")
    assert got.status == 200 and got.body == data, got


def test_push_chunk_out_of_order_is_416(request: pytest.FixtureRequest, target: Target) -> None:
    known_gap(request, target, "upstream", reason=NO_CHUNK_ORDER)
    name = target.name("push-chunked")
    data = random.Random(15).randbytes(2000)
    location = target.start_upload(name)
    headers = {**OCTET, "Content-Range": f"1000-{len(data) - 1}"}
    reply = target.req("PATCH", target.path(location), headers, data[1000:])
    assert reply.status == 416, reply


def test_push_put_with_a_wrong_digest_is_400(target: Target) -> None:
    name = target.name("push")
    data = b"the bytes the digest does not describe"
    location = target.start_upload(name)
    reply = target.req("PUT", target.path(location, digest=sha256(b"other")), OCTET, data)
    assert reply.status == 400, reply
    assert_oci_error(reply, "DIGEST_INVALID")


def test_push_upload_cancel(target: Target) -> None:
    name = target.name("push")
    location = target.start_upload(name)
    patched = target.req("PATCH", target.path(location), OCTET, b"abandoned")
    assert patched.status == 202, patched
    location = patched.header("Location") or location
    cancelled = target.req("DELETE", target.path(location))
    assert cancelled.status == 204, cancelled
    gone = target.req("GET", target.path(location))
    assert gone.status == 404, gone
    assert_oci_error(gone, "BLOB_UPLOAD_UNKNOWN")


def test_mount_without_from_starts_an_upload(target: Target) -> None:
    source, dest = target.name("mount-source"), target.name("mount-dest")
    digest = target.push_blob(source, b"mount me without a from")
    reply = target.req("POST", f"/v2/{dest}/blobs/uploads/?mount={digest}", body=b"")
    assert reply.status == 202, reply
    location = reply.header("Location") or ""
    assert urlsplit(location).path.startswith(f"/v2/{dest}/blobs/uploads/"), location


def test_mount_with_from(target: Target) -> None:
    source, dest = target.name("mount-source"), target.name("mount-dest")
    data = b"mount me from the source repository"
    digest = target.push_blob(source, data)
    query = urlencode({"mount": digest, "from": source})
    reply = target.req("POST", f"/v2/{dest}/blobs/uploads/?{query}", body=b"")
    assert reply.status in (201, 202), reply
    location = reply.header("Location") or ""
    if reply.status == 201:
        assert urlsplit(location).path == f"/v2/{dest}/blobs/{digest}", location
        got = target.req("GET", f"/v2/{dest}/blobs/{digest}")
        assert got.status == 200 and got.body == data, got
    else:
        assert urlsplit(location).path.startswith(f"/v2/{dest}/blobs/uploads/"), location


# -- push: manifests --------------------------------------------------------------------------


def test_push_manifest_tags(target: Target) -> None:
    name = target.name("manifests")
    raw, digest, _ = target.push_image(name, "test0", seed=21)
    for tag in ("test1", "test2", "test3"):
        reply = target.push_manifest(name, tag, raw)
        assert reply.status == 201, reply
        assert reply.header("Location"), reply.headers
        assert reply.header("Docker-Content-Digest") == digest
    got = target.req("GET", f"/v2/{name}/manifests/{digest}", {"Accept": MT_MANIFEST})
    assert got.status == 200 and got.body == raw, got


def test_a_tag_pushed_again_names_the_new_manifest_at_once(target: Target) -> None:
    """Read your writes: a tag pulled (so the gate caches it), pushed again with another
    manifest, then pulled: the new manifest, not the cached one (whatever `tag_ttl`);
    the same for a tag written by `?tag=` on a push by digest (OCI 1.1)."""
    name = target.name("retag")
    accept = {"Accept": MT_MANIFEST}
    _, first, _ = target.push_image(name, "moving", seed=90)
    got = target.req("GET", f"/v2/{name}/manifests/moving", accept)
    assert got.status == 200 and got.header("Docker-Content-Digest") == first, got
    raw, second, _ = target.push_image(name, "moving", seed=91)
    got = target.req("GET", f"/v2/{name}/manifests/moving", accept)
    assert got.status == 200 and got.header("Docker-Content-Digest") == second, got
    assert got.body == raw
    # Pushed by digest with ?tag= naming the tag (a registry that ignores the parameter
    # keeps the tag where it was: then the tag must still be read back as the upstream
    # has it, never as a stale cached answer).
    raw, third, _ = target.push_image(name, None, seed=92)
    reply = target.req(
        "PUT", f"/v2/{name}/manifests/{third}?tag=moving", {"Content-Type": MT_MANIFEST}, raw
    )
    assert reply.status == 201, reply
    upstream_has = third if reply.header("OCI-Tag") == "moving" else second
    got = target.req("GET", f"/v2/{name}/manifests/moving", accept)
    assert got.status == 200 and got.header("Docker-Content-Digest") == upstream_has, got


def test_push_manifest_keeps_the_exact_bytes(target: Target) -> None:
    """Whitespace and key order are the client's: the digest is of what was sent."""
    name = target.name("manifests")
    _, _, blobs = target.push_image(name, "base", seed=22)
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "layers": [{"digest": blobs[1], "size": 1046, "mediaType": MT_LAYER}],
        "config": {"size": 0, "mediaType": MT_CONFIG, "digest": blobs[0]},
        "annotations": {"conformance": "exact bytes"},
    }
    config_size = len(target.req("GET", f"/v2/{name}/blobs/{blobs[0]}").body)
    doc["config"]["size"] = config_size  # type: ignore[index]
    raw = (json.dumps(doc, indent=3) + "\n").encode()
    digest = sha256(raw)
    reply = target.push_manifest(name, "exact", raw)
    assert reply.status == 201, reply
    assert reply.header("Docker-Content-Digest") == digest
    assert urlsplit(reply.header("Location") or "").path.startswith(f"/v2/{name}/manifests/")
    for reference in ("exact", digest):
        got = target.req("GET", f"/v2/{name}/manifests/{reference}", {"Accept": MT_MANIFEST})
        assert got.body == raw, reference


def test_push_manifest_without_layers(target: Target) -> None:
    name = target.name("manifests")
    config = canonical({"architecture": "amd64", "os": "linux", "empty": True})
    config_digest = target.push_blob(name, config)
    raw = canonical(
        {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [],
        }
    )
    reply = target.push_manifest(name, "nolayers", raw)
    assert reply.status == 201 or reply.header("Warning"), reply


def test_push_manifest_with_missing_blobs(target: Target) -> None:
    name = target.name("manifests")
    raw = canonical(
        {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": sha256(b"nope"), "size": 4},
            "layers": [],
        }
    )
    reply = target.push_manifest(name, "dangling", raw)
    assert reply.status == 400, reply
    assert_oci_error(reply, "MANIFEST_BLOB_UNKNOWN")


def test_manifest_bad_digest_string(request: pytest.FixtureRequest, target: Target) -> None:
    known_gap(
        request, target, "upstream", reason="Distribution 2.8 answers 500 (a storage path error)"
    )
    name = target.name("manifests")
    raw, _, _ = target.push_image(name, "good", seed=23)
    put = target.push_manifest(name, "sha256:baddigeststring", raw)
    assert put.status == 400, put
    got = target.req("GET", f"/v2/{name}/manifests/sha256:baddigeststring")
    assert got.status in (400, 404), got


# -- content discovery ------------------------------------------------------------------------

TAGS = [f"tag{i:02d}" for i in range(8)]


@pytest.fixture(scope="module")
def tagged(target: Target) -> str:
    """A repository with the tags ``TAGS`` (pushed in reverse order) on one manifest."""
    name = target.name("discovery")
    raw, _, _ = target.push_image(name, TAGS[-1], seed=31)
    for tag in reversed(TAGS[:-1]):
        assert target.push_manifest(name, tag, raw).status == 201
    return name


def test_tag_list(target: Target, tagged: str) -> None:
    reply = target.req("GET", f"/v2/{tagged}/tags/list")
    assert reply.status == 200, reply
    document = reply.json()
    assert document["name"] == tagged
    assert sorted(document["tags"]) == sorted(TAGS)


def test_tag_list_is_sorted(request: pytest.FixtureRequest, target: Target, tagged: str) -> None:
    # Not strict: the order Distribution returns is its directory listing's order.
    known_gap(
        request, target, "upstream", reason="Distribution 2.8 lists tags unsorted", strict=False
    )
    assert target.req("GET", f"/v2/{tagged}/tags/list").json()["tags"] == sorted(TAGS)


def test_tag_list_n(request: pytest.FixtureRequest, target: Target, tagged: str) -> None:
    known_gap(request, target, "upstream", reason="Distribution 2.8 ignores n on tag lists")
    half = len(TAGS) // 2
    reply = target.req("GET", f"/v2/{tagged}/tags/list?n={half}")
    assert reply.status == 200, reply
    assert reply.json()["tags"] == sorted(TAGS)[:half]
    link = reply.header("Link") or ""
    assert 'rel="next"' in link, reply.headers


def test_tag_list_n_and_last(request: pytest.FixtureRequest, target: Target, tagged: str) -> None:
    known_gap(request, target, "upstream", reason="Distribution 2.8 ignores n and last")
    ordered = sorted(TAGS)
    reply = target.req("GET", f"/v2/{tagged}/tags/list?n=3&last={ordered[1]}")
    assert reply.status == 200, reply
    assert reply.json()["tags"] == ordered[2:5]


def test_tag_list_follow_links(request: pytest.FixtureRequest, target: Target, tagged: str) -> None:
    known_gap(request, target, "upstream", reason="Distribution 2.8 sends no Link")
    seen: list[str] = []
    path: str | None = f"/v2/{tagged}/tags/list?n=3"
    while path is not None:
        reply = target.req("GET", path)
        assert reply.status == 200, reply
        seen += reply.json()["tags"]
        link = reply.header("Link")
        path = target.path(link.split(">", 1)[0].lstrip("<")) if link else None
        assert len(seen) <= len(TAGS), seen
    assert seen == sorted(TAGS)


def test_tag_list_n_zero(request: pytest.FixtureRequest, target: Target, tagged: str) -> None:
    known_gap(request, target, "upstream", reason="Distribution 2.8 ignores n")
    reply = target.req("GET", f"/v2/{tagged}/tags/list?n=0")
    assert reply.status == 200, reply
    assert reply.json()["tags"] in ([], None)
    assert reply.header("Link") is None


def test_referrers_of_a_missing_subject_is_an_empty_index(
    request: pytest.FixtureRequest, target: Target, tagged: str
) -> None:
    known_gap(request, target, "upstream", reason=NO_REFERRERS)
    reply = target.req("GET", f"/v2/{tagged}/referrers/{sha256(b'no such subject')}")
    assert reply.status == 200, reply
    assert reply.header("Content-Type") == MT_INDEX
    document = reply.json()
    assert document["mediaType"] == MT_INDEX
    assert document["manifests"] == []


def test_referrers_list_pushed_artifacts(
    request: pytest.FixtureRequest, target: Target, tagged: str
) -> None:
    """The suite's referrers workflow: a subject, referrers with and without
    ``artifactType`` (pushed by digest); each push answers ``OCI-Subject``; the referrers
    API lists them with their artifact types and annotations, and filters by type.
    Distribution 2.8 has no referrers API: the gate keeps the referrers tag schema for it."""
    known_gap(request, target, "upstream", reason=NO_REFERRERS)
    subject_raw, subject_digest, _ = target.push_image(tagged, "subject", seed=32)
    subject = {"mediaType": MT_MANIFEST, "digest": subject_digest, "size": len(subject_raw)}
    pushed: dict[str, str] = {}
    for seed, extra in (
        (33, {"artifactType": MT_ARTIFACT, "annotations": {"org.example.conformance": "a"}}),
        (34, {"annotations": {"org.example.conformance": "b"}}),
    ):
        raw, digest, _ = target.push_image(tagged, None, seed=seed, subject=subject, **extra)
        pushed[digest] = str(extra.get("artifactType", MT_CONFIG))
        reply = target.push_manifest(tagged, digest, raw)
        assert reply.status == 201, reply
        assert reply.header("OCI-Subject") == subject_digest, reply.headers
    reply = target.req("GET", f"/v2/{tagged}/referrers/{subject_digest}")
    assert reply.status == 200, reply
    assert reply.header("Content-Type") == MT_INDEX
    entries = reply.json()["manifests"]
    assert {e["digest"]: e.get("artifactType") for e in entries} == pushed
    by_digest = {e["digest"]: e for e in entries}
    for digest in pushed:
        assert by_digest[digest]["mediaType"] == MT_MANIFEST
        assert by_digest[digest]["size"] > 0
    annotations = sorted(e["annotations"]["org.example.conformance"] for e in entries)
    assert annotations == ["a", "b"]
    # Filtered: only the artifacts of one type, and the header says a filter applied.
    query = urlencode({"artifactType": MT_ARTIFACT})
    reply = target.req("GET", f"/v2/{tagged}/referrers/{subject_digest}?{query}")
    assert reply.status == 200, reply
    assert reply.header("OCI-Filters-Applied") == "artifactType"
    entries = reply.json()["manifests"]
    assert [e["artifactType"] for e in entries] == [MT_ARTIFACT]
    # A subject nobody referred to: an empty index, not a 404.
    reply = target.req("GET", f"/v2/{tagged}/referrers/{sha256(b'never pushed')}")
    assert reply.status == 200, reply
    assert reply.json()["manifests"] == []


def test_referrers_pushed_concurrently_are_all_listed(
    request: pytest.FixtureRequest, target: Target, tagged: str
) -> None:
    """Several referrers of one subject pushed at once: the fallback index the gate
    maintains loses none of them."""
    known_gap(request, target, "upstream", reason=NO_REFERRERS)
    subject_raw, subject_digest, _ = target.push_image(tagged, "crowded", seed=60)
    subject = {"mediaType": MT_MANIFEST, "digest": subject_digest, "size": len(subject_raw)}
    seeds = range(61, 69)
    with ThreadPoolExecutor(len(seeds)) as pool:
        digests = set(
            pool.map(
                lambda seed: target.push_image(
                    tagged, None, seed=seed, subject=subject, artifactType=MT_ARTIFACT
                )[1],
                seeds,
            )
        )
    reply = target.req("GET", f"/v2/{tagged}/referrers/{subject_digest}")
    assert reply.status == 200, reply
    assert {e["digest"] for e in reply.json()["manifests"]} == digests


# -- content management -------------------------------------------------------------------------


def test_delete_tag(request: pytest.FixtureRequest, target: Target) -> None:
    known_gap(
        request,
        target,
        "upstream",
        reason="Distribution 2.8 answers a tag DELETE with 400 DIGEST_INVALID (the suite wants "
        "202, 405, or 400 UNSUPPORTED); the gate repairs it to 405 UNSUPPORTED",
    )
    name = target.name("management")
    raw, digest, _ = target.push_image(name, "keep", seed=41)
    assert target.push_manifest(name, "drop", raw).status == 201
    reply = target.req("DELETE", f"/v2/{name}/manifests/drop")
    assert reply.status in (202, 400, 405), reply
    if reply.status in (400, 405):
        assert_oci_error(reply, "UNSUPPORTED")
    if reply.status == 202:
        tags = target.req("GET", f"/v2/{name}/tags/list").json()["tags"]
        assert "drop" not in tags and "keep" in tags, tags
        got = target.req("GET", f"/v2/{name}/manifests/{digest}", {"Accept": MT_MANIFEST})
        assert got.status == 200, got


def test_delete_manifest(target: Target) -> None:
    name = target.name("management")
    _, keep_digest, _ = target.push_image(name, "other", seed=42)
    _, digest, _ = target.push_image(name, "doomed", seed=43)
    accept = {"Accept": MT_MANIFEST}
    # Read it first: a caching target must forget it when it is deleted.
    assert target.req("GET", f"/v2/{name}/manifests/{digest}", accept).status == 200
    before = target.req("GET", f"/v2/{name}/tags/list").json()["tags"]
    reply = target.req("DELETE", f"/v2/{name}/manifests/{digest}")
    assert reply.status in (202, 404), reply
    after = target.req("GET", f"/v2/{name}/tags/list").json()["tags"]
    assert len(after) == len(before) - 1 and "doomed" not in after, (before, after)
    gone = target.req("GET", f"/v2/{name}/manifests/{digest}", accept)
    assert gone.status == 404, gone
    assert target.req("GET", f"/v2/{name}/manifests/{keep_digest}", accept).status == 200


def test_delete_blobs(target: Target) -> None:
    name = target.name("management")
    _, digest, blobs = target.push_image(name, "blobs", seed=44)
    assert target.req("DELETE", f"/v2/{name}/manifests/{digest}").status in (202, 404)
    for blob in blobs:
        # Read it first: a caching target must stop serving it once it is deleted.
        assert target.req("GET", f"/v2/{name}/blobs/{blob}").status == 200
        reply = target.req("DELETE", f"/v2/{name}/blobs/{blob}")
        assert reply.status in (202, 404, 405), reply
        if reply.status != 405:
            for method in ("GET", "HEAD"):
                gone = target.req(method, f"/v2/{name}/blobs/{blob}")
                assert gone.status == 404, (method, gone)


# -- Range (section B) ----------------------------------------------------------------------------

BLOB_SIZE = 2000


@pytest.fixture
def ranged(request: pytest.FixtureRequest, target: Target) -> tuple[str, bytes]:
    """A repository and a 2000-byte blob of this test's own, never read before."""
    name = target.name("range")
    data = random.Random(request.node.name).randbytes(BLOB_SIZE)
    target.push_blob(name, data)
    return name, data


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=500-1499", 500, 1499),
        ("bytes=500-", 500, BLOB_SIZE - 1),
        ("bytes=-500", BLOB_SIZE - 500, BLOB_SIZE - 1),
        ("bytes=1500-2999", 1500, BLOB_SIZE - 1),  # clipped at the end of the blob
    ],
)
def test_range(
    target: Target, ranged: tuple[str, bytes], header: str, first: int, last: int
) -> None:
    name, data = ranged
    # Twice: a caching target serves the first from upstream and the second from cache.
    for attempt in (1, 2):
        reply = target.req("GET", f"/v2/{name}/blobs/{sha256(data)}", {"Range": header})
        assert reply.status == 206, (attempt, reply)
        content_range = reply.header("Content-Range")
        assert content_range in (f"bytes {first}-{last}/{BLOB_SIZE}", f"bytes {first}-{last}/*")
        assert reply.body == data[first : last + 1], attempt
        assert reply.header("Content-Length") == str(last - first + 1)


@pytest.mark.parametrize("header", ["bytes=1499-500", "bytes=3000-3999"])
def test_range_unsatisfiable_is_416(
    request: pytest.FixtureRequest, target: Target, ranged: tuple[str, bytes], header: str
) -> None:
    known_gap(
        request,
        target,
        "upstream",
        reason="Distribution 2.8 answers 416 with the blob's Content-Length and a short "
        "error body (broken framing)",
    )
    name, data = ranged
    for attempt in (1, 2):
        reply = target.req("GET", f"/v2/{name}/blobs/{sha256(data)}", {"Range": header})
        assert reply.status == 416, (attempt, reply)
