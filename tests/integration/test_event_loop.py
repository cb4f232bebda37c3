"""`event_loop: uvloop` (issue 13): the same answers as on asyncio's loop.

Under uvloop aiohttp cannot use sendfile for cached blobs and copies them through Python
instead; these tests pull through a gate on each loop and check every byte (manifests,
cold and warm blobs, a range of a cached blob), and that the gate runs on the loop its
settings name. No figure is asserted (bench/perf.py measures them).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.support.gate import GateFactory, standard_upstreams
from tests.support.registry_client import MANIFEST_ACCEPT
from tests.support.upstreams import Upstreams
from tests.support.wire import request

ACCEPT = [("Accept", mt) for mt in MANIFEST_ACCEPT]


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_a_pull_on_each_event_loop_gets_every_byte_right(
    gate_factory: GateFactory, upstreams: Upstreams, event_loop: str
) -> None:
    gate = gate_factory(
        {"upstreams": standard_upstreams(upstreams), "event_loop": event_loop},
        name=f"loop-{event_loop}",
    )
    started = [json.loads(x) for x in gate.log_path.read_text().splitlines() if "listening" in x]
    assert started and started[-1]["event_loop"] == event_loop

    pushed = upstreams.hub["library/alpine:3.19"]
    child = pushed.manifest.child("amd64")
    base = "/v2/docker.io/library/alpine"
    tagged = request(gate.url, "GET", f"{base}/manifests/3.19", ACCEPT)
    assert tagged.status == 200 and tagged.body == pushed.raw
    bodies = {}
    for blob in child.blobs:
        for attempt in ("cold", "warm"):
            reply = request(gate.url, "GET", f"{base}/blobs/{blob.digest}")
            assert reply.status == 200, (attempt, reply)
            assert "sha256:" + hashlib.sha256(reply.body).hexdigest() == blob.digest, attempt
            bodies[blob.digest] = reply.body
    layer = child.layers[0]
    ranged = request(gate.url, "GET", f"{base}/blobs/{layer.digest}", [("Range", "bytes=3-40")])
    assert ranged.status == 206 and ranged.body == bodies[layer.digest][3:41]
