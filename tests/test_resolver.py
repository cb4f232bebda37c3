"""Short-name resolution with a counting fake probe (proxy/names/resolver.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.errors import (
    Denied,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    UpstreamUnavailable,
)
from proxy.names.references import Repository
from proxy.names.registries_conf import parse_registries_conf
from proxy.names.resolver import ShortNameResolver
from proxy.policy.principal import Principal
from proxy.policy.rules import Policy, parse_policies
from proxy.storage.pins import Creator, FilePinStore, MemoryPinStore, PinStore

CORP = "registry.corp.example"


class FakeUpstreams:
    """A probe over `{repository: {references}}` that counts calls and can fail a registry."""

    def __init__(
        self,
        contents: dict[str, set[str]] | None = None,
        failing: dict[str, Exception] | None = None,
    ) -> None:
        self.contents = contents or {}
        self.failing = failing or {}
        self.calls: list[str] = []

    async def __call__(self, repository: Repository, reference: str) -> bool:
        self.calls.append(str(repository))
        failure = self.failing.get(repository.registry)
        if failure is not None:
            raise failure
        return reference in self.contents.get(str(repository), set())


def policy(text: str, conf: str | None = None) -> Policy:
    registries = parse_registries_conf(conf, "registries.conf") if conf else None
    return parse_policies([("policies/test.yaml", textwrap.dedent(text))], registries=registries)


TWO = f"search: [{CORP}, docker.io]\n"


def resolver(text: str, pins: PinStore | None = None, **kwargs: str) -> ShortNameResolver:
    return ShortNameResolver(policy(text), pins or MemoryPinStore(), **kwargs)


async def test_first_registry_that_has_the_reference_wins() -> None:
    upstreams = FakeUpstreams({f"{CORP}/ubuntu": {"22.04"}, "docker.io/library/ubuntu": {"22.04"}})
    result = await resolver(TWO).resolve("ubuntu", "22.04", upstreams)
    assert result.repository == Repository(CORP, "ubuntu")
    assert (result.reason, result.search_position) == ("search", 0)
    assert upstreams.calls == [f"{CORP}/ubuntu"]


async def test_later_registry_after_a_404_and_docker_library() -> None:
    upstreams = FakeUpstreams({"docker.io/library/ubuntu": {"22.04"}})
    result = await resolver(TWO).resolve("ubuntu", "22.04", upstreams)
    assert result.repository == Repository("docker.io", "library/ubuntu")
    assert result.search_position == 1
    assert result.tried == (Repository(CORP, "ubuntu"), Repository("docker.io", "library/ubuntu"))
    assert result.candidates == result.tried
    two_part = FakeUpstreams({"docker.io/bitnami/redis": {"7"}})
    assert (await resolver(TWO).resolve("bitnami/redis", "7", two_part)).repository == (
        Repository("docker.io", "bitnami/redis")
    )


async def test_an_erroring_earlier_registry_fails_the_request() -> None:
    upstreams = FakeUpstreams(
        {"docker.io/library/ubuntu": {"22.04"}},
        failing={CORP: UpstreamUnavailable(f"upstream {CORP} answered 503")},
    )
    pins = MemoryPinStore()
    with pytest.raises(UpstreamUnavailable) as raised:
        await resolver(TWO, pins).resolve("ubuntu", "22.04", upstreams)
    assert upstreams.calls == [f"{CORP}/ubuntu"]  # docker.io was never asked
    assert any("later search registries were not tried" in n for n in raised.value.__notes__)
    assert await pins.list() == []


async def test_not_found_anywhere() -> None:
    upstreams = FakeUpstreams()
    pins = MemoryPinStore()
    with pytest.raises(ManifestUnknown) as raised:
        await resolver(TWO, pins).resolve("ubuntu", "nope", upstreams)
    assert "ubuntu:nope was not found in any search registry" in raised.value.message
    assert "docker.io/library/ubuntu:nope" in raised.value.message
    assert len(upstreams.calls) == 2
    assert await pins.list() == []


async def test_alias_is_the_only_candidate_in_every_mode() -> None:
    for mode in ("disabled", "permissive", "enforcing"):
        text = TWO + f"short_name_mode: {mode}\naliases: {{mysql: {CORP}/dba/mysql}}\n"
        upstreams = FakeUpstreams({"docker.io/library/mysql": {"8"}})
        result = await resolver(text).resolve("mysql", "8", upstreams)
        assert result.repository == Repository(CORP, "dba/mysql")
        assert result.reason == "alias"
        assert upstreams.calls == []  # the only candidate: no probe


async def test_permissive_pins_the_first_resolution_and_the_pin_holds(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    upstreams = FakeUpstreams({"docker.io/library/ubuntu": {"22.04", "24.04"}})
    first = await resolver(TWO, FilePinStore(path)).resolve("ubuntu", "22.04", upstreams)
    assert first.repository == Repository("docker.io", "library/ubuntu") and first.pinned
    assert len(upstreams.calls) == 2

    # Someone publishes ubuntu internally, the search list is reordered, and the gate
    # restarts: the pin still decides, without asking any upstream.
    upstreams.contents[f"{CORP}/ubuntu"] = {"22.04", "24.04"}
    upstreams.calls.clear()
    reordered = f"search: [docker.io, {CORP}]\n"
    for text in (TWO, reordered, f"search: [{CORP}]\n"):
        again = await resolver(text, FilePinStore(path)).resolve("ubuntu", "24.04", upstreams)
        assert again.repository == Repository("docker.io", "library/ubuntu")
        assert again.reason == "pin" and again.pinned
    assert upstreams.calls == []

    # An alias added later still takes precedence over a pin.
    aliased = TWO + f"aliases: {{ubuntu: {CORP}/ubuntu}}\n"
    assert (
        await resolver(aliased, FilePinStore(path)).resolve("ubuntu", "1", upstreams)
    ).reason == ("alias")
    # Removing the pin resolves afresh.
    store = FilePinStore(path)
    await store.remove("ubuntu")
    fresh = await resolver(TWO, store).resolve("ubuntu", "24.04", upstreams)
    assert fresh.repository == Repository(CORP, "ubuntu")


async def test_permissive_single_candidate_is_probed_once_then_pinned() -> None:
    pins = MemoryPinStore()
    upstreams = FakeUpstreams({"docker.io/library/alpine": {"3"}})
    r = resolver("search: [docker.io]\n", pins)
    with pytest.raises(ManifestUnknown):
        await r.resolve("alpin", "3", upstreams)  # a typo is not pinned
    assert await pins.get("alpin") is None
    await r.resolve("alpine", "3", upstreams)
    await r.resolve("alpine", "3", upstreams)
    assert upstreams.calls == ["docker.io/library/alpin", "docker.io/library/alpine"]


async def test_disabled_mode_neither_pins_nor_reads_pins() -> None:
    pins = MemoryPinStore()
    await pins.set("ubuntu", Repository("quay.io", "x/ubuntu"))
    upstreams = FakeUpstreams({"docker.io/library/ubuntu": {"1"}})
    r = resolver(TWO + "short_name_mode: disabled\n", pins)
    for _ in range(2):
        result = await r.resolve("ubuntu", "1", upstreams)
        assert result.repository == Repository("docker.io", "library/ubuntu")
        assert not result.pinned
    assert len(upstreams.calls) == 4
    single = FakeUpstreams()
    result = await resolver("search: [docker.io]\nshort_name_mode: disabled\n").resolve(
        "ubuntu", "1", single
    )
    assert result.repository == Repository("docker.io", "library/ubuntu")
    assert single.calls == []


async def test_enforcing_refuses_ambiguity_and_lists_candidates() -> None:
    upstreams = FakeUpstreams({"docker.io/library/ubuntu": {"1"}})
    pins = MemoryPinStore()
    await pins.set("ubuntu", Repository.of("docker.io", "ubuntu"))  # pins do not count
    with pytest.raises(Denied) as raised:
        await resolver(TWO + "short_name_mode: enforcing\n", pins).resolve("ubuntu", "1", upstreams)
    message = raised.value.message
    assert f"{CORP}/ubuntu, docker.io/library/ubuntu" in message
    assert "aliases:" in message
    assert raised.value.detail["candidates"] == [f"{CORP}/ubuntu", "docker.io/library/ubuntu"]
    assert upstreams.calls == []
    single = await resolver("search: [docker.io]\nshort_name_mode: enforcing\n").resolve(
        "ubuntu", "1", upstreams
    )
    assert single.repository == Repository("docker.io", "library/ubuntu")
    assert upstreams.calls == []


async def test_no_search_list_and_no_alias() -> None:
    with pytest.raises(NameUnknown, match="no search list and no alias"):
        await resolver("{}").resolve("ubuntu", "1", FakeUpstreams())


async def test_record_pin_false_leaves_pins_alone() -> None:
    pins = MemoryPinStore()
    upstreams = FakeUpstreams({"docker.io/library/ubuntu": {"1"}})
    result = await resolver(TWO, pins).resolve("ubuntu", "1", upstreams, record_pin=False)
    assert not result.pinned
    assert await pins.list() == []


async def test_the_resolution_that_creates_a_pin_says_so_and_records_its_creator() -> None:
    pins = MemoryPinStore()
    upstreams = FakeUpstreams({"docker.io/library/ubuntu": {"1"}})
    alice = Creator.of(Principal("alice"), "10.0.0.7", "req-1")
    first = await resolver(TWO, pins).resolve("ubuntu", "1", upstreams, creator=alice)
    assert first.pinned and first.pin_created and first.to_dict()["pin_created"]
    (pin,) = await pins.list()
    assert pin.created_by == alice and pin.created
    again = await resolver(TWO, pins).resolve("ubuntu", "1", upstreams, creator=alice)
    assert again.reason == "pin" and again.pinned and not again.pin_created


async def test_a_principal_who_may_not_pin_resolves_by_the_same_order_without_a_pin() -> None:
    pins = MemoryPinStore()
    upstreams = FakeUpstreams({"docker.io/library/ubuntu": {"1"}})
    anonymous = await resolver(TWO, pins).resolve("ubuntu", "1", upstreams, record_pin=False)
    assert anonymous.repository == Repository("docker.io", "library/ubuntu")
    assert anonymous.reason == "search" and anonymous.search_position == 1
    assert not anonymous.pinned and not anonymous.pin_created and await pins.list() == []


async def test_a_concurrent_pin_wins() -> None:
    pins = MemoryPinStore()

    async def probe(repository: Repository, reference: str) -> bool:
        # Another request pins the name while this one is probing.
        await pins.setdefault("ubuntu", Repository("quay.io", "other/ubuntu"))
        return repository.registry == "docker.io"

    result = await resolver(TWO, pins).resolve("ubuntu", "1", probe)
    assert result.repository == Repository("quay.io", "other/ubuntu")
    assert result.reason == "pin"


async def test_candidates_are_probed_at_their_pull_location() -> None:
    conf = """
    [[registry]]
    prefix = "docker.io/library"
    location = "registry.corp.example/hub"
    """
    r = ShortNameResolver(policy("search: [quay.io, docker.io]\n", conf), MemoryPinStore())
    upstreams = FakeUpstreams({f"{CORP}/hub/ubuntu": {"1"}})
    result = await r.resolve("ubuntu", "1", upstreams)
    assert upstreams.calls == ["quay.io/ubuntu", f"{CORP}/hub/ubuntu"]
    assert result.repository == Repository("docker.io", "library/ubuntu")
    assert result.location == Repository(CORP, "hub/ubuntu")


async def test_invalid_short_names() -> None:
    for name in ("quay.io/x", "localhost/x", "UPPER"):
        with pytest.raises(NameInvalid):
            await resolver(TWO).resolve(name, "1", FakeUpstreams())


async def test_writes_go_to_the_push_registry() -> None:
    r = resolver(TWO, push_registry=CORP)
    result = await r.resolve_write("team/app", "push")
    assert result.repository == Repository(CORP, "team/app")
    assert result.reason == "push_registry"
    hub = await resolver(TWO, push_registry="docker.io").resolve_write("app")
    assert hub.repository == Repository("docker.io", "library/app")
    with pytest.raises(Denied, match="short-name pushes are refused: no push_registry"):
        await resolver(TWO).resolve_write("app")
    with pytest.raises(Denied, match="short-name deletes are refused"):
        await resolver(TWO).resolve_write("app", "delete")


async def test_plan_describes_without_probing() -> None:
    pins = MemoryPinStore()
    plan = await resolver(TWO, pins).plan("ubuntu")
    assert plan.reason == "search" and plan.needs_probe and plan.pins_on_success
    assert [c.search_position for c in plan.candidates] == [0, 1]
    assert not plan.determined
    await pins.set("ubuntu", Repository.of("docker.io", "ubuntu"))
    pinned = await resolver(TWO, pins).plan("ubuntu")
    assert pinned.reason == "pin" and pinned.determined and pinned.pin is not None
    assert pinned.to_dict()["candidates"][0]["repository"] == "docker.io/library/ubuntu"
