"""proxy/egress.py: where an upstream may send the gate (token realms, blob redirects).

No test touches the network: names are resolved by a fake resolver installed with
monkeypatch; the fake fails on any name it was not told about.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from proxy import egress
from proxy.egress import WELL_KNOWN_TARGETS, EgressPolicy, EgressRefused, host_matches

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
PUBLIC_IP = "93.184.215.14"


class FakeResolver:
    """Stands in for `egress._resolve`: a fixed table, and a record of every lookup."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[Address]:
        self.calls.append((host, port))
        if host not in self.table:
            raise EgressRefused(f"cannot resolve {host}")
        return [ipaddress.ip_address(a) for a in self.table[host]]


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    fake = FakeResolver({})
    monkeypatch.setattr(egress, "_resolve", fake)
    return fake


@pytest.fixture(autouse=True)
def no_real_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a test tried a real DNS lookup: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def hub() -> EgressPolicy:
    return EgressPolicy("docker.io", "https://registry-1.docker.io")


async def allowed(policy: EgressPolicy, url: str) -> bool:
    try:
        await policy.check(url)
    except EgressRefused:
        return False
    return True


# --- host_matches ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "pattern", "expected"),
    [
        ("a.example.com", "*.example.com", True),
        ("a.b.example.com", "*.example.com", True),
        ("A.Example.COM", "*.example.com", True),
        ("example.com", "*.example.com", False),
        ("example.com.evil.com", "*.example.com", False),
        ("evilexample.com", "*.example.com", False),
        ("a.example.com.", "*.example.com", False),
        ("example.com", "example.com", True),
        ("www.example.com", "example.com", False),
        ("example.com.evil.com", "example.com", False),
        (
            "docker-images-prod.6aa30f8b08e16409b46e0173d6de2f56.r2.cloudflarestorage.com",
            "docker-images-prod.*.r2.cloudflarestorage.com",
            True,
        ),
        (
            "docker-images-prod.a.b.r2.cloudflarestorage.com",
            "docker-images-prod.*.r2.cloudflarestorage.com",
            False,
        ),
        (
            "evil.x.r2.cloudflarestorage.com",
            "docker-images-prod.*.r2.cloudflarestorage.com",
            False,
        ),
    ],
)
def test_host_matches(host: str, pattern: str, expected: bool) -> None:
    assert host_matches(host, pattern) is expected


# --- realm / redirect targets for a public upstream ----------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/latest/meta-data/",
        "http://169.254.169.254/latest/meta-data/",
        "https://10.0.0.1/token",
        "https://10.255.255.255:8443/token",
        "https://172.16.0.1/token",
        "https://192.168.1.1/token",
        "https://127.0.0.1/token",
        "https://127.0.0.1:5000/token",
        "https://[::1]/token",
        "https://[::ffff:127.0.0.1]/token",
        "https://[::ffff:169.254.169.254]/token",
        "https://[fd00::1]/token",
        "https://[fe80::1]/token",
        "https://0.0.0.0/token",
        "https://localhost/token",
        "https://localhost:5000/token",
        "https://2130706433/token",
        "https://127.1/token",
        "https://0x7f000001/token",
    ],
)
async def test_internal_targets_refused_for_public_upstream(
    url: str, resolver: FakeResolver
) -> None:
    assert not await allowed(hub(), url)
    assert resolver.calls == []


async def test_internal_literal_refused_even_when_listed_for_public_upstream(
    resolver: FakeResolver,
) -> None:
    policy = EgressPolicy(
        "quay.io", "https://quay.io", ["10.0.0.1", "169.254.169.254", "localhost"]
    )
    for url in ("https://10.0.0.1/x", "https://169.254.169.254/x", "https://localhost/x"):
        assert not await allowed(policy, url), url


@pytest.mark.parametrize(
    "address",
    ["10.1.2.3", "127.0.0.1", "169.254.169.254", "::1", "::ffff:10.0.0.1", "fd12::1", "0.0.0.0"],
)
async def test_allowed_name_resolving_to_internal_address_is_refused(
    address: str, resolver: FakeResolver
) -> None:
    # DNS rebinding: an allowed name that resolves inside the network.
    resolver.table["auth.docker.io"] = [PUBLIC_IP, address]
    with pytest.raises(EgressRefused, match="internal"):
        await hub().check("https://auth.docker.io/token")


async def test_shared_address_space_counts_as_internal(resolver: FakeResolver) -> None:
    # 100.64.0.0/10 (RFC 6598) is not "private" to Python's ipaddress, but it is not a
    # public address either; 100.100.100.200 is a cloud metadata service.
    resolver.table["auth.docker.io"] = ["100.100.100.200"]
    assert not await allowed(hub(), "https://auth.docker.io/token")
    assert not await allowed(hub(), "https://100.64.0.1/token")


async def test_https_to_http_downgrade_refused(resolver: FakeResolver) -> None:
    resolver.table["auth.docker.io"] = [PUBLIC_IP]
    with pytest.raises(EgressRefused, match="downgrade"):
        await hub().check("http://auth.docker.io/token")
    assert await allowed(hub(), "https://auth.docker.io/token")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://auth.docker.io/token",
        "file:///etc/passwd",
        "gopher://auth.docker.io/",
        "https:///token",
        "/token",
        "",
        "https://user:pass@auth.docker.io/token",
        "https://user@auth.docker.io/token",
    ],
)
async def test_non_http_or_credential_urls_refused(url: str, resolver: FakeResolver) -> None:
    resolver.table["auth.docker.io"] = [PUBLIC_IP]
    assert not await allowed(hub(), url)


@pytest.mark.parametrize(
    "url",
    [
        "https://auth.docker.io:99999/token",
        "https://auth.docker.io:abc/token",
        "https://auth.docker.io:-1/token",
    ],
)
async def test_invalid_port_is_refused_not_a_crash(url: str, resolver: FakeResolver) -> None:
    resolver.table["auth.docker.io"] = [PUBLIC_IP]
    with pytest.raises(EgressRefused):
        await hub().check(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.com/token",
        "https://docker.io.evil.com/token",
        "https://auth.docker.io.evil.com/token",
        "https://evil-docker.io/token",
        "https://quay.io/token",
        "https://x.r2.cloudflarestorage.com/blob",
        "https://93.184.215.14/token",
    ],
)
async def test_foreign_hosts_refused(url: str, resolver: FakeResolver) -> None:
    resolver.table.update({h: [PUBLIC_IP] for h in ("evil.com", "quay.io")})
    with pytest.raises(EgressRefused, match="not allowed"):
        await hub().check(url)
    assert resolver.calls == []


@pytest.mark.parametrize(
    "url",
    [
        "https://auth.docker.io/token?scope=repository:library/ubuntu:pull",
        "https://registry-1.docker.io/v2/library/ubuntu/blobs/sha256:x",
        "https://production.cloudflare.docker.com/registry-v2/docker/registry/v2/blobs/x",
        "https://docker-images-prod.6aa30f8b08e16409b46e0173d6de2f56.r2.cloudflarestorage.com/x",
        "https://d2glxqk2uabbnd.cloudfront.net/x",
        "https://docker.io/x",
        "https://hub.docker.com/x",
    ],
)
async def test_docker_hub_well_known_targets_allowed(url: str, resolver: FakeResolver) -> None:
    host = url.split("/")[2]
    resolver.table[host] = [PUBLIC_IP, "2606:4700::6810:1"]
    await hub().check(url)
    assert resolver.calls == [(host, 443)]


def test_docker_hub_defaults_include_auth_and_cdn() -> None:
    targets = WELL_KNOWN_TARGETS["docker.io"]
    assert "auth.docker.io" in targets
    assert any(host_matches("production.cloudflare.docker.com", p) for p in targets)


async def test_well_known_defaults_belong_to_their_registry_only(resolver: FakeResolver) -> None:
    resolver.table["production.cloudflare.docker.com"] = [PUBLIC_IP]
    policy = EgressPolicy("quay.io", "https://quay.io")
    assert not await allowed(policy, "https://production.cloudflare.docker.com/x")
    assert not await allowed(policy, "https://auth.docker.io/token")


async def test_same_registrable_domain_allowed(resolver: FakeResolver) -> None:
    resolver.table.update({"gitlab.com": [PUBLIC_IP], "cdn.registry.gitlab.com": [PUBLIC_IP]})
    policy = EgressPolicy("registry.gitlab.com", "https://registry.gitlab.com")
    await policy.check("https://gitlab.com/jwt/auth")
    await policy.check("https://cdn.registry.gitlab.com/blob")
    assert not await allowed(policy, "https://gitlab.com.evil.com/jwt/auth")
    assert not await allowed(policy, "https://evilgitlab.com/jwt/auth")


async def test_explicit_wildcard_allows_subdomains_only(resolver: FakeResolver) -> None:
    resolver.table.update(
        {
            "a.cdn.example.com": [PUBLIC_IP],
            "cdn.example.com": [PUBLIC_IP],
            "cdn.example.com.evil.com": [PUBLIC_IP],
        }
    )
    policy = EgressPolicy(
        "registry.corp.example", "https://registry.corp.example", ["*.cdn.example.com"]
    )
    await policy.check("https://a.cdn.example.com/blob")
    assert not await allowed(policy, "https://cdn.example.com/blob")
    assert not await allowed(policy, "https://cdn.example.com.evil.com/blob")


async def test_unresolvable_allowed_name_is_refused(resolver: FakeResolver) -> None:
    with pytest.raises(EgressRefused, match="resolve"):
        await hub().check("https://auth.docker.io/token")


async def test_port_is_passed_to_the_resolver(resolver: FakeResolver) -> None:
    resolver.table["auth.docker.io"] = [PUBLIC_IP]
    await hub().check("https://auth.docker.io:8443/token")
    assert resolver.calls == [("auth.docker.io", 8443)]


# --- an upstream that is itself on an internal address -----------------------------------


@pytest.mark.parametrize(
    "upstream", ["http://127.0.0.1:5003", "http://localhost:5003", "http://10.0.0.5:5000"]
)
async def test_internal_upstream_may_use_its_own_host(
    upstream: str, resolver: FakeResolver
) -> None:
    policy = EgressPolicy("registry.corp.example", upstream)
    host = upstream.split("//")[1].split(":", maxsplit=1)[0]
    await policy.check(f"http://{host}:5004/token")
    await policy.check(f"https://{host}/token")
    assert resolver.calls == []


async def test_loopback_upstream_allows_listed_internal_hosts(resolver: FakeResolver) -> None:
    policy = EgressPolicy(
        "registry.corp.example",
        "http://127.0.0.1:5003",
        ["10.0.0.1", "169.254.169.254", "auth.corp.internal"],
    )
    await policy.check("http://10.0.0.1/token")
    await policy.check("http://169.254.169.254/blob")
    await policy.check("http://auth.corp.internal/token")
    assert resolver.calls == []


async def test_loopback_upstream_still_refuses_unlisted_hosts(resolver: FakeResolver) -> None:
    policy = EgressPolicy("registry.corp.example", "http://127.0.0.1:5003")
    for url in (
        "http://10.0.0.1/token",
        "http://169.254.169.254/",
        "http://evil.com/token",
        "http://localhost:5004/token",
    ):
        assert not await allowed(policy, url), url


async def test_http_upstream_may_be_sent_to_http(resolver: FakeResolver) -> None:
    policy = EgressPolicy("registry.corp.example", "http://127.0.0.1:5003")
    await policy.check("http://127.0.0.1:5004/token")


async def test_real_resolver_checks_every_address(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real resolver, with getaddrinfo faked (no test touches the network).
    calls: list[str] = []

    def fake_getaddrinfo(
        host: str, port: object, *args: object, **kwargs: object
    ) -> list[tuple[int, int, int, str, tuple[str, int]]]:
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.8.7", 443))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    addresses = await egress._resolve("mirror.docker.io", 443)
    assert addresses == [ipaddress.ip_address("10.9.8.7")]
    assert calls == ["mirror.docker.io"]
    with pytest.raises(EgressRefused, match="internal"):
        await hub().check("https://mirror.docker.io/x")


async def test_resolver_failure_is_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(EgressRefused, match="cannot resolve"):
        await hub().check("https://auth.docker.io/token")
