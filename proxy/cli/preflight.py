"""Start-up checks: what `serve` will open, tried before it opens it.

`check-config` and `serve` both run these, so a configuration `check-config` calls ok
does not then fail at start-up on a folder the gate cannot write or a key it cannot
read. Every problem is a `ConfigError` naming the setting. The checks try the real
operation (create a temporary file, load the key, bind the address, ask the object
store for the bucket) instead of asking
permission bits, which lie for root and read-only mounts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import tempfile
from pathlib import Path

from proxy.settings import ConfigError, S3Settings, Settings, host_port
from proxy.storage.pins import PINS_FILE_NAME
from proxy.storage.s3_client import open_bucket


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(setting: str, folder: Path) -> None:
    """`folder` takes new files, or can be created (its nearest existing ancestor does)."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ConfigError(f"{setting}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot write in {existing}: {exc.strerror}") from exc


def check_writable_file(setting: str, path: Path) -> None:
    """`path` can be appended to, or created in a folder that takes new files."""
    check_writable_folder(setting, path.parent)
    if path.is_dir():
        raise ConfigError(f"{setting}: {path} is a folder, not a file")
    if path.exists():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot write {path}: {exc.strerror}") from exc


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context `tls:` describes (None without TLS)."""
    if settings.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls.cert_file, settings.tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load certificate/key: {exc}") from exc
    return context


def _check_upstream_ca_files(settings: Settings) -> None:
    for upstream in settings.upstreams:
        if upstream.ca_file is None:
            continue
        try:
            ssl.create_default_context(cafile=str(upstream.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"upstreams[{upstream.registry}].ca_file: {exc}") from exc


def check_listen(setting: str, listen: str) -> None:
    """Nothing else listens on `listen` (bound and released, as the gate will bind it)."""
    host, port = host_port(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot resolve {listen}: {exc}") from exc
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as sock:
            # What aiohttp (asyncio) sets: a port in TIME_WAIT is free, a listener is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise ConfigError(f"{setting}: cannot listen on {listen}: {describe(exc)}") from exc


def describe(exc: OSError) -> str:
    """An OS error as one short phrase (`address already in use`)."""
    # os.strerror: asyncio's bind errors wrap the reason in a sentence of their own.
    text = os.strerror(exc.errno) if exc.errno is not None else str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def preflight(settings: Settings, *, listen: bool = False) -> None:
    """Try what `serve` will open; `listen` also binds the listen addresses."""
    storage = settings.storage.path
    check_writable_folder("storage.path", storage)
    pins = settings.policy.pins_path
    if pins is not None:
        check_writable_file("policy.pins_path", pins)
    else:
        check_writable_file("storage.path", storage / PINS_FILE_NAME)
    if settings.audit_file is not None:
        check_writable_file("audit.path", settings.audit_file)
    tls_context(settings)
    _check_upstream_ca_files(settings)
    if settings.storage.s3 is not None:
        check_bucket(settings.storage.s3)
    if listen:
        check_listen("listen", settings.listen)
        if settings.metrics.enabled and settings.metrics.listen:
            check_listen("metrics.listen", settings.metrics.listen)


def check_bucket(s3: S3Settings) -> None:
    """The object store answers and the bucket exists for these keys (outside any event
    loop: `serve` and `check-config` run this before theirs)."""

    async def check() -> None:
        async with open_bucket(s3, check=True):
            pass

    asyncio.run(check())


def setting_named_in(settings: Settings, text: str) -> str | None:
    """The setting whose file or folder `text` (an error message) names, if any."""
    candidates: list[tuple[str, Path | None]] = [
        ("audit.path", settings.audit_file),
        ("policy.pins_path", settings.policy.pins_path),
        ("tls.cert_file", settings.tls.cert_file if settings.tls else None),
        ("tls.key_file", settings.tls.key_file if settings.tls else None),
        ("auth.signing_key", settings.auth.signing_key),
        ("auth.htpasswd", settings.auth.htpasswd),
        ("policy.registries_conf", settings.policy.registries_conf),
        ("storage.path", settings.storage.path),
    ]
    named = [(name, str(path)) for name, path in candidates if path is not None]
    # The longest path first: the pins file may lie inside the storage folder.
    for name, path in sorted(named, key=lambda item: -len(item[1])):
        if path in text:
            return name
    return None
