"""The set of seeded upstream registries the gate's tests run against.

Owns the *roles* (which real registry each local Distribution instance stands in for),
what each role is seeded with, and starting/stopping them as a group. ``conftest.py``
only wires these into pytest fixtures, so benchmarks and ad-hoc scripts can reuse them.

Seeded content (``repo:tag`` -> kind):

=========  ==========================================================================
hub        ``library/alpine:3.19`` + ``:latest`` OCI index amd64 + arm64/v8 (origin hub);
(docker.io) ``library/alpine:3.19-v2s2`` the same as a Docker manifest list;
           ``library/busybox:1.36`` OCI manifest, 2 layers; ``library/busybox:1.36-v2s2``
           Docker schema2; ``gate/many:t000..`` ``MANY_TAGS`` tags on one manifest;
           ``team/app:1`` (origin hub); ``gate/origin:latest`` (origin hub)
quay       ``library/busybox:1.36`` (byte-identical to hub's); ``coreos/etcd:v3.5.0``;
(quay.io)  ``gate/origin:latest`` (origin quay)
corp       ``library/alpine:3.19`` + ``:latest`` OCI index (origin corp, so different
           digests from hub's); ``team/app:1`` (origin corp); ``gate/origin:latest``
token      ``team/private:1`` behind Bearer auth (user ``gate``/``gate-secret``;
           anonymous token requests are refused)
=========  ==========================================================================

"origin X" means the config label ``gate.origin=X`` and a file naming X, so a test can
tell which upstream served a pull.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tests.support.images import (
    Layout,
    PushedRef,
    PushSpec,
    SeedSummary,
    alpine_index,
    big_image,
    busybox_image,
    origin_image,
    push,
)
from tests.support.registries import REGISTRY_BINARY, DistributionRegistry
from tests.support.registry_client import RegistryClient
from tests.support.token_issuer import TokenIssuer

__all__ = [
    "MANY_TAGS",
    "ROLES",
    "TOKEN_PASSWORD",
    "TOKEN_USER",
    "SeededRegistry",
    "TokenUpstream",
    "Upstreams",
    "missing_tools",
    "push_big_image",
    "role_plan",
    "start_token_upstream",
    "start_upstreams",
]

# role -> the public registry it stands in for in gate configs and image references.
ROLES = {"hub": "docker.io", "quay": "quay.io", "corp": "registry.corp.example"}
MANY_TAGS = 30
TOKEN_USER, TOKEN_PASSWORD = "gate", "gate-secret"


def missing_tools() -> list[str]:
    """Executables the upstream fixtures need that are not installed."""
    missing = []
    if not os.access(REGISTRY_BINARY, os.X_OK):
        missing.append(f"{REGISTRY_BINARY} (apt-get install docker-registry)")
    if shutil.which("skopeo") is None:
        missing.append("skopeo (apt-get install skopeo)")
    return missing


@dataclass
class SeededRegistry:
    """A running registry plus what it was seeded with."""

    role: str
    stands_in_for: str  # e.g. "docker.io"
    registry: DistributionRegistry
    images: SeedSummary
    credentials: tuple[str, str] | None = None

    @property
    def host(self) -> str:
        return self.registry.host

    @property
    def url(self) -> str:
        return self.registry.url

    def __getitem__(self, repo_tag: str) -> PushedRef:
        return self.images[repo_tag]

    def client(self) -> RegistryClient:
        """A direct (gate-bypassing) client, logged in when the registry needs it."""
        return RegistryClient(self.host, self.credentials)


@dataclass
class TokenUpstream(SeededRegistry):
    issuer: TokenIssuer | None = None

    @property
    def token_issuer(self) -> TokenIssuer:
        assert self.issuer is not None
        return self.issuer


@dataclass
class Upstreams:
    hub: SeededRegistry
    quay: SeededRegistry
    corp: SeededRegistry
    layout: Layout
    seed_seconds: float  # wall time of building + pushing, for the curious

    def all(self) -> tuple[SeededRegistry, ...]:
        return (self.hub, self.quay, self.corp)

    def by_role(self, role: str) -> SeededRegistry:
        return {r.role: r for r in self.all()}[role]

    def by_host(self, host: str) -> SeededRegistry:
        return {r.host: r for r in self.all()}[host]


def role_plan(layout: Layout, role: str, many_tags: int = MANY_TAGS) -> list[PushSpec]:
    """Build the images for ``role`` into ``layout``; returns what to push where."""
    plan = [PushSpec(origin_image(layout, role), "gate/origin", "latest")]
    if role == "hub":
        alpine, busybox = alpine_index(layout, role), busybox_image(layout)
        tags = tuple(f"t{i:03d}" for i in range(1, many_tags))
        plan += [
            PushSpec(alpine, "library/alpine", "3.19", extra_tags=("latest",)),
            PushSpec(alpine, "library/alpine", "3.19-v2s2", format="v2s2"),
            PushSpec(busybox, "library/busybox", "1.36"),
            PushSpec(busybox, "library/busybox", "1.36-v2s2", format="v2s2"),
            PushSpec(origin_image(layout, role, "app"), "team/app", "1"),
        ]
        if many_tags > 0:
            plan.append(PushSpec(busybox, "gate/many", "t000", extra_tags=tags))
    elif role == "quay":
        plan += [
            PushSpec(busybox_image(layout), "library/busybox", "1.36"),
            PushSpec(origin_image(layout, role, "etcd"), "coreos/etcd", "v3.5.0"),
        ]
    elif role == "corp":
        plan += [
            PushSpec(alpine_index(layout, role), "library/alpine", "3.19", extra_tags=("latest",)),
            PushSpec(origin_image(layout, role, "app"), "team/app", "1"),
        ]
    else:
        raise ValueError(f"unknown role {role!r}")
    return plan


def start_upstreams(root: Path, stack: ExitStack, many_tags: int = MANY_TAGS) -> Upstreams:
    """Start hub, quay and corp under ``root`` and seed them; ``stack`` stops them."""
    started = time.monotonic()
    layout = Layout(root / "layout")
    registries = {}
    for role in ROLES:
        reg = DistributionRegistry(root / role, name=role)
        # Registered before start(): a half-started registry is still stopped.
        stack.callback(reg.stop)
        registries[role] = reg.start()
    # Build everything first (single-threaded, one index.json), then push in parallel:
    # the three registries are independent and skopeo runs are mostly waiting.
    plans = {role: role_plan(layout, role, many_tags) for role in ROLES}
    layout.save()
    with ThreadPoolExecutor(len(ROLES)) as pool:
        futures = {
            role: pool.submit(push, layout, registries[role].host, plans[role]) for role in ROLES
        }
        seeded = {
            role: SeededRegistry(role, ROLES[role], registries[role], f.result())
            for role, f in futures.items()
        }
    return Upstreams(
        seeded["hub"], seeded["quay"], seeded["corp"], layout, time.monotonic() - started
    )


def start_token_upstream(root: Path, stack: ExitStack) -> TokenUpstream:
    """A registry demanding Bearer tokens from an in-process issuer, seeded with one
    small image; the issuer's request log is reset after seeding."""
    issuer = TokenIssuer(
        root / "issuer", users={TOKEN_USER: TOKEN_PASSWORD}, anonymous_actions=None
    )
    stack.callback(issuer.stop)
    issuer.start()
    reg = DistributionRegistry(root / "registry", name="token", token_auth=issuer)
    stack.callback(reg.stop)
    reg.start()
    layout = Layout(root / "layout")
    plan = [PushSpec(origin_image(layout, "token", "private"), "team/private", "1")]
    creds = (TOKEN_USER, TOKEN_PASSWORD)
    images = push(layout, reg.host, plan, credentials=creds)
    issuer.reset()  # tests count the gate's token requests, not the seeding's
    return TokenUpstream("token", "registry.token.example", reg, images, creds, issuer)


def push_big_image(seeded: SeededRegistry, layout: Layout, mib: int) -> PushedRef:
    """Build and push ``gate/big:<mib>m`` (one random layer) to ``seeded``."""
    spec = PushSpec(big_image(layout, mib), "gate/big", f"{mib}m")
    push(layout, seeded.host, [spec], credentials=seeded.credentials, summary=seeded.images)
    return seeded.images[f"gate/big:{mib}m"]
