"""Settings of cross-replica fills: `replica.fill_lease`, and what `redis` requires."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.settings import ConfigError, Settings, load_settings

MINIMAL: dict[str, Any] = {"upstreams": [{"registry": "quay.io", "url": "https://quay.io"}]}
REDIS = {"redis": {"url": "redis://127.0.0.1:6379/0"}, "upload_secret": "s" * 32}


def load(tmp_path: Path, **doc: Any) -> Settings:
    path = tmp_path / "gate.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, **doc}))
    return load_settings(path, {})


def error_of(tmp_path: Path, **doc: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **doc)
    return str(info.value)


def test_fill_lease_default_and_bounds(tmp_path: Path) -> None:
    assert load(tmp_path).replica.fill_lease == 10.0
    assert load(tmp_path, replica={"fill_lease": 2.5}).replica.fill_lease == 2.5
    for bad in (0, 0.1, 301, "soon"):
        assert "replica.fill_lease" in error_of(tmp_path, replica={"fill_lease": bad})


def test_redis_needs_the_shared_secret(tmp_path: Path) -> None:
    message = error_of(tmp_path, redis=REDIS["redis"])
    assert "upload_secret" in message
    assert load(tmp_path, **REDIS).redis is not None
    # Without redis nothing is required (one replica, in-process single flight).
    assert load(tmp_path).upload_secret is None


def test_redis_on_a_wildcard_listen_needs_a_peer_url(tmp_path: Path) -> None:
    for listen in ("0.0.0.0:5000", "[::]:5000", ":5000"):
        assert "replica.peer_url" in error_of(tmp_path, listen=listen, **REDIS)
    settings = load(
        tmp_path, listen="0.0.0.0:5000", replica={"peer_url": "http://10.1.2.3:5000/"}, **REDIS
    )
    assert settings.peer_url() == "http://10.1.2.3:5000"


@pytest.mark.parametrize(
    ("listen", "tls", "expected"),
    [
        ("127.0.0.1:5000", False, "http://127.0.0.1:5000"),
        ("10.0.0.7:443", True, "https://10.0.0.7:443"),
        ("[::1]:5001", False, "http://[::1]:5001"),
    ],
)
def test_peer_url_is_built_from_listen(
    tmp_path: Path, listen: str, tls: bool, expected: str
) -> None:
    doc: dict[str, Any] = {"listen": listen, **REDIS}
    if tls:
        doc["tls"] = {"cert_file": "cert.pem", "key_file": "key.pem"}
    assert load(tmp_path, **doc).peer_url() == expected
