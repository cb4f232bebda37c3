"""Where the gate may connect on an upstream's say-so: token realms and blob redirects.

An upstream can send the gate to another host: the realm of its Bearer challenge, or a
blob redirect to a CDN or object store. These are two lists with two purposes:

- a **token realm** receives the upstream's credentials (the Basic password), so it must
  be the upstream's own host, its registrable domain itself, a known token service of
  that registry (`auth.docker.io` for docker.io) or a host the operator listed in
  `allowed_realm_hosts`. Never a CDN or object-store host: anybody can create one of
  those (a bucket on `*.s3.amazonaws.com`, a `*.cloudfront.net` distribution).
- a **blob redirect** target receives no credentials at all (the upstream client strips
  `Authorization` off every hop to another host), so it may also be inside the
  upstream's registrable domain, on the built-in CDN hosts of a well-known registry or in
  `allowed_redirect_hosts`.

For both, a target must not be a loopback, link-local or private address unless the
upstream itself lives on such an address, and never an https -> http downgrade. Refusals
carry the host in their message, for the log; the client is told less (upstream.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import SplitResult, urlsplit

# Hosts the well-known registries redirect blob downloads to (CDNs, object stores). They
# never see credentials: anyone can create a host under most of these names.
WELL_KNOWN_REDIRECTS: dict[str, tuple[str, ...]] = {
    "docker.io": (
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
# The token services of the well-known registries (exact hosts, https only): where their
# Bearer challenges send clients with the registry's credentials.
WELL_KNOWN_REALMS: dict[str, tuple[str, ...]] = {
    "docker.io": ("auth.docker.io",),
    "quay.io": ("quay.io",),
    "ghcr.io": ("ghcr.io",),
    "gcr.io": ("gcr.io",),
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
    """Decides which hosts one upstream may send the gate to, per purpose."""

    def __init__(
        self,
        registry: str,
        upstream_url: str,
        *,
        redirect_hosts: Iterable[str] = (),
        realm_hosts: Iterable[str] = (),
    ) -> None:
        parts = urlsplit(upstream_url)
        self.upstream_host = (parts.hostname or "").lower()
        self.upstream_scheme = parts.scheme
        self.redirect_hosts = tuple(redirect_hosts) + WELL_KNOWN_REDIRECTS.get(registry, ())
        self.realm_hosts = tuple(realm_hosts)
        self.known_realms = WELL_KNOWN_REALMS.get(registry, ())
        upstream_ip = _parse_ip(self.upstream_host)
        # An upstream configured on an internal address (a registry on loopback) may send
        # the gate to internal addresses; a public one may not.
        self.internal_ok = self.upstream_host == "localhost" or (
            upstream_ip is not None and _is_internal(upstream_ip)
        )

    def _realm_allowed(self, host: str, scheme: str) -> bool:
        if host == self.upstream_host:
            return True
        if any(host_matches(host, pattern) for pattern in self.realm_hosts):
            return True
        # A known token service is a public https endpoint, never reached over http.
        if host in self.known_realms:
            return scheme == "https"
        if _parse_ip(host) is not None or _parse_ip(self.upstream_host) is not None:
            return False
        # The registrable domain itself (registry.gitlab.com -> gitlab.com), not the hosts
        # below it: without a public-suffix list those may belong to anyone (a tenant of
        # a cloud domain), and with the last-two-labels rule the domain itself is either
        # the upstream's own domain or a public suffix nobody can host.
        return "." in self.upstream_host and host == _registrable_domain(self.upstream_host)

    def _redirect_allowed(self, host: str) -> bool:
        if host == self.upstream_host:
            return True
        if any(host_matches(host, pattern) for pattern in self.redirect_hosts):
            return True
        if _parse_ip(host) is not None or _parse_ip(self.upstream_host) is not None:
            return False
        domain = _registrable_domain(self.upstream_host)
        return host == domain or host.endswith("." + domain)

    async def check_realm(self, url: str) -> None:
        """Raise EgressRefused unless `url` may receive this upstream's credentials."""
        parts = urlsplit(url)
        host = self._check_url(parts)
        if not self._realm_allowed(host, parts.scheme):
            raise EgressRefused(
                f"token realm host {host} is not allowed for upstream {self.upstream_host} "
                "(list it in allowed_realm_hosts if it is the upstream's token service)"
            )
        await self._check_address(host, parts)

    async def check_redirect(self, url: str) -> None:
        """Raise EgressRefused unless the gate may follow a redirect to `url` (no credentials)."""
        parts = urlsplit(url)
        host = self._check_url(parts)
        if not self._redirect_allowed(host):
            raise EgressRefused(
                f"redirect host {host} is not allowed for upstream {self.upstream_host}"
            )
        await self._check_address(host, parts)

    def _check_url(self, parts: SplitResult) -> str:
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise EgressRefused(f"not an http(s) URL: {parts.scheme}://{host}")
        if self.upstream_scheme == "https" and parts.scheme != "https":
            raise EgressRefused(f"refusing a downgrade from https to http ({host})")
        if parts.username or parts.password:
            raise EgressRefused(f"URL carries credentials ({host})")
        try:
            parts.port  # noqa: B018 - parsing it is the check
        except ValueError as exc:
            raise EgressRefused(f"invalid port in URL ({host})") from exc
        return host

    async def _check_address(self, host: str, parts: SplitResult) -> None:
        if self.internal_ok:
            return
        literal = _parse_ip(host)
        if literal is not None:
            addresses = [literal]
        elif host == "localhost":
            raise EgressRefused("refusing localhost for a non-local upstream")
        else:
            addresses = await _resolve(host, parts.port or 443)
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
