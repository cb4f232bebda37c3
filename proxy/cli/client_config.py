"""Client configuration that points Docker, containerd and podman at the gate (pure).

`registry-gate client-config docker|containerd|podman --url URL` prints what to install
on a client (or writes it under a folder with `--output`). Each configuration is chosen
so the gate is not silently bypassed where the client allows that, and says plainly
where it does not (a Docker daemon falls back to Docker Hub on any mirror error, so a
perimeter also needs an egress rule).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit

DOCKER_WARNING = """\
# WARNING: a Docker daemon treats registry-mirrors as a hint. On ANY mirror error
# (refused, 401, 403 DENIED, 404, 429, 5xx) it silently retries at
# https://registry-1.docker.io and shows the user only Docker Hub's answer. A policy
# denial by the gate is therefore NOT enforced on Docker clients unless the network also
# refuses direct egress to Docker Hub. Pushes never use mirrors.
#
# Egress rule the perimeter needs (example for nftables; adapt to your firewall/proxy):
#   deny  tcp/443 to registry-1.docker.io, auth.docker.io, production.cloudflare.docker.com
#   allow tcp/{port} to {host} (the gate)
# With the containerd image store (Docker 24+ with "features": {{"containerd-snapshotter": true}})
# /etc/docker/certs.d/<registry>/hosts.toml is read too: use `client-config containerd`
# there with server set to the gate, which does not fall back."""


@dataclass(frozen=True, slots=True)
class GeneratedFile:
    """One file a client needs: where it goes (absolute) and what it holds."""

    path: str
    content: str


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """The files of one client's configuration, and what its operator must read."""

    files: list[GeneratedFile]
    warnings: list[str]


def _host_of(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("--url must be http(s)://host[:port] of the gate")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("--url must not carry a path, query or fragment (Docker refuses it)")
    return parts.scheme, parts.netloc


def docker(url: str) -> ClientConfig:
    """`/etc/docker/daemon.json` making the gate a Docker Hub mirror, with the warning."""
    scheme, netloc = _host_of(url)
    host, _, port = netloc.partition(":")
    document: dict[str, object] = {"registry-mirrors": [f"{scheme}://{netloc}"]}
    if scheme == "http":
        document["insecure-registries"] = [netloc]
    warning = DOCKER_WARNING.format(host=host, port=port or ("443" if scheme == "https" else "80"))
    return ClientConfig(
        [GeneratedFile("/etc/docker/daemon.json", json.dumps(document, indent=2) + "\n")],
        [warning],
    )


def containerd(url: str, registries: Sequence[str]) -> ClientConfig:
    """hosts.toml files: every registry goes through the gate, with `server` the gate too.

    `server` is what containerd falls back to when the mirror fails; pointing it at the
    gate as well means a denial stays a denial.
    """
    scheme, netloc = _host_of(url)
    gate = f"{scheme}://{netloc}"
    files: list[GeneratedFile] = []
    for registry in [*registries, "_default"]:
        content = (
            f"# {registry}: pulls resolve through registry-gate (sends ?ns={registry}).\n"
            f'server = "{gate}"\n\n'
            f'[host."{gate}"]\n'
            f'  capabilities = ["pull", "resolve", "push"]\n'
        )
        if scheme == "http":
            content += "  skip_verify = true\n"
        files.append(GeneratedFile(f"/etc/containerd/certs.d/{registry}/hosts.toml", content))
    return ClientConfig(files, [])


def podman(url: str, registries: Sequence[str], search: Sequence[str]) -> ClientConfig:
    """registries.conf sending each registry to the gate by path prefix (no fallback)."""
    _scheme, netloc = _host_of(url)
    lines = [
        "# registries.conf for podman/skopeo/buildah: every registry is reached through",
        "# registry-gate by path prefix; `location` (not a mirror) means no silent fallback.",
        "unqualified-search-registries = [" + ", ".join(f'"{r}"' for r in search) + "]",
        'short-name-mode = "enforcing"',
        "",
    ]
    for registry in registries:
        lines += [
            "[[registry]]",
            f'prefix = "{registry}"',
            f'location = "{netloc}/{registry}"',
            f"insecure = {'true' if _scheme == 'http' else 'false'}",
            "",
        ]
    return ClientConfig([GeneratedFile("/etc/containers/registries.conf", "\n".join(lines))], [])


def render(files: Sequence[GeneratedFile]) -> str:
    """What stdout gets: one file's content as it is (so `> daemon.json` works), or
    several files each under a `### path` header."""
    if len(files) == 1:
        return files[0].content
    return "\n".join(f"### {f.path}\n{f.content}" for f in files)


def relative_path(file: GeneratedFile) -> PurePosixPath:
    """Where a file goes under an output folder: its absolute path made relative
    (`/etc/docker/daemon.json` -> `etc/docker/daemon.json`), never outside the folder."""
    path = PurePosixPath(file.path.lstrip("/"))
    if ".." in path.parts or not path.parts:
        raise ValueError(f"refusing to write {file.path!r}")
    return path
