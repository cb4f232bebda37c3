"""Push, delete and client authentication through the gate, with real registries and clients.

One module-wide setting (``World``), started once:

- ``corp`` (registry.corp.example, the push registry) and ``hub`` (docker.io): empty
  Distribution registries of this module's own, seeded here, so pushes disturb no
  other test;
- ``gate``: ``auth.mode: token`` with an htpasswd made here (bcrypt, ``$2y$`` as
  ``htpasswd -B`` writes it) and an EC P-256 signing key (ES256), and an enterprise-style
  policy with principals (``POLICY``): alice (group developers) may push and delete on
  corp, except deletes under ``protected/``; bob may only pull corp; anonymous may pull
  only Docker Hub official images; nobody may push or delete anywhere else.
- ``open_gate``: ``auth.mode: none`` with ``policies/enterprise.yaml`` exactly as shipped.

What is proven, and how:

- real clients: ``skopeo copy --dest-creds`` into corp through the gate, then a pull
  straight from corp is byte-identical (manifests and blobs); ``podman login`` +
  ``podman push`` (inside a private network namespace only); a refused skopeo push
  names the rule;
- the upload protocol driven by a plain HTTP client (aiohttp): chunked with
  ``Content-Range`` (416 for a re-sent or out-of-order chunk), upload status, monolithic
  ``POST ?digest=``, streamed (chunked transfer, no ``Content-Range``), cancel,
  cross-repository mount, manifest PUT by tag and by digest with the bytes kept exactly;
  every ``Location`` points at the gate;
- policy first: deletes forwarded or refused (403 naming the rule), pushes to docker.io
  refused with 403 ``DENIED`` naming ``no-public-push`` before anything reaches the hub
  (its storage holds no trace of the repository), short-name pushes land on
  ``push_registry``; pushes and denials are attributed to the user in the audit log;
- tokens: the challenges (realm, service, per-request scope), scope escalation, a
  pull-only token used to push, forged tokens (``alg: none``, expired, not yet valid,
  tampered, wrong key/audience/issuer, HS256 with the public key, embedded ``jwk``,
  oversized), the OAuth2 POST grants, and that no password reaches a log or a response.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.gate import PROJECT_ROOT, GateProcess
from tests.support.images import (
    MT_OCI_CONFIG,
    MT_OCI_LAYER_GZIP,
    MT_OCI_MANIFEST,
    ORIGIN_LABEL,
    Layout,
    PushedRef,
    PushSpec,
    alpine_index,
    origin_image,
    push,
)
from tests.support.netns import in_private_netns
from tests.support.registries import DistributionRegistry
from tests.support.registry_client import MANIFEST_ACCEPT, RegistryClient, RegistryHTTPError
from tests.support.upstreams import missing_tools
from tests.support.wire import HeaderLines, Reply, request

CORP = "registry.corp.example"
HUB = "docker.io"
SERVICE = "registry-gate"
PASSWORDS = {"alice": "alice-S3cret-pw-91", "bob": "bob-S3cret-pw-27"}
WRONG_PASSWORD = "wrong-pw-sentinel-4b7e"
ACCEPT_LINES: list[tuple[str, str]] = [("Accept", mt) for mt in MANIFEST_ACCEPT]
OCTET = {"Content-Type": "application/octet-stream"}
CLIENT_TIMEOUT = 120

POLICY: dict[str, Any] = {
    "search": [CORP, HUB],
    "short_name_mode": "permissive",
    "default": "deny",
    "rules": [
        {
            "name": "protected-no-delete",
            "match": f"{CORP}/protected/**",
            "actions": ["delete"],
            "allow": False,
        },
        {
            "name": "corp-developers",
            "match": f"{CORP}/**",
            "actions": ["pull", "push", "delete"],
            "allow": True,
            "groups": ["developers"],
        },
        {
            "name": "corp-readers",
            "match": f"{CORP}/**",
            "actions": ["pull"],
            "allow": True,
            "users": ["bob"],
        },
        {"name": "no-public-push", "match": "**", "actions": ["push", "delete"], "allow": False},
        {
            "name": "hub-official-images",
            "match": "docker.io/library/*",
            "actions": ["pull"],
            "allow": True,
        },
    ],
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- the module's registries and gates -------------------------------------------------------------


@dataclass
class World:
    corp: DistributionRegistry
    hub: DistributionRegistry
    gate: GateProcess
    open_gate: GateProcess
    layout: Layout
    signing_key: ec.EllipticCurvePrivateKey
    seeded: PushedRef  # corp team/seeded:1, which alice and bob may pull
    protected: PushedRef  # corp protected/app:1, which nobody may delete
    hub_alpine: PushedRef  # docker.io library/alpine:3.19, for anonymous pulls
    home: Path  # a private HOME for skopeo

    def corp_client(self) -> RegistryClient:
        return RegistryClient(self.corp.host)

    def hub_has_repository(self, path: str) -> bool:
        """Whether anything at all (an upload session included) reached the hub's storage."""
        return (self.hub.storage / "docker/registry/v2/repositories" / path).exists()

    def audit_records(self) -> list[dict[str, Any]]:
        path = Path(self.gate.config["audit"]["path"])
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def audited(self, event: str, user: str, **fields: str) -> list[dict[str, Any]]:
        """The audit records of ``event`` by ``user`` whose ``fields`` contain the given
        text, waiting a little: the gate writes its audit log in the background."""
        deadline = time.monotonic() + 5
        while True:
            found = [
                r
                for r in self.audit_records()
                if r.get("event") == event
                and (r.get("principal") or {}).get("user") == user
                and all(text in str(r.get(k)) for k, text in fields.items())
            ]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def skopeo_env(self) -> dict[str, str]:
        conf = self.home / "registries.conf"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(
            HOME=str(self.home),
            CONTAINERS_REGISTRIES_CONF=str(conf),
            REGISTRIES_CONFIG_PATH=str(conf),
        )
        return env


def write_htpasswd(path: Path) -> None:
    lines = []
    for user, password in PASSWORDS.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        lines.append(f"{user}:$2y${hashed[4:]}")  # what `htpasswd -B` writes
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    missing = missing_tools()
    if missing:
        skip_or_fail("push tests need: " + ", ".join(missing))
    root = tmp_path_factory.mktemp("push-auth")
    corp = DistributionRegistry(root / "corp", name="push-corp")
    hub = DistributionRegistry(root / "hub", name="push-hub")
    gate: GateProcess | None = None
    open_gate: GateProcess | None = None
    try:
        corp.start()
        hub.start()
        layout = Layout(root / "layout")
        seeded = origin_image(layout, "seeded", "seeded")
        protected = origin_image(layout, "protected", "protected")
        alpine = alpine_index(layout, "hub")
        # Images skopeo and podman push later, built now so the layout is saved once.
        alpine_index(layout, "pushed")
        origin_image(layout, "podman", "podman")
        corp_seed = push(
            layout,
            corp.host,
            [PushSpec(seeded, "team/seeded", "1"), PushSpec(protected, "protected/app", "1")],
        )
        hub_seed = push(layout, hub.host, [PushSpec(alpine, "library/alpine", "3.19")])

        files = root / "auth"
        files.mkdir()
        write_htpasswd(files / "htpasswd")
        signing_key = ec.generate_private_key(ec.SECP256R1())
        (files / "token.pem").write_bytes(
            signing_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        upstream_table = [
            {"registry": HUB, "url": hub.url},
            {"registry": CORP, "url": corp.url},
        ]
        gate = GateProcess(
            root / "gate",
            {
                "upstreams": upstream_table,
                "push_registry": CORP,
                "auth": {
                    "mode": "token",
                    "htpasswd": str(files / "htpasswd"),
                    "signing_key": str(files / "token.pem"),
                    "groups": {"developers": ["alice"]},
                },
                "log_level": "debug",
            },
            policy=POLICY,
            name="push-auth-gate",
        ).start()
        open_gate = GateProcess(
            root / "open-gate",
            {
                "upstreams": upstream_table,
                "push_registry": CORP,
                "policy": {"files": [str(PROJECT_ROOT / "policies" / "enterprise.yaml")]},
            },
            name="push-open-gate",
        ).start()
        home = root / "home"
        home.mkdir()
        (home / "registries.conf").write_text(
            'unqualified-search-registries = []\nshort-name-mode = "enforcing"\n'
        )
        yield World(
            corp,
            hub,
            gate,
            open_gate,
            layout,
            signing_key,
            corp_seed["team/seeded:1"],
            corp_seed["protected/app:1"],
            hub_seed["library/alpine:3.19"],
            home,
        )
    finally:
        for process in (open_gate, gate):
            if process is not None:
                process.stop()
        hub.stop()
        corp.stop()


# -- tokens and plain requests ---------------------------------------------------------------------


def get_token(
    world: World, user: str | None, *scopes: str, password: str | None = None
) -> dict[str, Any]:
    """GET /token with Basic credentials (none for anonymous); the JSON answer."""
    query = urllib.parse.urlencode([("service", SERVICE), *(("scope", s) for s in scopes)])
    headers = {}
    if user is not None:
        headers["Authorization"] = basic(user, password or PASSWORDS[user])
    reply = request(world.gate.url, "GET", f"/token?{query}", headers)
    assert reply.status == 200, reply
    return dict(reply.json())


def bearer(world: World, user: str | None, *scopes: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {get_token(world, user, *scopes)['token']}"}


def repo_scope(name: str, actions: str = "pull") -> str:
    return f"repository:{name}:{actions}"


def gate_get(world: World, path: str, headers: HeaderLines = (), method: str = "GET") -> Reply:
    return request(world.gate.url, method, path, headers)


def challenge(reply: Reply) -> dict[str, str]:
    """The parameters of a ``WWW-Authenticate: Bearer ...`` header."""
    value = reply.header("WWW-Authenticate") or ""
    scheme, _, params = value.partition(" ")
    assert scheme == "Bearer", value
    out: dict[str, str] = {}
    for item in params.split('",'):
        key, _, raw = item.partition("=")
        out[key.strip()] = raw.strip().strip('"')
    return out


def assert_denied(reply: Reply, rule: str) -> None:
    assert reply.status == 403, reply
    assert reply.error_codes == ["DENIED"], reply
    assert any(rule in message for message in reply.error_messages), reply


# -- an upload client on aiohttp -------------------------------------------------------------------


class Uploader:
    """Drives the upload endpoints of the gate for one repository with one token."""

    def __init__(self, session: aiohttp.ClientSession, world: World, name: str, token: str):
        self.session = session
        self.world = world
        self.name = name
        self.headers = {"Authorization": f"Bearer {token}"}

    def url(self, location: str, **query: str) -> str:
        """The gate URL of a ``Location`` (which must be on the gate), query kept."""
        parts = urllib.parse.urlsplit(location)
        if parts.netloc:
            assert parts.netloc == self.world.gate.host, location
        assert parts.path.startswith(f"/v2/{self.name}/"), location
        url = self.world.gate.url + parts.path + (f"?{parts.query}" if parts.query else "")
        if query:
            url += ("&" if parts.query else "?") + urllib.parse.urlencode(query)
        return url

    async def call(
        self,
        method: str,
        url: str,
        data: bytes | AsyncIterator[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        async with self.session.request(
            method, url, data=data, headers={**self.headers, **(headers or {})}
        ) as response:
            body = await response.read()
            return response.status, dict(response.headers), body

    async def start(self, **query: str) -> tuple[int, dict[str, str], bytes]:
        url = f"{self.world.gate.url}/v2/{self.name}/blobs/uploads/"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        return await self.call("POST", url, b"")

    async def start_session(self) -> str:
        status, headers, body = await self.start()
        assert status == 202, (status, body)
        return headers["Location"]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        yield client


def uploader(
    session: aiohttp.ClientSession, world: World, repo: str, user: str = "alice"
) -> Uploader:
    name = f"{CORP}/{repo}"
    token = get_token(world, user, repo_scope(name, "pull,push"))["token"]
    return Uploader(session, world, name, token)


def corp_blob(world: World, repo: str, digest: str) -> bytes:
    return world.corp_client().get_blob(repo, digest)


# -- real clients ----------------------------------------------------------------------------------


def run(
    argv: list[str], env: Mapping[str, str], stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv,
        check=False,
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=CLIENT_TIMEOUT,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_skopeo_copy_with_dest_creds_is_byte_identical_upstream(world: World) -> None:
    """A multi-arch index pushed by skopeo through the gate, pulled straight from corp."""
    ref = "alpine-3.19-pushed"
    run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"--dest-creds=alice:{PASSWORDS['alice']}",
            f"oci:{world.layout.path}:{ref}",
            f"docker://{world.gate.host}/{CORP}/team/skopeo:3.19",
        ],
        world.skopeo_env(),
    )
    client = world.corp_client()
    index = client.get_manifest("team/skopeo", "3.19")
    assert index.digest == world.layout.digest(ref)
    assert index.body == world.layout.read_blob(index.digest)
    children = json.loads(index.body)["manifests"]
    assert len(children) == 2
    for child in children:
        raw = client.get_manifest("team/skopeo", child["digest"]).body
        assert raw == world.layout.read_blob(child["digest"])
        doc = json.loads(raw)
        for blob in [doc["config"], *doc["layers"]]:
            assert client.get_blob("team/skopeo", blob["digest"]) == world.layout.read_blob(
                blob["digest"]
            )
    assert world.audited("push", "alice", name="team/skopeo"), world.audit_records()


def test_skopeo_push_to_docker_hub_is_refused_naming_the_rule(world: World) -> None:
    proc = run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"--dest-creds=alice:{PASSWORDS['alice']}",
            f"oci:{world.layout.path}:seeded-seeded",
            f"docker://{world.gate.host}/{HUB}/library/skopeo-evil:1",
        ],
        world.skopeo_env(),
        check=False,
    )
    assert proc.returncode != 0
    assert "no-public-push" in proc.stderr, proc.stderr[-2000:]
    assert not world.hub_has_repository("library/skopeo-evil")


# -- the upload protocol, by a plain HTTP client ---------------------------------------------------


async def test_chunked_upload(session: aiohttp.ClientSession, world: World) -> None:
    up = uploader(session, world, "team/chunked")
    data = random.Random(1).randbytes(300_000)
    digest, split = sha256(data), 120_000

    status, headers, body = await up.start()
    assert status == 202, body
    location = headers["Location"]
    assert location.startswith(f"/v2/{up.name}/blobs/uploads/"), location

    chunk1 = {**OCTET, "Content-Range": f"0-{split - 1}"}
    status, headers, body = await up.call("PATCH", up.url(location), data[:split], chunk1)
    assert status == 202, body
    assert headers["Range"] == f"0-{split - 1}"
    location = headers["Location"]

    status, _, body = await up.call("PATCH", up.url(location), data[:split], chunk1)
    assert status == 416, body  # the same chunk again

    status, headers, _ = await up.call("GET", up.url(location))
    assert status == 204
    assert headers["Range"] == f"0-{split - 1}"
    location = headers["Location"]
    up.url(location)  # on the gate

    chunk2 = {**OCTET, "Content-Range": f"{split}-{len(data) - 1}"}
    status, headers, body = await up.call("PATCH", up.url(location), data[split:], chunk2)
    assert status == 202, body
    assert headers["Range"] == f"0-{len(data) - 1}"

    status, headers, body = await up.call("PUT", up.url(headers["Location"], digest=digest))
    assert status == 201, body
    assert headers["Location"] == f"/v2/{up.name}/blobs/{digest}"
    assert headers["Docker-Content-Digest"] == digest
    assert corp_blob(world, "team/chunked", digest) == data


async def test_chunk_out_of_order_is_416(session: aiohttp.ClientSession, world: World) -> None:
    up = uploader(session, world, "team/chunked")
    location = await up.start_session()
    headers = {**OCTET, "Content-Range": "100-199"}
    status, _, body = await up.call("PATCH", up.url(location), b"x" * 100, headers)
    assert status == 416, body


async def test_monolithic_post_with_digest(session: aiohttp.ClientSession, world: World) -> None:
    up = uploader(session, world, "team/monolithic")
    data = random.Random(2).randbytes(5000)
    digest = sha256(data)
    url = f"{world.gate.url}/v2/{up.name}/blobs/uploads/?digest={digest}"
    status, headers, body = await up.call("POST", url, data, OCTET)
    assert status in (201, 202), body
    if status == 202:
        # The upstream (Distribution 2.8) does not do it in one request: a new session,
        # on the gate, that the client completes with PUT.
        assert headers["Location"].startswith(f"/v2/{up.name}/blobs/uploads/")
        status, headers, body = await up.call(
            "PUT", up.url(headers["Location"], digest=digest), data, OCTET
        )
        assert status == 201, body
    assert headers["Location"] == f"/v2/{up.name}/blobs/{digest}"
    assert corp_blob(world, "team/monolithic", digest) == data


async def test_streamed_upload(session: aiohttp.ClientSession, world: World) -> None:
    """PATCH without ``Content-Range`` or ``Content-Length``: chunked transfer encoding."""
    up = uploader(session, world, "team/streamed")
    data = random.Random(3).randbytes(1_000_000)
    digest = sha256(data)

    async def pieces() -> AsyncIterator[bytes]:
        for offset in range(0, len(data), 65_536):
            yield data[offset : offset + 65_536]

    location = await up.start_session()
    status, headers, body = await up.call("PATCH", up.url(location), pieces(), OCTET)
    assert status == 202, body
    assert headers["Range"] == f"0-{len(data) - 1}"
    status, headers, body = await up.call("PUT", up.url(headers["Location"], digest=digest))
    assert status == 201, body
    assert corp_blob(world, "team/streamed", digest) == data


async def test_upload_cancel(session: aiohttp.ClientSession, world: World) -> None:
    up = uploader(session, world, "team/cancelled")
    location = await up.start_session()
    status, headers, _ = await up.call("PATCH", up.url(location), b"abandoned", OCTET)
    assert status == 202
    location = headers["Location"]
    status, _, body = await up.call("DELETE", up.url(location))
    assert status == 204, body
    status, _, body = await up.call("GET", up.url(location))
    assert status == 404, body
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"


async def test_cross_repository_mount(session: aiohttp.ClientSession, world: World) -> None:
    source = f"{CORP}/team/seeded"
    layer = world.seeded.manifest.layers[0].digest
    name = f"{CORP}/team/mounted"
    token = get_token(world, "alice", repo_scope(name, "pull,push"), repo_scope(source))["token"]
    up = Uploader(session, world, name, token)
    status, headers, body = await up.start(mount=layer, **{"from": source})
    assert status in (201, 202), body
    if status == 201:
        assert headers["Location"] == f"/v2/{name}/blobs/{layer}"
        assert corp_blob(world, "team/mounted", layer) == world.layout.read_blob(layer)
    else:
        assert headers["Location"].startswith(f"/v2/{name}/blobs/uploads/")


async def test_mount_needs_pull_on_the_source(session: aiohttp.ClientSession, world: World) -> None:
    """A token without pull on ``from`` cannot copy a blob out of it."""
    name = f"{CORP}/team/mounted"
    up = Uploader(
        session, world, name, get_token(world, "alice", repo_scope(name, "pull,push"))["token"]
    )
    layer = world.seeded.manifest.layers[0].digest
    status, headers, _ = await up.start(mount=layer, **{"from": f"{CORP}/team/seeded"})
    assert status == 401
    assert "insufficient_scope" in headers["WWW-Authenticate"]


async def push_image(up: Uploader, seed: int) -> tuple[dict[str, Any], list[bytes]]:
    """Push a config and a layer (monolithic); the manifest document for them."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    layer = random.Random(seed).randbytes(2048)
    for blob in (config, layer):
        location = await up.start_session()
        status, _, body = await up.call("PUT", up.url(location, digest=sha256(blob)), blob, OCTET)
        assert status == 201, body
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": MT_OCI_LAYER_GZIP, "digest": sha256(layer), "size": len(layer)}],
    }
    return manifest, [config, layer]


async def put_manifest(
    up: Uploader, reference: str, raw: bytes
) -> tuple[int, dict[str, str], bytes]:
    url = f"{up.world.gate.url}/v2/{up.name}/manifests/{reference}"
    return await up.call("PUT", url, raw, {"Content-Type": MT_OCI_MANIFEST})


async def test_manifest_put_by_tag_and_digest_keeps_the_bytes(
    session: aiohttp.ClientSession, world: World
) -> None:
    up = uploader(session, world, "team/manifests")
    manifest, _ = await push_image(up, seed=10)
    # Not canonical JSON: indentation, key order and a trailing newline are the client's.
    raw = (json.dumps(manifest, indent=4) + "\n").encode()
    status, headers, body = await put_manifest(up, "v1", raw)
    assert status == 201, body
    assert headers["Docker-Content-Digest"] == sha256(raw)
    assert headers["Location"].startswith(f"/v2/{up.name}/manifests/")
    stored = world.corp_client().get_manifest("team/manifests", "v1")
    assert stored.body == raw and stored.digest == sha256(raw)

    other = dict(manifest, annotations={"by": "digest"})
    raw2 = json.dumps(other, separators=(", ", ": ")).encode()
    status, headers, body = await put_manifest(up, sha256(raw2), raw2)
    assert status == 201, body
    assert headers["Docker-Content-Digest"] == sha256(raw2)
    assert world.corp_client().get_manifest("team/manifests", sha256(raw2)).body == raw2


async def test_delete_forwarded_where_policy_allows(
    session: aiohttp.ClientSession, world: World
) -> None:
    name = f"{CORP}/team/doomed"
    token = get_token(world, "alice", repo_scope(name, "pull,push,delete"))["token"]
    up = Uploader(session, world, name, token)
    manifest, _ = await push_image(up, seed=20)
    raw = json.dumps(manifest).encode()
    assert (await put_manifest(up, "1", raw))[0] == 201
    status, _, body = await up.call("DELETE", f"{world.gate.url}/v2/{name}/manifests/{sha256(raw)}")
    assert status == 202, body
    with pytest.raises(RegistryHTTPError) as info:
        world.corp_client().get_manifest("team/doomed", sha256(raw))
    assert info.value.status == 404
    assert world.audited("delete", "alice", name="team/doomed"), world.audit_records()


def test_delete_refused_where_policy_does_not_allow(world: World) -> None:
    name = f"{CORP}/protected/app"
    auth = bearer(world, "alice", repo_scope(name, "pull,push,delete"))
    reply = gate_get(world, f"/v2/{name}/manifests/{world.protected.digest}", auth, "DELETE")
    assert_denied(reply, "protected-no-delete")
    assert world.corp_client().get_manifest("protected/app", "1").body == world.protected.raw
    assert world.audited("denial", "alice", rule="protected-no-delete", action="delete")


# -- policy decides before anything goes upstream --------------------------------------------------


def test_push_to_docker_hub_refused_before_any_byte_goes_upstream(world: World) -> None:
    name = f"{HUB}/library/evil"
    auth = bearer(world, "alice", repo_scope(name, "pull,push"))
    start = gate_get(world, f"/v2/{name}/blobs/uploads/", auth, "POST")
    assert_denied(start, "no-public-push")
    data = b"never to be seen upstream"
    monolithic = request(
        world.gate.url,
        "POST",
        f"/v2/{name}/blobs/uploads/?digest={sha256(data)}",
        {**auth, **OCTET},
        data,
    )
    assert_denied(monolithic, "no-public-push")
    manifest = request(
        world.gate.url,
        "PUT",
        f"/v2/{name}/manifests/1",
        {**auth, "Content-Type": MT_OCI_MANIFEST},
        world.hub_alpine.raw,
    )
    assert_denied(manifest, "no-public-push")
    assert not world.hub_has_repository("library/evil")
    assert world.audited("denial", "alice", rule="no-public-push", name="library/evil")


def test_shipped_enterprise_policy_refuses_public_pushes(world: World) -> None:
    """``policies/enterprise.yaml`` as shipped, no authentication: 403 naming the rule."""
    gate = world.open_gate
    for name in (f"{HUB}/library/open-evil", "docker.io/someone/else"):
        reply = request(gate.url, "POST", f"/v2/{name}/blobs/uploads/", body=b"")
        assert_denied(reply, "no-public-push")
    assert not world.hub_has_repository("library/open-evil")
    assert not world.hub_has_repository("someone/else")
    allowed = request(gate.url, "POST", f"/v2/{CORP}/team/open/blobs/uploads/", body=b"")
    assert allowed.status == 202, allowed


async def test_short_name_push_goes_to_the_push_registry(
    session: aiohttp.ClientSession, world: World
) -> None:
    name = "team/short"
    token = get_token(world, "alice", repo_scope(name, "pull,push"))["token"]
    up = Uploader(session, world, name, token)
    manifest, blobs = await push_image(up, seed=30)
    raw = json.dumps(manifest).encode()
    status, _, body = await put_manifest(up, "1", raw)
    assert status == 201, body
    assert world.corp_client().get_manifest("team/short", "1").body == raw
    assert corp_blob(world, "team/short", sha256(blobs[1])) == blobs[1]
    assert not world.hub_has_repository("team/short")
    assert not world.hub_has_repository("library/team")


# -- who may do what -------------------------------------------------------------------------------


def test_anonymous_pull_where_policy_allows(world: World) -> None:
    name = f"{HUB}/library/alpine"
    auth = bearer(world, None, repo_scope(name))
    reply = gate_get(world, f"/v2/{name}/manifests/3.19", [*ACCEPT_LINES, *auth.items()])
    assert reply.status == 200, reply
    assert reply.body == world.hub_alpine.raw


def test_anonymous_gets_no_grant_where_policy_refuses(world: World) -> None:
    name = f"{CORP}/team/seeded"
    answer = get_token(world, None, repo_scope(name, "pull,push"))
    claims = jwt.decode(answer["token"], options={"verify_signature": False})
    assert claims["access"] == [] and claims["sub"] == ""
    auth = {"Authorization": f"Bearer {answer['token']}"}
    reply = gate_get(world, f"/v2/{name}/manifests/1", [*ACCEPT_LINES, *auth.items()])
    assert reply.status == 401, reply
    assert challenge(reply)["error"] == "insufficient_scope"
    assert gate_get(world, f"/v2/{name}/blobs/uploads/", auth, "POST").status == 401


@pytest.mark.parametrize(
    ("user", "action", "name", "rule"),
    [
        ("bob", "push", f"{CORP}/team/seeded", "no-public-push"),  # bob only reads corp
        ("bob", "delete", f"{CORP}/team/seeded", "no-public-push"),
        ("alice", "push", f"{HUB}/library/alpine", "no-public-push"),
        ("alice", "delete", f"{CORP}/protected/app", "protected-no-delete"),
        ("bob", "pull", f"{HUB}/someone/else", "default"),
    ],
)
def test_each_principal_refused_what_policy_refuses(
    world: World, user: str, action: str, name: str, rule: str
) -> None:
    answer = get_token(world, user, repo_scope(name, action))
    claims = jwt.decode(answer["token"], options={"verify_signature": False})
    assert claims["access"] == [], claims  # the token endpoint grants nothing of it
    auth = {"Authorization": f"Bearer {answer['token']}"}
    method, path = {
        "push": ("POST", f"/v2/{name}/blobs/uploads/"),
        "delete": ("DELETE", f"/v2/{name}/manifests/{world.seeded.digest}"),
        "pull": ("GET", f"/v2/{name}/manifests/1"),
    }[action]
    reply = gate_get(world, path, auth, method)
    assert reply.status == 403, reply
    assert reply.error_codes == ["DENIED"]
    assert any(rule in m for m in reply.error_messages), reply
    assert world.corp_client().get_manifest("team/seeded", "1").body == world.seeded.raw


def test_bob_pulls_corp(world: World) -> None:
    name = f"{CORP}/team/seeded"
    auth = bearer(world, "bob", repo_scope(name))
    reply = gate_get(world, f"/v2/{name}/manifests/1", [*ACCEPT_LINES, *auth.items()])
    assert reply.status == 200 and reply.body == world.seeded.raw, reply


# -- token security, end to end --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", f"/v2/{CORP}/team/seeded/manifests/1", f"repository:{CORP}/team/seeded:pull"),
        (
            "HEAD",
            f"/v2/{CORP}/team/seeded/blobs/sha256:{'a' * 64}",
            f"repository:{CORP}/team/seeded:pull",
        ),
        ("POST", f"/v2/{CORP}/team/new/blobs/uploads/", f"repository:{CORP}/team/new:pull,push"),
        ("DELETE", f"/v2/{CORP}/team/seeded/manifests/1", f"repository:{CORP}/team/seeded:delete"),
        ("GET", "/v2/library/alpine/tags/list", "repository:library/alpine:pull"),
    ],
)
def test_no_token_is_401_with_the_request_scope(
    world: World, method: str, path: str, scope: str
) -> None:
    reply = gate_get(world, path, method=method)
    assert reply.status == 401, reply
    params = challenge(reply)
    assert params["realm"] == f"{world.gate.url}/token"
    assert params["service"] == SERVICE
    assert params["scope"] == scope


def test_v2_root_challenge_and_login(world: World) -> None:
    reply = gate_get(world, "/v2/")
    assert reply.status == 401
    assert challenge(reply) == {"realm": f"{world.gate.url}/token", "service": SERVICE}
    assert reply.header("Docker-Distribution-API-Version") == "registry/2.0"
    answer = get_token(world, "alice")
    assert answer["token"] == answer["access_token"]
    assert answer["expires_in"] >= 60 and answer["issued_at"].endswith("Z")
    header = jwt.get_unverified_header(answer["token"])
    assert header["alg"] == "ES256" and header.get("kid")
    ok = gate_get(world, "/v2/", {"Authorization": f"Bearer {answer['token']}"})
    assert ok.status == 200, ok


def test_token_for_one_repository_is_refused_on_another(world: World) -> None:
    auth = bearer(world, "alice", repo_scope(f"{CORP}/team/seeded"))
    other = f"{CORP}/protected/app"
    reply = gate_get(world, f"/v2/{other}/manifests/1", [*ACCEPT_LINES, *auth.items()])
    assert reply.status == 401, reply
    params = challenge(reply)
    assert params["error"] == "insufficient_scope"
    assert params["scope"] == f"repository:{other}:pull"
    # The same token does what it grants.
    mine = gate_get(world, f"/v2/{CORP}/team/seeded/manifests/1", [*ACCEPT_LINES, *auth.items()])
    assert mine.status == 200, mine


def test_pull_only_token_cannot_push(world: World) -> None:
    name = f"{CORP}/team/seeded"
    auth = bearer(world, "alice", repo_scope(name))
    reply = gate_get(world, f"/v2/{name}/blobs/uploads/", auth, "POST")
    assert reply.status == 401, reply
    assert challenge(reply)["error"] == "insufficient_scope"
    assert challenge(reply)["scope"] == f"repository:{name}:pull,push"
    put = request(
        world.gate.url,
        "PUT",
        f"/v2/{name}/manifests/2",
        {**auth, "Content-Type": MT_OCI_MANIFEST},
        world.seeded.raw,
    )
    assert put.status == 401, put
    with pytest.raises(RegistryHTTPError):
        world.corp_client().get_manifest("team/seeded", "2")


# Forged tokens: each is the gate's own kind of token with one defect.
TARGET = f"{CORP}/team/seeded"
TARGET_PATH = f"/v2/{TARGET}/manifests/1"


def at(offset: int) -> int:
    """Now plus ``offset`` seconds, as a JWT time claim."""
    return int(time.time()) + offset


def claims(**override: Any) -> dict[str, Any]:
    now = at(0)
    base: dict[str, Any] = {
        "iss": SERVICE,
        "sub": "alice",
        "aud": SERVICE,
        "iat": now,
        "nbf": now - 1,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "groups": ["developers"],
        "access": [{"type": "repository", "name": TARGET, "actions": ["pull"]}],
    }
    base.update(override)
    return {k: v for k, v in base.items() if v is not None}


def kid_of(world: World) -> str:
    return str(jwt.get_unverified_header(get_token(world, "alice")["token"])["kid"])


def sign(world: World, payload: Mapping[str, Any], **headers: Any) -> str:
    return jwt.encode(
        dict(payload),
        world.signing_key,
        algorithm="ES256",
        headers={"kid": kid_of(world), "typ": "JWT", **headers},
    )


def unsigned(header: Mapping[str, Any], payload: Mapping[str, Any]) -> str:
    parts = [json.dumps(dict(header)).encode(), json.dumps(dict(payload)).encode()]
    return ".".join(b64url(p) for p in parts)


def forge_alg_none(world: World) -> str:
    return unsigned({"alg": "none", "typ": "JWT", "kid": kid_of(world)}, claims()) + "."


def forge_hs256_with_public_key(world: World) -> str:
    """Algorithm confusion: HMAC keyed with the gate's public key (PEM)."""
    public = world.signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = unsigned({"alg": "HS256", "typ": "JWT", "kid": kid_of(world)}, claims())
    mac = hmac.new(public, head.encode(), hashlib.sha256).digest()
    return f"{head}.{b64url(mac)}"


def forge_tampered_payload(world: World) -> str:
    """A real token whose claims were widened afterwards (signature kept)."""
    real = get_token(world, "bob", repo_scope(TARGET))["token"]
    head, _, signature = real.split(".")
    widened = claims(
        sub="bob",
        access=[{"type": "repository", "name": TARGET, "actions": ["pull", "push", "delete"]}],
    )
    return f"{head}.{b64url(json.dumps(widened).encode())}.{signature}"


def forge_tampered_signature(world: World) -> str:
    real = get_token(world, "alice", repo_scope(TARGET))["token"]
    head, payload, signature = real.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[10] ^= 0x01
    return f"{head}.{payload}.{b64url(bytes(raw))}"


def forge_other_key(world: World) -> str:
    return jwt.encode(
        claims(),
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": kid_of(world), "typ": "JWT"},
    )


def forge_embedded_jwk(world: World) -> str:
    attacker = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(attacker.public_key()))
    return jwt.encode(
        claims(), attacker, algorithm="ES256", headers={"kid": kid_of(world), "jwk": jwk}
    )


FORGERIES: dict[str, Callable[[World], str]] = {
    "alg-none": forge_alg_none,
    # Both well past the 60 s of clock skew the gate allows.
    "expired": lambda w: sign(w, claims(iat=at(-7200), nbf=at(-7200), exp=at(-3600))),
    "not-yet-valid": lambda w: sign(w, claims(iat=at(3600), nbf=at(3600), exp=at(7200))),
    "no-exp": lambda w: sign(w, claims(exp=None)),
    "wrong-audience": lambda w: sign(w, claims(aud="someone-else")),
    "wrong-issuer": lambda w: sign(w, claims(iss="registry-gate.evil")),
    "tampered-payload": forge_tampered_payload,
    "tampered-signature": forge_tampered_signature,
    "signed-by-another-key": forge_other_key,
    "hs256-with-the-public-key": forge_hs256_with_public_key,
    "embedded-jwk": forge_embedded_jwk,
    "oversized": lambda w: sign(w, claims(padding="x" * 9000)),
    "garbage": lambda w: "not.a.jwt",
}


def test_a_correctly_signed_forgery_works(world: World) -> None:
    """The control for the table below: with no defect, the forging harness gets in."""
    reply = gate_get(
        world, TARGET_PATH, [*ACCEPT_LINES, ("Authorization", f"Bearer {sign(world, claims())}")]
    )
    assert reply.status == 200, reply


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_forged_tokens_are_refused(world: World, case: str) -> None:
    token = FORGERIES[case](world)
    reply = gate_get(world, TARGET_PATH, [*ACCEPT_LINES, ("Authorization", f"Bearer {token}")])
    assert reply.status == 401, reply
    params = challenge(reply)
    assert params["error"] == "invalid_token", params
    assert params["scope"] == f"repository:{TARGET}:pull"
    assert token not in reply.body.decode(errors="replace")


def test_wrong_password_is_401_and_never_echoed_or_logged(world: World) -> None:
    query = urllib.parse.urlencode({"service": SERVICE, "scope": repo_scope(TARGET)})
    replies = [
        request(
            world.gate.url,
            "GET",
            f"/token?{query}",
            {"Authorization": basic("alice", WRONG_PASSWORD)},
        ),
        request(
            world.gate.url,
            "GET",
            f"/token?{query}",
            {"Authorization": basic("nobody", WRONG_PASSWORD)},
        ),
        request(
            world.gate.url,
            "POST",
            "/token",
            {"Content-Type": "application/x-www-form-urlencoded"},
            urllib.parse.urlencode(
                {
                    "grant_type": "password",
                    "username": "alice",
                    "password": WRONG_PASSWORD,
                    "service": SERVICE,
                    "client_id": "t",
                }
            ).encode(),
        ),
    ]
    for reply in replies:
        assert reply.status == 401, reply
        assert WRONG_PASSWORD not in reply.body.decode(errors="replace")
        assert all(WRONG_PASSWORD not in v for v in reply.headers.values())
        assert "token" not in reply.json() and "access_token" not in reply.json()
    # A right login too, so the logs have seen both kinds.
    good = get_token(world, "alice", repo_scope(TARGET))["token"]
    gate_get(world, TARGET_PATH, [*ACCEPT_LINES, ("Authorization", f"Bearer {good}")])
    time.sleep(0.2)  # let the gate flush its log and audit lines
    written = world.gate.log_text() + Path(world.gate.config["audit"]["path"]).read_text()
    for secret in (WRONG_PASSWORD, *PASSWORDS.values(), good):
        assert secret not in written, "a credential reached the gate's log or audit"
    # What the logs hold of a Basic header would be its base64 form.
    assert base64.b64encode(f"alice:{WRONG_PASSWORD}".encode()).decode() not in written


def test_oauth2_password_and_refresh_token_grants(world: World) -> None:
    form = {
        "grant_type": "password",
        "username": "alice",
        "password": PASSWORDS["alice"],
        "service": SERVICE,
        "client_id": "registry-gate-tests",
        "access_type": "offline",
        "scope": repo_scope(TARGET),
    }
    form_headers = {"Content-Type": "application/x-www-form-urlencoded"}
    reply = request(
        world.gate.url, "POST", "/token", form_headers, urllib.parse.urlencode(form).encode()
    )
    assert reply.status == 200, reply
    answer = reply.json()
    assert answer["scope"] == repo_scope(TARGET)
    assert answer["expires_in"] >= 60
    refresh = answer["refresh_token"]
    pulled = gate_get(
        world, TARGET_PATH, [*ACCEPT_LINES, ("Authorization", f"Bearer {answer['access_token']}")]
    )
    assert pulled.status == 200 and pulled.body == world.seeded.raw

    # A refresh token is a login, not an access token.
    as_access = gate_get(
        world, TARGET_PATH, [*ACCEPT_LINES, ("Authorization", f"Bearer {refresh}")]
    )
    assert as_access.status == 401

    again = {
        "grant_type": "refresh_token",
        "refresh_token": refresh,
        "service": SERVICE,
        "client_id": "registry-gate-tests",
        "scope": repo_scope(TARGET),
    }
    reply = request(
        world.gate.url, "POST", "/token", form_headers, urllib.parse.urlencode(again).encode()
    )
    assert reply.status == 200, reply
    fresh = reply.json()["access_token"]
    assert jwt.decode(fresh, options={"verify_signature": False})["sub"] == "alice"
    pulled = gate_get(world, TARGET_PATH, [*ACCEPT_LINES, ("Authorization", f"Bearer {fresh}")])
    assert pulled.status == 200

    for bad in ("garbage", answer["access_token"]):  # an access token is not a refresh token
        refused = request(
            world.gate.url,
            "POST",
            "/token",
            form_headers,
            urllib.parse.urlencode({**again, "refresh_token": bad}).encode(),
        )
        assert refused.status == 401, refused


# -- podman login + push ---------------------------------------------------------------------------


@pytest.fixture
def podman_env(world: World) -> Iterator[tuple[list[str], dict[str, str]]]:
    """podman with private storage, events and registries.conf (no aliases), in a
    private network namespace only."""
    if not in_private_netns():
        skip_or_fail(
            "podman runs only inside a private loopback-only network namespace (tests/run)"
        )
    if shutil.which("podman") is None:
        skip_or_fail("podman is not installed")
    # podman refuses a runroot over 50 characters: a short directory of its own.
    root = Path(tempfile.mkdtemp(prefix="gate-pp-"))
    try:
        home = root / "home"
        conf_dir = home / ".config" / "containers"
        conf_dir.mkdir(parents=True)
        registries = (
            'unqualified-search-registries = []\nshort-name-mode = "enforcing"\n\n'
            f'[[registry]]\nlocation = "{world.gate.host}"\ninsecure = true\n'
        )
        conf = root / "registries.conf"
        conf.write_text(registries)
        (conf_dir / "registries.conf").write_text(registries)  # keeps system drop-ins out
        policy = {"default": [{"type": "insecureAcceptAnything"}]}
        (conf_dir / "policy.json").write_text(json.dumps(policy))
        containers_conf = root / "containers.conf"
        containers_conf.write_text(
            '[engine]\nevents_logger = "file"\ncgroup_manager = "cgroupfs"\n'
        )
        (root / "run").mkdir()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CONTAINERS_", "REGISTRIES_", "XDG_")) and "proxy" not in k.lower()
        }
        env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            XDG_RUNTIME_DIR=str(root / "run"),
            CONTAINERS_CONF=str(containers_conf),
            CONTAINERS_REGISTRIES_CONF=str(conf),
            REGISTRIES_CONFIG_PATH=str(conf),
        )
        argv = [
            "podman",
            "--root",
            str(root / "storage"),
            "--runroot",
            str(root / "rr"),
            "--tmpdir",
            str(root / "tmp"),
            "--storage-driver",
            "vfs",
            "--events-backend",
            "file",
            "--cgroup-manager",
            "cgroupfs",
        ]
        yield argv, env
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.e2e
def test_podman_login_and_push(
    world: World, podman_env: tuple[list[str], dict[str, str]], tmp_path: Path
) -> None:
    podman, env = podman_env
    authfile = tmp_path / "auth.json"
    login = [*podman, "login", "--tls-verify=false", "--authfile", str(authfile)]
    refused = run(
        [*login, "-u", "alice", "--password-stdin", world.gate.host],
        env,
        WRONG_PASSWORD + "\n",
        check=False,
    )
    assert refused.returncode != 0
    assert WRONG_PASSWORD not in refused.stderr + refused.stdout
    run(
        [*login, "-u", "alice", "--password-stdin", world.gate.host], env, PASSWORDS["alice"] + "\n"
    )

    image_id = (
        run([*podman, "pull", "--quiet", f"oci:{world.layout.path}:podman-podman"], env)
        .stdout.strip()
        .splitlines()[-1]
    )
    destination = f"{world.gate.host}/{CORP}/team/podman:1"
    digestfile = tmp_path / "digest"
    run(
        [
            *podman,
            "push",
            "--tls-verify=false",
            "--authfile",
            str(authfile),
            "--digestfile",
            str(digestfile),
            image_id,
            f"docker://{destination}",
        ],
        env,
    )
    pushed = world.corp_client().get_manifest("team/podman", "1")
    assert pushed.digest == digestfile.read_text().strip()
    doc = json.loads(pushed.body)
    config = json.loads(world.corp_client().get_blob("team/podman", doc["config"]["digest"]))
    assert config["config"]["Labels"][ORIGIN_LABEL] == "podman"
    for layer in doc["layers"]:
        world.corp_client().get_blob("team/podman", layer["digest"])  # verifies the digest
    assert world.audited("push", "alice", name="team/podman"), world.audit_records()
    others = [r for r in world.audit_records() if "team/podman" in str(r.get("name"))]
    assert all(r["principal"]["user"] == "alice" for r in others), others
