"""The gate's edge, through the real process: what every request gets before and around
the handlers (issue 11: request ids, refused writes in the audit log, parser errors that
must not echo credentials, body deadlines, draining on SIGTERM).

The gates here front an upstream that does not listen: everything tested is decided at
the edge, before (or instead of) anything reaching an upstream.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.fault_proxy import FaultProxy
from tests.support.gate import GateProcess
from tests.support.registries import free_port
from tests.support.wire import Reply, request

CORP = "registry.corp.example"
# Nothing listens there: a request that reaches this upstream fails with 502.
UPSTREAMS = [{"registry": CORP, "url": f"http://127.0.0.1:{free_port()}"}]
ALLOW_ALL = {"search": [CORP], "default": "allow", "rules": []}
USER, PASSWORD = "alice", "correct-horse-battery-staple"
DIGEST = "sha256:" + "a" * 64
BODY_TIMEOUT = 2


def audit_records(gate: GateProcess) -> list[dict[str, Any]]:
    path = Path(gate.config["audit"]["path"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_record(
    gate: GateProcess, accept: Callable[[dict[str, Any]], bool], seconds: float = 10.0
) -> dict[str, Any]:
    """The first audit record ``accept`` takes (the gate writes its log in the background)."""
    deadline = time.monotonic() + seconds
    while True:
        found = [r for r in audit_records(gate) if accept(r)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no such audit record in {audit_records(gate)}"
        time.sleep(0.05)


def records_of(gate: GateProcess, reply: Reply) -> Callable[[dict[str, Any]], bool]:
    request_id = reply.header("X-Request-Id")
    assert request_id, reply
    return lambda record: record.get("request_id") == request_id


@pytest.fixture(scope="module")
def auth_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    files = tmp_path_factory.mktemp("edge-auth")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    (files / "htpasswd").write_text(f"{USER}:{hashed}\n")
    key = ec.generate_private_key(ec.SECP256R1())
    (files / "token.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@pytest.fixture(scope="module")
def token_gate(tmp_path_factory: pytest.TempPathFactory, auth_files: Path) -> Iterator[GateProcess]:
    gate = GateProcess(
        tmp_path_factory.mktemp("edge-token-gate"),
        {
            "upstreams": UPSTREAMS,
            "push_registry": CORP,
            "request_body_timeout": BODY_TIMEOUT,
            "auth": {
                "mode": "token",
                "htpasswd": str(auth_files / "htpasswd"),
                "signing_key": str(auth_files / "token.pem"),
            },
        },
        policy=ALLOW_ALL,
        name="edge-token-gate",
    )
    with gate:
        yield gate


@pytest.fixture(scope="module")
def open_gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GateProcess]:
    gate = GateProcess(
        tmp_path_factory.mktemp("edge-open-gate"),
        {"upstreams": UPSTREAMS, "push_registry": CORP, "request_body_timeout": BODY_TIMEOUT},
        policy=ALLOW_ALL,
        name="edge-open-gate",
    )
    with gate:
        yield gate


# -- #11: the gate chooses its request ids ------------------------------------------------------


def test_the_gate_chooses_the_request_id_and_keeps_a_valid_client_id_beside_it(
    token_gate: GateProcess,
) -> None:
    chosen = "client-chosen:id.42"
    reply = request(
        token_gate.url, "PUT", f"/v2/{CORP}/team/app/manifests/1", {"X-Request-Id": chosen}
    )
    assert reply.status == 401, reply
    ours = reply.header("X-Request-Id")
    assert ours and ours != chosen
    record = wait_for_record(token_gate, records_of(token_gate, reply))
    assert record["request_id"] == ours
    assert record["extra"]["client_request_id"] == chosen
    assert chosen not in {r["request_id"] for r in audit_records(token_gate)}


@pytest.mark.parametrize("invalid", ["x" * 129, "two words", 'quote"d', "semi;colon", "ü"])
def test_an_invalid_client_request_id_is_dropped(token_gate: GateProcess, invalid: str) -> None:
    header = invalid.encode().decode("latin-1")  # http.client sends latin-1
    reply = request(
        token_gate.url,
        "DELETE",
        f"/v2/{CORP}/team/app/manifests/{DIGEST}",
        {"X-Request-Id": header},
    )
    assert reply.status == 401, reply
    assert reply.header("X-Request-Id") != header
    record = wait_for_record(token_gate, records_of(token_gate, reply))
    assert "client_request_id" not in record.get("extra", {})


# -- #6: every refused write is audited ------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "action"),
    [
        ("PUT", f"/v2/{CORP}/team/app/manifests/1", "push"),
        ("POST", f"/v2/{CORP}/team/app/blobs/uploads/", "push"),
        ("PATCH", f"/v2/{CORP}/team/app/blobs/uploads/some-session", "push"),
        ("PUT", f"/v2/{CORP}/team/app/blobs/uploads/some-session?digest={DIGEST}", "push"),
        ("DELETE", f"/v2/{CORP}/team/app/blobs/uploads/some-session", "push"),
        ("DELETE", f"/v2/{CORP}/team/app/manifests/{DIGEST}", "delete"),
        ("DELETE", f"/v2/{CORP}/team/app/blobs/{DIGEST}", "delete"),
        ("POST", "/v2/team/short/blobs/uploads/", "push"),
    ],
)
def test_anonymous_writes_refused_for_want_of_a_token_are_audited(
    token_gate: GateProcess, method: str, path: str, action: str
) -> None:
    reply = request(token_gate.url, method, path, body=b"" if method != "DELETE" else None)
    assert reply.status == 401, reply
    record = wait_for_record(token_gate, records_of(token_gate, reply))
    assert record["event"] == "write_refused"
    assert (record["action"], record["decision"], record["status"]) == (action, "deny", 401)
    assert record["principal"] == {"user": None, "groups": []}
    assert record["client"] == "127.0.0.1"
    assert record["extra"]["method"] == method
    assert record["reason"].startswith("UNAUTHORIZED")


def test_a_write_refused_to_a_logged_in_user_names_the_user(token_gate: GateProcess) -> None:
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    token = request(
        token_gate.url,
        "GET",
        f"/token?service=registry-gate&scope=repository:{CORP}/team/app:pull",
        {"Authorization": f"Basic {basic}"},
    ).json()["token"]
    reply = request(
        token_gate.url,
        "PUT",
        f"/v2/{CORP}/team/app/manifests/1",
        {"Authorization": f"Bearer {token}"},
        body=b"{}",
    )
    assert reply.status == 401, reply  # a pull token does not grant push
    record = wait_for_record(token_gate, records_of(token_gate, reply))
    assert record["event"] == "write_refused" and record["principal"]["user"] == USER


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("PUT", f"/v2/{CORP}/Team/App/manifests/1", 400),  # invalid name
        ("PUT", f"/v2/{CORP}/team/app/manifests/bad:tag!", 400),  # invalid reference
        ("POST", "/v2/unknown.example/team/app/blobs/uploads/", 404),  # unknown registry
        ("PATCH", f"/v2/{CORP}/team/app/blobs/uploads/not-a-session", 404),  # unknown upload
        ("POST", f"/v2/{CORP}/team/app/blobs/uploads/", 502),  # the upstream is down
        ("PUT", f"/v2/{CORP}/team/app/tags/list", 405),  # not a write endpoint
        ("DELETE", "/v2/", 405),
    ],
)
def test_writes_refused_for_any_other_reason_are_audited(
    open_gate: GateProcess, method: str, path: str, status: int
) -> None:
    reply = request(open_gate.url, method, path, body=b"" if method != "DELETE" else None)
    assert reply.status == status, reply
    assert reply.error_codes, reply
    record = wait_for_record(open_gate, records_of(open_gate, reply))
    assert (record["event"], record["decision"], record["status"]) == (
        "write_refused",
        "deny",
        status,
    )
    assert record["reason"].split(":")[0] == reply.error_codes[0]


def test_a_policy_denial_is_audited_once(tmp_path: Path) -> None:
    policy = {
        "search": [CORP],
        "default": "allow",
        "rules": [{"name": "no-pushes", "match": "**", "actions": ["push"], "allow": False}],
    }
    with GateProcess(tmp_path, {"upstreams": UPSTREAMS}, policy=policy) as gate:
        reply = request(gate.url, "POST", f"/v2/{CORP}/team/app/blobs/uploads/", body=b"")
        assert reply.status == 403, reply
        # Records are written in order: once a later request's record is there, any second
        # record of the first request would be too.
        later = request(gate.url, "DELETE", "/v2/")
        wait_for_record(gate, records_of(gate, later))
        records = [r for r in audit_records(gate) if records_of(gate, reply)(r)]
    assert [r["event"] for r in records] == ["denial"], records


# -- #8: requests the HTTP parser refuses echo nothing ---------------------------------------

SECRET_USER, SECRET_PASSWORD = "parser-victim", "Pa55-w0rd-nobody-may-read"
SECRET_BASIC = base64.b64encode(f"{SECRET_USER}:{SECRET_PASSWORD}".encode()).decode()
# An Authorization header longer than the gate's 16 KiB field limit, credential first.
HUGE_BASIC = base64.b64encode(f"{SECRET_USER}:{SECRET_PASSWORD}{'z' * 20000}".encode()).decode()


def exchange(gate: GateProcess, data: bytes) -> bytes:
    """Send raw bytes, read the answer until the gate closes the connection."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", gate.port), timeout=15) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


MALFORMED = {
    "oversized authorization": (
        f"GET /v2/ HTTP/1.1\r\nHost: gate\r\nAuthorization: Basic {HUGE_BASIC}\r\n\r\n"
    ),
    "oversized request line": (
        f"GET /v2/{'a' * 20000}?auth={SECRET_BASIC} HTTP/1.1\r\nHost: gate\r\n\r\n"
    ),
    "header line without a colon": (
        f"GET /v2/ HTTP/1.1\r\nHost: gate\r\nAuthorization Basic {SECRET_BASIC}\r\n\r\n"
    ),
    "invalid header name": (
        f"GET /v2/ HTTP/1.1\r\nHost: gate\r\nAuth{{}}: Basic {SECRET_BASIC}\r\n\r\n"
    ),
    "content-length and chunked": (
        "POST /token HTTP/1.1\r\nHost: gate\r\nContent-Length: 4\r\n"
        f"Transfer-Encoding: chunked\r\nAuthorization: Basic {SECRET_BASIC}\r\n\r\n"
        "0\r\n\r\n"
    ),
    "two content lengths": (
        "POST /token HTTP/1.1\r\nHost: gate\r\nContent-Length: 4\r\nContent-Length: 5\r\n"
        f"Authorization: Basic {SECRET_BASIC}\r\n\r\nabcd"
    ),
    "bad chunk size": (
        "POST /token HTTP/1.1\r\nHost: gate\r\nTransfer-Encoding: chunked\r\n"
        f"Authorization: Basic {SECRET_BASIC}\r\n\r\nzz{SECRET_BASIC}\r\n"
    ),
    "bad method": f"G{SECRET_BASIC}T / HTTP/1.1\r\nHost: gate\r\n\r\n",
    "too many headers": (
        "GET /v2/ HTTP/1.1\r\nHost: gate\r\n"
        + "".join(f"X-H{i}: {SECRET_BASIC}\r\n" for i in range(200))
        + "\r\n"
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_parser_errors_are_oci_json_and_echo_no_credential(
    open_gate: GateProcess, case: str
) -> None:
    log_before = len(open_gate.log_text())
    raw = exchange(open_gate, MALFORMED[case].encode("latin-1"))
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert status in (400, 431), raw[:500]
    errors = json.loads(body)["errors"]
    assert errors and errors[0]["code"] and errors[0]["message"], body
    log = open_gate.log_text()[log_before:]
    secrets = (SECRET_USER, SECRET_PASSWORD, SECRET_BASIC[:12], HUGE_BASIC[:12], "zzzz")
    for secret in secrets:
        assert secret.encode() not in raw, (secret, raw[:500])
        assert secret not in log, (secret, log[-2000:])
    # Still serving.
    assert request(open_gate.url, "GET", "/v2/").status == 200


# -- #7: bodies the gate reads itself have a cap and a deadline -------------------------------


def drip(gate: GateProcess, head: str, give_up_after: float = 60.0) -> bytes:
    """Send ``head``, then one body byte every half second until the gate answers and
    closes; what it answered (the test fails if it is still reading after 60 s)."""
    received: list[bytes] = []
    with socket.create_connection(("127.0.0.1", gate.port), timeout=5) as sock:
        sock.sendall(head.encode())
        started = time.monotonic()
        while time.monotonic() - started < give_up_after:
            try:
                sock.sendall(b"a")
            except OSError:
                break  # closed while we were still sending
            sock.settimeout(0.5)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            received.append(chunk)
        else:
            pytest.fail(f"the gate kept reading a dripped body for {give_up_after:.0f} s")
    return b"".join(received)


DRIPPED = {
    "token form": "POST /token HTTP/1.1\r\nHost: gate\r\n"
    "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 10000\r\n\r\n",
    "token form, chunked": "POST /token HTTP/1.1\r\nHost: gate\r\n"
    "Transfer-Encoding: chunked\r\n\r\n10000\r\n",
    "manifest": f"PUT /v2/{CORP}/team/app/manifests/1 HTTP/1.1\r\nHost: gate\r\n"
    "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n"
    "Content-Length: 10000\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(DRIPPED))
def test_a_dripped_body_is_cut_off_with_408(
    token_gate: GateProcess, open_gate: GateProcess, case: str
) -> None:
    gate = open_gate if case == "manifest" else token_gate
    answer = drip(gate, DRIPPED[case])
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"408", answer[:300]
    assert json.loads(body)["errors"][0]["code"] == "SIZE_INVALID"
    assert b"Connection: close" in head


def test_a_token_form_over_the_cap_is_refused_even_when_chunked(token_gate: GateProcess) -> None:
    form = b"grant_type=password&username=alice&password=" + b"x" * 100_000
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(form[i : i + 4096]), form[i : i + 4096])
        for i in range(0, len(form), 4096)
    )
    data = (
        b"POST /token HTTP/1.1\r\nHost: gate\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n" + chunks + b"0\r\n\r\n"
    )
    answer = exchange(token_gate, data)
    assert answer.split()[1] == b"413", answer[:300]


# -- #19: SIGTERM drains within shutdown_timeout ----------------------------------------------

SHUTDOWN_TIMEOUT = 6


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {seconds:.0f} s"
        time.sleep(0.05)


def ready_status(gate: GateProcess) -> int:
    return request(gate.url, "GET", "/readyz", timeout=5).status


@pytest.fixture
def hanging_gate(tmp_path: Path) -> Iterator[tuple[GateProcess, FaultProxy]]:
    """A gate whose upstream holds every request until released."""
    with FaultProxy(f"http://127.0.0.1:{free_port()}", name="hanging-upstream") as proxy:
        proxy.set_fault("hang", timeout=120)
        gate = GateProcess(
            tmp_path / "gate",
            {
                "upstreams": [{"registry": CORP, "url": proxy.url}],
                "shutdown_timeout": SHUTDOWN_TIMEOUT,
            },
            policy=ALLOW_ALL,
        )
        with gate:
            yield gate, proxy


def start_in_flight(gate: GateProcess, proxy: FaultProxy) -> Future[Reply]:
    """A manifest pull the hanging upstream holds, once it is held there."""
    pool = ThreadPoolExecutor(max_workers=1)
    held = pool.submit(request, gate.url, "GET", f"/v2/{CORP}/team/app/manifests/1", (), None, 60)
    pool.shutdown(wait=False)
    wait_until(lambda: proxy.count(kind="manifest") >= 1, 15, "held upstream")
    return held


def test_sigterm_refuses_new_requests_with_503_and_finishes_those_in_flight(
    hanging_gate: tuple[GateProcess, FaultProxy],
) -> None:
    gate, proxy = hanging_gate
    in_flight = start_in_flight(gate, proxy)
    assert ready_status(gate) == 200
    os.kill(gate.pid or 0, signal.SIGTERM)
    wait_until(lambda: ready_status(gate) == 503, 5, "unready after SIGTERM")
    refused = request(gate.url, "GET", "/v2/")
    assert refused.status == 503 and refused.error_codes == ["UNAVAILABLE"], refused
    assert (refused.header("Connection") or "").lower() == "close"
    assert request(gate.url, "GET", "/healthz").status == 200
    assert gate.running and not in_flight.done()
    proxy.release()
    # The in-flight request gets its answer (the upstream behind the proxy is down: 502).
    assert in_flight.result(timeout=30).status == 502
    wait_until(lambda: not gate.running, SHUTDOWN_TIMEOUT + 10, "exited")
    assert gate.returncode == 0


def test_the_drain_ends_at_shutdown_timeout(
    hanging_gate: tuple[GateProcess, FaultProxy],
) -> None:
    gate, proxy = hanging_gate
    in_flight = start_in_flight(gate, proxy)
    os.kill(gate.pid or 0, signal.SIGTERM)
    # Generous slack for a loaded machine; without the bound the gate waits for the
    # upstream (120 s here), then aiohttp's own 60 s twice.
    wait_until(lambda: not gate.running, SHUTDOWN_TIMEOUT + 10, "exited")
    with pytest.raises(OSError):
        in_flight.result(timeout=30)
    assert "cutting off 1 requests still in flight" in gate.log_text()
