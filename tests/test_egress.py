"""proxy/upstream/egress.py: where an upstream may send the gate (token realms, blob redirects).

Realms receive the upstream's credentials, redirect targets never do: the two are
separate lists, and no host approved only for redirects (the built-in CDN lists,
`allowed_redirect_hosts`) is ever approved as a realm.

No test touches the network: names are resolved by a fake resolver installed with
monkeypatch; the fake fails on any name it was not told about.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from proxy.upstream import egress
from proxy.upstream.egress import (
    WELL_KNOWN_REALMS,
    WELL_KNOWN_REDIRECTS,
    EgressPolicy,
    EgressRefused,
    host_matches,
)

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


PURPOSES = ["realm", "redirect"]


async def check(policy: EgressPolicy, url: str, purpose: str = "redirect") -> None:
    if purpose == "realm":
        await policy.check_realm(url)
    else:
        await policy.check_redirect(url)


async def allowed(policy: EgressPolicy, url: str, purpose: str = "redirect") -> bool:
    try:
        await check(policy, url, purpose)
    except EgressRefused:
        return False
    return True


@pytest.fixture(params=PURPOSES)
def purpose(request: pytest.FixtureRequest) -> str:
    """Checks both purposes share: run for realms and for redirects."""
    return str(request.param)


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


# --- what realms and redirects share, for a public upstream ---------------------------------


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
    url: str, purpose: str, resolver: FakeResolver
) -> None:
    assert not await allowed(hub(), url, purpose)
    assert resolver.calls == []


async def test_internal_literal_refused_even_when_listed_for_public_upstream(
    purpose: str, resolver: FakeResolver
) -> None:
    listed = ["10.0.0.1", "169.254.169.254", "localhost"]
    policy = EgressPolicy("quay.io", "https://quay.io", redirect_hosts=listed, realm_hosts=listed)
    for url in ("https://10.0.0.1/x", "https://169.254.169.254/x", "https://localhost/x"):
        assert not await allowed(policy, url, purpose), url


@pytest.mark.parametrize(
    "address",
    ["10.1.2.3", "127.0.0.1", "169.254.169.254", "::1", "::ffff:10.0.0.1", "fd12::1", "0.0.0.0"],
)
async def test_allowed_name_resolving_to_internal_address_is_refused(
    address: str, purpose: str, resolver: FakeResolver
) -> None:
    # DNS rebinding: an allowed name that resolves inside the network.
    resolver.table["auth.docker.io"] = [PUBLIC_IP, address]
    with pytest.raises(EgressRefused, match="internal"):
        await check(hub(), "https://auth.docker.io/token", purpose)


async def test_shared_address_space_counts_as_internal(
    purpose: str, resolver: FakeResolver
) -> None:
    # 100.64.0.0/10 (RFC 6598) is not "private" to Python's ipaddress, but it is not a
    # public address either; 100.100.100.200 is a cloud metadata service.
    resolver.table["auth.docker.io"] = ["100.100.100.200"]
    assert not await allowed(hub(), "https://auth.docker.io/token", purpose)
    assert not await allowed(hub(), "https://100.64.0.1/token", purpose)


async def test_https_to_http_downgrade_refused(purpose: str, resolver: FakeResolver) -> None:
    resolver.table["auth.docker.io"] = [PUBLIC_IP]
    with pytest.raises(EgressRefused, match="downgrade"):
        await check(hub(), "http://auth.docker.io/token", purpose)
    assert await allowed(hub(), "https://auth.docker.io/token", purpose)


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
async def test_non_http_or_credential_urls_refused(
    url: str, purpose: str, resolver: FakeResolver
) -> None:
    resolver.table["auth.docker.io"] = [PUBLIC_IP]
    assert not await allowed(hub(), url, purpose)


@pytest.mark.parametrize(
    "url",
    [
        "https://auth.docker.io:99999/token",
        "https://auth.docker.io:abc/token",
        "https://auth.docker.io:-1/token",
    ],
)
async def test_invalid_port_is_refused_not_a_crash(
    url: str, purpose: str, resolver: FakeResolver
) -> None:
    resolver.table["auth.docker.io"] = [PUBLIC_IP]
    with pytest.raises(EgressRefused):
        await check(hub(), url, purpose)


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
async def test_foreign_hosts_refused(url: str, purpose: str, resolver: FakeResolver) -> None:
    resolver.table.update({h: [PUBLIC_IP] for h in ("evil.com", "quay.io")})
    with pytest.raises(EgressRefused, match="not allowed"):
        await check(hub(), url, purpose)
    assert resolver.calls == []


async def test_unresolvable_allowed_name_is_refused(purpose: str, resolver: FakeResolver) -> None:
    with pytest.raises(EgressRefused, match="resolve"):
        await check(hub(), "https://auth.docker.io/token", purpose)


async def test_port_is_passed_to_the_resolver(purpose: str, resolver: FakeResolver) -> None:
    resolver.table["auth.docker.io"] = [PUBLIC_IP]
    await check(hub(), "https://auth.docker.io:8443/token", purpose)
    assert resolver.calls == [("auth.docker.io", 8443)]


# --- token realms: where the upstream's credentials may go ------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://auth.docker.io/token?scope=repository:library/ubuntu:pull",
        "https://registry-1.docker.io/token",
        "https://docker.io/token",
    ],
)
async def test_docker_hub_realms_allowed(url: str, resolver: FakeResolver) -> None:
    host = url.split("/")[2]
    resolver.table[host] = [PUBLIC_IP, "2606:4700::6810:1"]
    await hub().check_realm(url)
    assert resolver.calls == [(host, 443)]


@pytest.mark.parametrize(
    ("registry", "upstream", "realm"),
    [
        ("docker.io", "https://registry-1.docker.io", "https://auth.docker.io/token"),
        ("quay.io", "https://quay.io", "https://quay.io/v2/auth"),
        ("ghcr.io", "https://ghcr.io", "https://ghcr.io/token"),
        ("gcr.io", "https://gcr.io", "https://gcr.io/v2/token"),
        # The known token service also when the upstream is a mirror of the registry.
        ("docker.io", "https://mirror.example.net", "https://auth.docker.io/token"),
        ("quay.io", "http://127.0.0.1:5000", "https://quay.io/v2/auth"),
    ],
)
async def test_known_token_services_are_realms_of_their_registry(
    registry: str, upstream: str, realm: str, resolver: FakeResolver
) -> None:
    resolver.table[realm.split("/")[2]] = [PUBLIC_IP]
    await EgressPolicy(registry, upstream).check_realm(realm)


async def test_known_token_services_only_over_https(resolver: FakeResolver) -> None:
    # Even for an http upstream (where http is no downgrade): a public token service.
    policy = EgressPolicy("quay.io", "http://127.0.0.1:5000")
    assert not await allowed(policy, "http://quay.io/v2/auth", "realm")
    assert WELL_KNOWN_REALMS["docker.io"] == ("auth.docker.io",)


@pytest.mark.parametrize(
    ("registry", "upstream", "realm"),
    [
        # The built-in CDN / object-store hosts: anyone can create a host there.
        ("quay.io", "https://quay.io", "https://attacker.s3.amazonaws.com/token"),
        ("quay.io", "https://quay.io", "https://x.execute-api.us-east-1.amazonaws.com/t"),
        ("quay.io", "https://quay.io", "https://d111111abcdef8.cloudfront.net/token"),
        ("quay.io", "https://quay.io", "https://cdn.quay.io/token"),
        ("quay.io", "http://127.0.0.1:5000", "http://attacker.s3.amazonaws.com/token"),
        ("docker.io", "https://registry-1.docker.io", "https://d2glxqk2.cloudfront.net/t"),
        (
            "docker.io",
            "https://registry-1.docker.io",
            "https://docker-images-prod.abc.r2.cloudflarestorage.com/t",
        ),
        ("docker.io", "https://registry-1.docker.io", "https://production.cloudflare.docker.com/t"),
        ("docker.io", "https://registry-1.docker.io", "https://hub.docker.com/token"),
        ("ghcr.io", "https://ghcr.io", "https://objects.githubusercontent.com/token"),
        ("gcr.io", "https://gcr.io", "https://storage.googleapis.com/token"),
        ("registry.k8s.io", "https://registry.k8s.io", "https://x.pkg.dev/token"),
    ],
)
async def test_redirect_hosts_are_never_realms(
    registry: str, upstream: str, realm: str, resolver: FakeResolver
) -> None:
    host = realm.split("/")[2]
    resolver.table[host] = [PUBLIC_IP]
    policy = EgressPolicy(registry, upstream)
    # A blob may come from there (without credentials) ...
    if host != "hub.docker.com" and registry != "registry.k8s.io":
        await policy.check_redirect(realm)
    # ... but the credentials may not go there.
    with pytest.raises(EgressRefused, match="token realm host"):
        await policy.check_realm(realm)


async def test_operator_redirect_hosts_are_not_realms(resolver: FakeResolver) -> None:
    resolver.table["cdn.example.net"] = [PUBLIC_IP]
    policy = EgressPolicy(
        "registry.corp.example", "http://127.0.0.1:5000", redirect_hosts=["127.0.0.2", "*.net"]
    )
    await policy.check_redirect("http://127.0.0.2:6000/blob")
    await policy.check_redirect("https://cdn.example.net/blob")
    assert not await allowed(policy, "http://127.0.0.2:6000/token", "realm")
    assert not await allowed(policy, "https://cdn.example.net/token", "realm")


async def test_operator_realm_hosts_are_realms_only(resolver: FakeResolver) -> None:
    resolver.table["login.example.net"] = [PUBLIC_IP]
    policy = EgressPolicy(
        "registry.corp.example",
        "http://127.0.0.1:5000",
        realm_hosts=["127.0.0.2", "login.example.net"],
    )
    await policy.check_realm("http://127.0.0.2:6000/token")
    await policy.check_realm("https://login.example.net/token")
    assert not await allowed(policy, "http://127.0.0.2:6000/blob", "redirect")
    assert not await allowed(policy, "http://127.0.0.3:6000/token", "realm")


async def test_realm_is_the_upstream_host_or_its_registrable_domain(
    resolver: FakeResolver,
) -> None:
    hosts = ("gitlab.com", "registry.gitlab.com", "auth.gitlab.com", "cdn.registry.gitlab.com")
    resolver.table.update({h: [PUBLIC_IP] for h in hosts})
    policy = EgressPolicy("registry.gitlab.com", "https://registry.gitlab.com")
    await policy.check_realm("https://gitlab.com/jwt/auth")
    await policy.check_realm("https://registry.gitlab.com:8443/jwt/auth")
    # Another host below the domain may belong to someone else (a tenant of a shared
    # domain); the operator lists it in allowed_realm_hosts if it is the token service.
    assert not await allowed(policy, "https://auth.gitlab.com/jwt/auth", "realm")
    assert not await allowed(policy, "https://gitlab.com.evil.com/jwt/auth", "realm")
    assert not await allowed(policy, "https://evilgitlab.com/jwt/auth", "realm")


async def test_a_tenant_of_a_shared_domain_cannot_be_a_realm(resolver: FakeResolver) -> None:
    resolver.table.update({"evil.s3.amazonaws.com": [PUBLIC_IP], "amazonaws.com": [PUBLIC_IP]})
    policy = EgressPolicy(
        "123.dkr.ecr.us-east-1.amazonaws.com", "https://123.dkr.ecr.us-east-1.amazonaws.com"
    )
    assert not await allowed(policy, "https://evil.s3.amazonaws.com/token", "realm")
    assert not await allowed(policy, "https://456.dkr.ecr.us-east-1.amazonaws.com/t", "realm")


# --- blob redirects: where blobs may come from (never with credentials) -----------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://registry-1.docker.io/v2/library/ubuntu/blobs/sha256:x",
        "https://production.cloudflare.docker.com/registry-v2/docker/registry/v2/blobs/x",
        "https://docker-images-prod.6aa30f8b08e16409b46e0173d6de2f56.r2.cloudflarestorage.com/x",
        "https://d2glxqk2uabbnd.cloudfront.net/x",
        "https://docker.io/x",
        "https://hub.docker.com/x",
    ],
)
async def test_docker_hub_well_known_redirects_allowed(url: str, resolver: FakeResolver) -> None:
    host = url.split("/")[2]
    resolver.table[host] = [PUBLIC_IP, "2606:4700::6810:1"]
    await hub().check_redirect(url)
    assert resolver.calls == [(host, 443)]


def test_docker_hub_redirect_defaults_include_the_cdn_not_the_token_service() -> None:
    targets = WELL_KNOWN_REDIRECTS["docker.io"]
    assert any(host_matches("production.cloudflare.docker.com", p) for p in targets)
    assert "auth.docker.io" not in targets


async def test_well_known_defaults_belong_to_their_registry_only(
    purpose: str, resolver: FakeResolver
) -> None:
    resolver.table["production.cloudflare.docker.com"] = [PUBLIC_IP]
    policy = EgressPolicy("quay.io", "https://quay.io")
    assert not await allowed(policy, "https://production.cloudflare.docker.com/x", purpose)
    assert not await allowed(policy, "https://auth.docker.io/token", purpose)


async def test_redirect_within_the_registrable_domain_allowed(resolver: FakeResolver) -> None:
    resolver.table.update({"gitlab.com": [PUBLIC_IP], "cdn.registry.gitlab.com": [PUBLIC_IP]})
    policy = EgressPolicy("registry.gitlab.com", "https://registry.gitlab.com")
    await policy.check_redirect("https://gitlab.com/blob")
    await policy.check_redirect("https://cdn.registry.gitlab.com/blob")
    assert not await allowed(policy, "https://gitlab.com.evil.com/blob")
    assert not await allowed(policy, "https://evilgitlab.com/blob")


async def test_explicit_wildcard_allows_subdomains_only(resolver: FakeResolver) -> None:
    resolver.table.update(
        {
            "a.cdn.example.com": [PUBLIC_IP],
            "cdn.example.com": [PUBLIC_IP],
            "cdn.example.com.evil.com": [PUBLIC_IP],
        }
    )
    policy = EgressPolicy(
        "registry.corp.example",
        "https://registry.corp.example",
        redirect_hosts=["*.cdn.example.com"],
    )
    await policy.check_redirect("https://a.cdn.example.com/blob")
    assert not await allowed(policy, "https://cdn.example.com/blob")
    assert not await allowed(policy, "https://cdn.example.com.evil.com/blob")


# --- an upstream that is itself on an internal address -----------------------------------


@pytest.mark.parametrize(
    "upstream", ["http://127.0.0.1:5003", "http://localhost:5003", "http://10.0.0.5:5000"]
)
async def test_internal_upstream_may_use_its_own_host(
    upstream: str, purpose: str, resolver: FakeResolver
) -> None:
    policy = EgressPolicy("registry.corp.example", upstream)
    host = upstream.split("//")[1].split(":", maxsplit=1)[0]
    await check(policy, f"http://{host}:5004/token", purpose)
    await check(policy, f"https://{host}/token", purpose)
    assert resolver.calls == []


async def test_loopback_upstream_allows_listed_internal_hosts(
    purpose: str, resolver: FakeResolver
) -> None:
    listed = ["10.0.0.1", "169.254.169.254", "auth.corp.internal"]
    policy = EgressPolicy(
        "registry.corp.example",
        "http://127.0.0.1:5003",
        **{"realm_hosts" if purpose == "realm" else "redirect_hosts": listed},
    )
    await check(policy, "http://10.0.0.1/token", purpose)
    await check(policy, "http://169.254.169.254/blob", purpose)
    await check(policy, "http://auth.corp.internal/token", purpose)
    assert resolver.calls == []


async def test_loopback_upstream_still_refuses_unlisted_hosts(
    purpose: str, resolver: FakeResolver
) -> None:
    policy = EgressPolicy("registry.corp.example", "http://127.0.0.1:5003")
    for url in (
        "http://10.0.0.1/token",
        "http://169.254.169.254/",
        "http://evil.com/token",
        "http://localhost:5004/token",
        "http://127.0.0.2:5004/token",
    ):
        assert not await allowed(policy, url, purpose), url


async def test_http_upstream_may_be_sent_to_http(purpose: str, resolver: FakeResolver) -> None:
    policy = EgressPolicy("registry.corp.example", "http://127.0.0.1:5003")
    await check(policy, "http://127.0.0.1:5004/token", purpose)


async def test_refusals_name_the_host_for_the_log(purpose: str, resolver: FakeResolver) -> None:
    # The message is for the operator's log (the client is told less, see test_upstream).
    policy = EgressPolicy("quay.io", "http://127.0.0.1:5003")
    with pytest.raises(EgressRefused, match=r"169\.254\.169\.254"):
        await check(policy, "http://169.254.169.254/x", purpose)


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
        await hub().check_redirect("https://mirror.docker.io/x")


async def test_resolver_failure_is_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(EgressRefused, match="cannot resolve"):
        await hub().check_realm("https://auth.docker.io/token")
