"""The README's "Running several replicas" recipe, run as an operator would run it.

The configuration of the first replica is the README's own `gate-a.yaml` block, and the
other two are made from it by the README's own `sed` lines; only what must differ on a
test machine is replaced (ports, folders, the S3 endpoint and keys, the Redis port, and
docker.io's URL, which points at a local Distribution registry behind a counting proxy).
Three real gate processes then serve one image through any of them with one upstream
fetch of each blob in all, resolve a short name to the same image on every replica, and
`registry-gate audit verify` checks every replica's chain.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_cache import (
    fetch,
    push_image,
    skopeo_copy,
)
from tests.support.engines import S3_ACCESS_KEY, S3_SECRET_KEY, RedisServer, SeaweedS3
from tests.support.fault_proxy import FaultProxy, LoopThread
from tests.support.gate import GateProcess
from tests.support.registries import DistributionRegistry, free_port
from tests.support.registry_client import RegistryClient
from tests.support.replicas import ensure_bucket

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
MANIFEST_ACCEPT = "application/vnd.oci.image.manifest.v1+json"


def recipe_section() -> str:
    text = README.read_text()
    start = text.index("### Running several replicas")
    return text[start : text.index("\n### ", start + 1)]


def first_block_after(section: str, marker: str, language: str) -> str:
    """The first fenced ``language`` block after the line containing ``marker``."""
    rest = section[section.index(marker) :]
    match = re.search(rf"```{language}\n(.*?)```", rest, re.DOTALL)
    assert match, f"no ```{language} block after {marker!r} in the README"
    return match.group(1)


def apply_sed(expression: str, text: str) -> str:
    """The README's `sed` expressions: `s/old/new/[g]` commands joined by `;`."""
    for command in expression.split(";"):
        match = re.fullmatch(r"\s*s/([^/]*)/([^/]*)/(g?)\s*", command)
        assert match, f"a sed command this test does not know: {command!r}"
        old, new, every = match.groups()
        text = re.sub(old, new, text, count=0 if every else 1)
    return text


def readme_configs() -> dict[str, str]:
    """`gate-a.yaml`, `gate-b.yaml`, `gate-c.yaml` as the README makes them."""
    section = recipe_section()
    configs = {"gate-a": first_block_after(section, "`gate-a.yaml`", "yaml")}
    commands = first_block_after(section, "differ only in the port", "sh")
    for expression, name in re.findall(r"sed '([^']*)' gate-a\.yaml > (gate-\w)\.yaml", commands):
        configs[name] = apply_sed(expression, configs["gate-a"])
    assert sorted(configs) == ["gate-a", "gate-b", "gate-c"], commands
    return configs


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    """The README's Redis: `requirepass` from REDIS_PASSWORD."""
    server = RedisServer(tmp_path / "redis", password=secrets.token_hex(16)).start()
    try:
        yield server
    finally:
        server.stop()


def test_three_replicas_from_the_readme_are_one_gate(
    tmp_path: Path,
    origin: DistributionRegistry,
    loops: LoopThread,
    seaweed_s3: SeaweedS3,
    redis_with_password: RedisServer,
) -> None:
    configs = readme_configs()
    ports = {f"500{n}": str(free_port()) for n in (1, 2, 3)}
    layers = [os.urandom(4000) for _ in range(3)]
    image = push_image(RegistryClient(origin.host), "library/alpine", "latest", layers)
    ensure_bucket(seaweed_s3, "registry-gate")
    assert redis_with_password.password is not None
    env = {
        "S3_ACCESS_KEY": S3_ACCESS_KEY,
        "S3_SECRET_KEY": S3_SECRET_KEY,
        "REDIS_PASSWORD": redis_with_password.password,
        "REGISTRY_GATE_UPLOAD_SECRET": secrets.token_hex(32),
    }
    with FaultProxy(origin.url, name="docker.io", loop=loops) as upstream:
        gates: dict[str, GateProcess] = {}
        for name, readme_text in configs.items():
            text = readme_text
            for readme_port, port in ports.items():
                text = text.replace(f"127.0.0.1:{readme_port}", f"127.0.0.1:{port}")
            config: dict[str, Any] = yaml.safe_load(text)
            # The README's own keys, structure and replica identity stay as written.
            assert config["replica"]["id"] == name and config["storage"]["backend"] == "s3"
            assert config["upstreams"][0]["registry"] == "docker.io"
            config["storage"]["path"] = str(tmp_path / name)
            config["storage"]["s3"]["endpoint"] = seaweed_s3.endpoint
            config["redis"]["url"] = config["redis"]["url"].replace(
                "127.0.0.1:6379", f"127.0.0.1:{redis_with_password.port}"
            )
            config["audit"]["path"] = config["audit"]["path"].replace(
                "/srv/gate/audit", str(tmp_path / "audit")
            )
            config["upstreams"][0]["url"] = upstream.url
            gate = GateProcess(tmp_path / f"{name}-run", config, env=env, name=name)
            gate._port = int(config["listen"].rpartition(":")[2])  # the README's listen
            gates[name] = gate
        try:
            for gate in gates.values():
                gate.start()
            a, b, c = gates["gate-a"], gates["gate-b"], gates["gate-c"]

            # A pull through A fills the shared store; the same pull through C is all hits.
            skopeo_copy(a, "docker.io/library/alpine:latest", tmp_path / "through-a")
            fetched = upstream.count("GET", "blob")
            skopeo_copy(c, "docker.io/library/alpine:latest", tmp_path / "through-c")
            print(f"\nupstream after A then C: {upstream.summary()}")
            assert fetched == len(image.blobs)
            assert upstream.count("GET", "blob") == fetched, upstream.summary()

            # The short name means the same image on every replica.
            for gate in (a, b, c):
                got = fetch(
                    gate.url,
                    "/v2/alpine/manifests/latest",
                    {"Accept": MANIFEST_ACCEPT},
                    keep_body=True,
                )
                assert got.status == 200, (gate.name, got.status, got.body)
                assert got.headers["Docker-Content-Digest"] == image.digest, gate.name
        finally:
            for gate in gates.values():
                gate.stop()

    report = subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "verify", str(tmp_path / "audit")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert report.returncode == 0, report.stdout + report.stderr
    for name in configs:
        assert name in report.stdout, report.stdout
