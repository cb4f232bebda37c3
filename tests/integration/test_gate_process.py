"""The ``GateProcess`` test helper itself: start, restart, crash, bad configuration.

Every gate-level test relies on these behaving (a restart keeps the port, a SIGKILL
really kills, a configuration error surfaces with the gate's own message), so they are
pinned down here, without any real upstream.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.support.gate import GateFactory, GateProcess, GateStartError, standard_upstreams
from tests.support.registries import free_port
from tests.support.upstreams import Upstreams
from tests.support.wire import request

NOWHERE = {"upstreams": [{"registry": "docker.io", "url": f"http://127.0.0.1:{free_port()}"}]}


def test_restart_and_kill9_keep_the_port(gate_factory: GateFactory) -> None:
    gate = gate_factory(NOWHERE)
    port, pid = gate.port, gate.pid
    assert gate.url == f"http://127.0.0.1:{port}" and gate.host == f"127.0.0.1:{port}"
    assert request(gate.url, "GET", "/v2/").status == 200

    gate.restart()
    assert gate.running and gate.port == port and gate.pid != pid
    assert request(gate.url, "GET", "/v2/").status == 200

    assert gate.kill9() == -9
    assert not gate.running
    with pytest.raises(OSError):
        request(gate.url, "GET", "/v2/", timeout=2)
    gate.start()
    assert gate.port == port
    assert request(gate.url, "GET", "/v2/").status == 200
    assert gate.stop() is not None
    assert not gate.running


def test_bad_configuration_fails_with_the_gates_message(tmp_path: Path) -> None:
    gate = GateProcess(tmp_path, {"upstreams": [{"registry": "docker.io", "url": "ftp://x"}]})
    with pytest.raises(GateStartError) as excinfo:
        gate.start()
    assert gate.returncode == 2
    assert "upstreams.0.url" in str(excinfo.value)
    assert "upstreams.0.url" in gate.log_text()


def test_a_client_dripping_its_headers_is_cut_off(
    gate_factory: GateFactory, upstreams: Upstreams
) -> None:
    """security.md 14: a client that never finishes its headers is disconnected at
    `idle_timeout`, instead of holding a connection for as long as it drips."""
    gate = gate_factory({"upstreams": standard_upstreams(upstreams), "idle_timeout": 1})
    with socket.create_connection(("127.0.0.1", gate.port), timeout=5) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: gate\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 20:
            try:
                sock.sendall(b"X-Drip: 1\r\n")
                sock.settimeout(0.5)
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
    assert closed, "the gate kept a dripping connection open for 20 s"


def test_metrics_on_a_separate_listen_address(
    gate_factory: GateFactory, upstreams: Upstreams
) -> None:
    metrics_port = free_port()
    gate = gate_factory(
        {
            "upstreams": standard_upstreams(upstreams),
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        }
    )
    assert request(gate.url, "GET", "/v2/").status == 200
    scraped = request(f"http://127.0.0.1:{metrics_port}", "GET", "/metrics")
    assert scraped.status == 200
    assert b'registry_gate_requests_total{method="GET",route="v2",status="200"}' in scraped.body
    # The registry port no longer answers /metrics (operators can firewall the other one).
    assert request(gate.url, "GET", "/metrics").status == 404


def test_oversized_headers_are_refused_and_the_gate_keeps_serving(
    gate_factory: GateFactory, upstreams: Upstreams
) -> None:
    """security.md 14: a header line past the gate's limit is refused (400/431) before any
    handler runs, and the next request is served."""
    gate = gate_factory({"upstreams": standard_upstreams(upstreams)})
    reply = request(gate.url, "GET", "/v2/", [("X-Huge", "a" * 64 * 1024)])
    assert reply.status in (400, 431), reply
    assert request(gate.url, "GET", "/v2/").status == 200


def test_a_huge_page_size_is_clamped(gate_factory: GateFactory, upstreams: Upstreams) -> None:
    """security.md 14: `?n=1000000000` on a tag list is clamped, not allocated."""
    gate = gate_factory({"upstreams": standard_upstreams(upstreams)})
    path = "/v2/docker.io/gate/many/tags/list?n=1000000000"
    reply = request(gate.url, "GET", path)
    assert reply.status == 200, reply
    tags = reply.json()["tags"]
    assert tags == sorted(upstreams.hub.images.tags("gate/many"))
