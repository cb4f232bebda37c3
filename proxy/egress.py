"""Where the gate may connect on an upstream's say-so: token realms and blob redirects.

An upstream can send the gate to another host (the realm of its Bearer challenge, a blob
redirect to a CDN or object store). A compromised upstream must not turn the gate into a
way into the internal network or a way to leak its credentials, so a target is allowed
only when it is the upstream's own host, inside its registrable domain, or listed for it
(with defaults for the well-known registries); and it must not be a loopback, link-local
or private address unless the upstream itself lives on such an address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

# Hosts the well-known registries send clients to (token service, CDNs, object stores).
WELL_KNOWN_TARGETS: dict[str, tuple[str, ...]] = {
    "docker.io": (
        "auth.docker.io",
        "*.docker.io",
        "*.docker.com",
        "*.cloudflare.docker.com",
        "docker-images-prod.*.r2.cloudflarestorage.com",
        "*.cloudfront.net",
    ),
    "quay.io": ("*.quay.io", "*.cloudfront.net", "*.s3.amazonaws.com", "*.amazonaws.com"),
    "ghcr.io": ("*.githubusercontent.com", "*.github.com", "ghcr.io"),
    "gcr.io": ("*.googleapis.com", "*.gcr.io"),
    "registry.k8s.io": ("*.pkg.dev", "*.googleapis.com", "*.k8s.io"),
}


class EgressRefused(Exception):
    """The target host is not one the upstream may send the gate to."""


def _is_internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
        # Shared address space (100.64.0.0/10, cloud metadata at 100.100.100.200) and
        # other ranges that are neither private nor public.
        or not address.is_global
    )


def _parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _registrable_domain(host: str) -> str:
    # Without a public-suffix list, the last two labels are the registrable domain; that
    # errs on the strict side for suffixes like co.uk (only the same host matches there).
    labels = host.split(".")
    return ".".join(labels[-2:]) if len(labels) >= 2 else host


def host_matches(host: str, pattern: str) -> bool:
    """Match `host` against `name`, `*.suffix` (subdomains only) or `a.*.b` (one label)."""
    host, pattern = host.lower(), pattern.lower()
    if pattern.startswith("*.") and "*" not in pattern[2:]:
        return host.endswith(pattern[1:]) and host != pattern[2:]
    host_labels, pattern_labels = host.split("."), pattern.split(".")
    if len(host_labels) != len(pattern_labels):
        return False
    return all(p in ("*", h) for h, p in zip(host_labels, pattern_labels, strict=True))


class EgressPolicy:
    """Decides which hosts one upstream may send the gate to."""

    def __init__(self, registry: str, upstream_url: str, allowed: Iterable[str] = ()) -> None:
        parts = urlsplit(upstream_url)
        self.upstream_host = (parts.hostname or "").lower()
        self.upstream_scheme = parts.scheme
        self.allowed = tuple(allowed) + WELL_KNOWN_TARGETS.get(registry, ())
        upstream_ip = _parse_ip(self.upstream_host)
        # An upstream configured on an internal address (a registry on loopback) may send
        # the gate to internal addresses; a public one may not.
        self.internal_ok = self.upstream_host == "localhost" or (
            upstream_ip is not None and _is_internal(upstream_ip)
        )

    def _name_allowed(self, host: str) -> bool:
        if host == self.upstream_host:
            return True
        if any(host_matches(host, pattern) for pattern in self.allowed):
            return True
        if _parse_ip(host) is not None or _parse_ip(self.upstream_host) is not None:
            return False
        domain = _registrable_domain(self.upstream_host)
        return host == domain or host.endswith("." + domain)

    async def check(self, url: str) -> None:
        """Raise EgressRefused unless the gate may connect to `url` for this upstream."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise EgressRefused(f"not an http(s) URL: {parts.scheme}://{host}")
        if self.upstream_scheme == "https" and parts.scheme != "https":
            raise EgressRefused(f"refusing a downgrade from https to http ({host})")
        if parts.username or parts.password:
            raise EgressRefused(f"URL carries credentials ({host})")
        try:
            port = parts.port or 443
        except ValueError as exc:
            raise EgressRefused(f"invalid port in URL ({host})") from exc
        if not self._name_allowed(host):
            raise EgressRefused(f"host {host} is not allowed for upstream {self.upstream_host}")
        if self.internal_ok:
            return
        literal = _parse_ip(host)
        if literal is not None:
            addresses = [literal]
        elif host == "localhost":
            raise EgressRefused("refusing localhost for a non-local upstream")
        else:
            addresses = await _resolve(host, port)
        for address in addresses:
            if _is_internal(address):
                raise EgressRefused(f"host {host} resolves to an internal address")


async def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise EgressRefused(f"cannot resolve {host}") from exc
    result: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for info in infos:
        parsed = _parse_ip(str(info[4][0]))
        if parsed is not None:
            result.append(parsed)
    return result
