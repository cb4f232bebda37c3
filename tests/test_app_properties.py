"""Properties of every wire input a client controls, through the in-process application.

Names, references, digests, `Range`, `?ns=`, `n`/`last` (tag-list pagination) and, in
token mode, `Authorization` headers (any scheme, any JWT) and `/token` scopes are drawn at
random and sent to the real aiohttp app (aiohttp's test client) in front of real
Distribution upstreams. Whatever arrives, the answer is a success or a 4xx whose body is
the OCI JSON error document, and nothing is logged with a traceback: never a 500.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import pytest_asyncio
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy.app import build_app
from proxy.errors import RangeInvalid
from proxy.http.ranges import parse_range
from proxy.settings import Settings
from tests.support.gate import policy_document, standard_upstreams
from tests.support.hostile_tokens import presented_tokens
from tests.support.images import MT_OCI_INDEX, MT_OCI_MANIFEST
from tests.support.upstreams import Upstreams

# Modest: the default suite stays fast; every example is one real request.
PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Examples that each start an upstream upload session: fewer.
PROPERTIES_FEW = settings(PROPERTY_SETTINGS, max_examples=60)
ACCEPT = ", ".join([MT_OCI_MANIFEST, MT_OCI_INDEX])
SERVICE = "registry-gate"
PASSWORD = "correct horse"
pytestmark = [
    # The gate keys request storage by strings; the real process shows this warning
    # once, but the suite's `filterwarnings = error` would turn it into a 500 here.
    pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning"),
]

# -- strategies ---------------------------------------------------------------------------

_COMPONENT = st.from_regex(r"[a-z0-9]{1,6}(?:[._-][a-z0-9]{1,4}){0,2}", fullmatch=True)
_WELL_FORMED_NAME = st.lists(_COMPONENT, min_size=1, max_size=4).map("/".join)
_REGISTRY = st.sampled_from(
    [
        "docker.io",
        "quay.io",
        "registry.corp.example",
        "index.docker.io",
        "evil.example",
        "localhost",
        "127.0.0.1:1",
        "169.254.169.254",
        "QUAY.IO",
        "a..b",
        "x:99999",
    ]
)
_NAME = st.one_of(
    _WELL_FORMED_NAME,
    st.tuples(_REGISTRY, _WELL_FORMED_NAME).map("/".join),
    st.sampled_from(["library/busybox", "busybox", "alpine", "team/app", "gate/origin"]),
    st.text(min_size=1, max_size=80),
    st.text(alphabet="aZ09._-/:%@ \\", min_size=1, max_size=300),
)
_HEX = st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=130)
_DIGEST = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex()),
    st.tuples(st.sampled_from(["sha256", "sha512", "md5", "SHA256", "", "sha256+x"]), _HEX).map(
        ":".join
    ),
    st.text(max_size=80),
)
_TAG = st.one_of(
    st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}", fullmatch=True),
    st.sampled_from(["1.36", "latest", "3.19", "t001", "." * 3, "-x", "a" * 129]),
    st.text(min_size=1, max_size=40),
)
_REFERENCE = st.one_of(_TAG, _DIGEST)
_NUMBER = st.one_of(
    st.integers(min_value=-5, max_value=10**25).map(str), st.text(max_size=12), st.just("")
)
# What a client can put in a header: no control characters (aiohttp refuses to send them).
_HEADER_NUMBER = st.one_of(
    st.integers(min_value=-5, max_value=10**25).map(str),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
    st.sampled_from(["", "9" * 5000, " 1", "0x10"]),
)
_RANGE = st.one_of(
    st.tuples(_HEADER_NUMBER, _HEADER_NUMBER).map(lambda p: f"bytes={p[0]}-{p[1]}"),
    st.tuples(
        st.sampled_from(["bytes", "bytes ", "Bytes", "items", ""]), _HEADER_NUMBER, _HEADER_NUMBER
    ).map(lambda p: f"{p[0]}={p[1]}-{p[2]}"),
    st.from_regex(r"bytes=[0-9]{0,3}-[0-9]{0,3}(,[0-9]{0,3}-[0-9]{0,3}){0,3}", fullmatch=True),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
)
_NS = st.one_of(_REGISTRY, st.text(max_size=40))
_HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200)


def path_of(*parts: str) -> str:
    """Percent-encode client text into a path (slashes stay: they are what names carry)."""
    return "/v2/" + "/".join(quote(part, safe="/:@") for part in parts)


def url_of(path: str, query: dict[str, str] | None = None) -> URL:
    return URL(path + ("?" + urlencode(query) if query else ""), encoded=True)


# -- the application ----------------------------------------------------------------------


def base_config(upstreams: Upstreams, tmp_path: Path) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:5000",
        "storage": {"path": str(tmp_path / "storage"), "tag_ttl": 0},
        "upstreams": standard_upstreams(upstreams),
        "policy": {"watch": False},
        "audit": {"path": str(tmp_path / "audit.jsonl")},
    }


@pytest_asyncio.fixture
async def app_client(upstreams: Upstreams, tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    settings_ = Settings.model_validate(base_config(upstreams, tmp_path))
    async with TestClient(TestServer(build_app(settings_))) as client:
        yield client


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest_asyncio.fixture
async def token_client(
    upstreams: Upstreams, tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> AsyncIterator[TestClient[Any, Any]]:
    import bcrypt

    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(
        signing_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "htpasswd").write_text(f"alice:{hashed}\n")
    config = base_config(upstreams, tmp_path)
    # Pushes of short names go here: every scope action then reaches the policy.
    config["push_registry"] = "registry.corp.example"
    config["auth"] = {
        "mode": "token",
        "signing_key": str(key_file),
        "htpasswd": str(tmp_path / "htpasswd"),
        "service": SERVICE,
    }
    settings_ = Settings.model_validate(config)
    async with TestClient(TestServer(build_app(settings_))) as client:
        yield client


@pytest.fixture
def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Records logged with a traceback (live list: cleared per example by `answered`)."""
    caplog.set_level(logging.INFO)
    return caplog.records


async def answered(
    response: ClientResponse, caplog_records: list[logging.LogRecord], method: str = "GET"
) -> int:
    """Check one answer: no 5xx, an OCI JSON error body for a 4xx, no traceback logged."""
    status = response.status
    body = await response.read()
    logged = [r for r in caplog_records if r.exc_info is not None or r.levelno >= logging.ERROR]
    caplog_records.clear()
    assert not logged, [r.getMessage() for r in logged]
    assert status < 500, (status, body[:300])
    if status >= 400 and method != "HEAD":
        document = json.loads(body)
        errors = document["errors"]
        assert isinstance(errors, list) and errors
        assert all(isinstance(e["code"], str) and isinstance(e["message"], str) for e in errors)
    return status


# -- names, references, digests, ns, pagination --------------------------------------------


@PROPERTY_SETTINGS
@given(
    name=_NAME,
    reference=_REFERENCE,
    ns=st.one_of(st.none(), _NS),
    method=st.sampled_from(["GET", "HEAD"]),
)
async def test_any_manifest_request_is_answered_without_a_5xx(
    app_client: TestClient[Any, Any],
    tracebacks: list[logging.LogRecord],
    name: str,
    reference: str,
    ns: str | None,
    method: str,
) -> None:
    url = url_of(path_of(name, "manifests", reference), {"ns": ns} if ns is not None else None)
    async with app_client.request(method, url, headers={"Accept": ACCEPT}) as response:
        await answered(response, tracebacks, method)


@PROPERTY_SETTINGS
@given(name=_NAME, digest=_DIGEST, ns=st.one_of(st.none(), _NS))
async def test_any_blob_request_is_answered_without_a_5xx(
    app_client: TestClient[Any, Any],
    tracebacks: list[logging.LogRecord],
    name: str,
    digest: str,
    ns: str | None,
) -> None:
    url = url_of(path_of(name, "blobs", digest), {"ns": ns} if ns is not None else None)
    async with app_client.get(url) as response:
        await answered(response, tracebacks)


@pytest.fixture
def busybox_layer(upstreams: Upstreams) -> tuple[str, int]:
    """The path of a real blob on the hub (a digest string, not the upstreams object:
    hypothesis prints every argument of a falsifying example)."""
    layer = upstreams.hub["library/busybox:1.36"].manifest.layers[0]
    return path_of("library/busybox", "blobs", layer.digest), layer.size


@PROPERTY_SETTINGS
@given(header=_RANGE)
async def test_any_range_on_a_real_blob_is_a_206_200_or_416(
    app_client: TestClient[Any, Any],
    tracebacks: list[logging.LogRecord],
    busybox_layer: tuple[str, int],
    header: str,
) -> None:
    path, size = busybox_layer
    async with app_client.get(url_of(path), headers={"Range": header}) as response:
        body = await response.read()
        status = await answered(response, tracebacks)
    # Cache miss (the first example) and cache hits answer alike: as parse_range reads it.
    try:
        selected = parse_range(header, size)
    except RangeInvalid:
        assert status == 416
        return
    if selected is None:
        assert (status, len(body)) == (200, size)
    else:
        assert (status, len(body)) == (206, selected[1] - selected[0] + 1)


@PROPERTY_SETTINGS
@given(
    name=st.one_of(st.just("library/alpine"), _NAME),
    n=st.one_of(st.none(), _NUMBER),
    last=st.one_of(st.none(), st.text(max_size=40)),
    ns=st.one_of(st.none(), _NS),
)
async def test_any_tag_list_request_is_answered_without_a_5xx(
    app_client: TestClient[Any, Any],
    tracebacks: list[logging.LogRecord],
    name: str,
    n: str | None,
    last: str | None,
    ns: str | None,
) -> None:
    query = {k: v for k, v in (("n", n), ("last", last), ("ns", ns)) if v is not None}
    async with app_client.get(url_of(path_of(name, "tags/list"), query)) as response:
        status = await answered(response, tracebacks)
        link = response.headers.get("Link")
    if status == 200 and link is not None:
        # The Link the gate wrote is itself a request it answers.
        target = link.split(";", 1)[0].strip("<> ")
        async with app_client.get(URL(target, encoded=True)) as following:
            assert await answered(following, tracebacks) == 200


@pytest_asyncio.fixture
async def push_client(upstreams: Upstreams, tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    """A gate whose policy lets anyone push (so upload requests reach their parsers)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps(policy_document(["docker.io"], default="allow")))
    config = base_config(upstreams, tmp_path)
    config["policy"]["files"] = [str(policy)]
    async with TestClient(TestServer(build_app(Settings.model_validate(config)))) as client:
        yield client


@PROPERTIES_FEW
@given(
    content_range=st.one_of(_HEADER_NUMBER, st.tuples(_HEADER_NUMBER, _HEADER_NUMBER).map("-".join))
)
async def test_any_chunk_content_range_is_answered_without_a_5xx(
    push_client: TestClient[Any, Any], tracebacks: list[logging.LogRecord], content_range: str
) -> None:
    start = url_of(path_of("registry.corp.example/props/chunks", "blobs/uploads/"))
    async with push_client.post(start) as response:
        assert await answered(response, tracebacks) == 202
        location = response.headers["Location"]
    headers = {"Content-Range": content_range, "Content-Type": "application/octet-stream"}
    async with push_client.patch(
        URL(location, encoded=True), data=b"x", headers=headers
    ) as response:
        await answered(response, tracebacks)
    async with push_client.delete(URL(location, encoded=True)) as response:
        await answered(response, tracebacks)


# -- token mode: Authorization headers, JWTs, scopes -----------------------------------------

_AUTHORIZATION = st.one_of(
    presented_tokens(["registry-gate"], SERVICE).map(lambda t: f"Bearer {t}"),
    st.tuples(st.sampled_from(["Bearer", "bearer", "Basic", "Digest", ""]), _HEADER_TEXT).map(
        " ".join
    ),
    st.binary(max_size=60).map(lambda b: "Basic " + base64.b64encode(b).decode()),
)


@PROPERTY_SETTINGS
@given(authorization=_AUTHORIZATION, name=_NAME, method=st.sampled_from(["GET", "HEAD", "DELETE"]))
async def test_any_presented_credential_on_v2_is_a_401_or_better(
    token_client: TestClient[Any, Any],
    tracebacks: list[logging.LogRecord],
    authorization: str,
    name: str,
    method: str,
) -> None:
    url = url_of(path_of(name, "manifests", "latest"))
    headers = {"Authorization": authorization, "Accept": ACCEPT}
    async with token_client.request(method, url, headers=headers) as response:
        await answered(response, tracebacks, method)


@PROPERTY_SETTINGS
@given(authorization=_AUTHORIZATION)
async def test_any_credential_at_the_token_endpoint_is_a_401_or_a_token(
    token_client: TestClient[Any, Any], tracebacks: list[logging.LogRecord], authorization: str
) -> None:
    query = {"service": SERVICE, "scope": "repository:library/busybox:pull"}
    headers = {"Authorization": authorization}
    async with token_client.get(url_of("/token", query), headers=headers) as response:
        assert await answered(response, tracebacks) in (200, 401, 429)


@PROPERTY_SETTINGS
@given(token=presented_tokens(["registry-gate"], SERVICE))
async def test_any_refresh_token_is_a_401_or_a_token(
    token_client: TestClient[Any, Any], tracebacks: list[logging.LogRecord], token: str
) -> None:
    form = {"grant_type": "refresh_token", "refresh_token": token, "service": SERVICE}
    async with token_client.post("/token", data=form) as response:
        assert await answered(response, tracebacks) in (401, 429)


_KNOWN_ACTIONS = st.lists(st.sampled_from(["pull", "push", "delete"]), max_size=3).map(",".join)
_ANY_ACTIONS = st.lists(
    st.one_of(st.sampled_from(["pull", "push", "delete", "*", "foo", ""]), st.text(max_size=6)),
    max_size=3,
).map(",".join)


def scope_strategy(actions: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    scope = st.tuples(
        st.sampled_from(["repository", "registry", "repository(plugin)", "", "x"]),
        st.one_of(_NAME, st.just("library/busybox")),
        actions,
    ).map(":".join)
    return st.one_of(
        scope,
        st.lists(scope, min_size=1, max_size=3).map(" ".join),
        st.text(max_size=60),
    )


async def scope_request(
    client: TestClient[Any, Any], records: list[logging.LogRecord], scope: str, login: bool
) -> None:
    headers = {}
    if login:
        headers["Authorization"] = (
            "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        )
    query = {"service": SERVICE, "scope": scope}
    async with client.get(url_of("/token", query), headers=headers) as response:
        assert await answered(response, records) == 200
    form = {"grant_type": "password", "username": "alice", "password": PASSWORD, "scope": scope}
    async with client.post("/token", data=form) as response:
        assert await answered(response, records) == 200


@PROPERTY_SETTINGS
@given(scope=scope_strategy(_KNOWN_ACTIONS), login=st.booleans())
async def test_any_scope_with_known_actions_gets_a_token(
    token_client: TestClient[Any, Any],
    tracebacks: list[logging.LogRecord],
    scope: str,
    login: bool,
) -> None:
    await scope_request(token_client, tracebacks, scope, login)


@PROPERTY_SETTINGS
@given(scope=scope_strategy(_ANY_ACTIONS), login=st.booleans())
async def test_any_scope_gets_a_token(
    token_client: TestClient[Any, Any],
    tracebacks: list[logging.LogRecord],
    scope: str,
    login: bool,
) -> None:
    await scope_request(token_client, tracebacks, scope, login)
