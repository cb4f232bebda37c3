"""The `PinStore` contract: memory, file and Redis (written through to a file) promise the
same, including that the first of concurrent first pins wins for everyone."""

from __future__ import annotations

import asyncio

import pytest

from proxy.names.references import Repository
from proxy.storage.pins import Creator
from tests.contract.conftest import PinStores

UBUNTU_HUB = Repository.of("docker.io", "ubuntu")
UBUNTU_CORP = Repository.of("registry.corp.example", "ubuntu")
APP_QUAY = Repository.of("quay.io", "team/app")
ALICE = Creator("alice", ("dev", "ops"), "10.0.0.7", "req-1")


async def test_get_set_remove_list(pin_stores: PinStores) -> None:
    store = pin_stores()
    assert await store.get("ubuntu") is None
    pin = await store.set("ubuntu", UBUNTU_HUB)
    assert pin.repository == UBUNTU_HUB and pin.name == "ubuntu" and pin.created
    assert await store.get("ubuntu") == pin
    await store.set("team/app", APP_QUAY)
    assert [p.name for p in await store.list()] == ["team/app", "ubuntu"]
    assert await store.remove("ubuntu") is True
    assert await store.remove("ubuntu") is False
    assert await store.get("ubuntu") is None
    assert [p.name for p in await store.list()] == ["team/app"]


async def test_setdefault_keeps_the_first_pin_and_set_overwrites(pin_stores: PinStores) -> None:
    store = pin_stores()
    first, created = await store.setdefault("ubuntu", UBUNTU_HUB, ALICE)
    second, again = await store.setdefault("ubuntu", UBUNTU_CORP)
    assert created and not again
    assert first == second and second.repository == UBUNTU_HUB
    assert second.created_by == ALICE
    # set() is the operator's explicit re-pin.
    repinned = await store.set("ubuntu", UBUNTU_CORP)
    assert repinned.repository == UBUNTU_CORP and repinned.created_by is None
    assert (await pin_stores().get("ubuntu")) == repinned


async def test_the_creator_is_kept(pin_stores: PinStores) -> None:
    await pin_stores().setdefault("ubuntu", UBUNTU_HUB, ALICE)
    pin = await pin_stores().get("ubuntu")
    assert pin is not None and pin.created_by == ALICE
    listed = await pin_stores().list()
    assert [p.to_dict() for p in listed] == [pin.to_dict()]
    assert listed[0].to_dict()["created_by"] == {
        "user": "alice",
        "groups": ["dev", "ops"],
        "client": "10.0.0.7",
        "request_id": "req-1",
    }


async def test_names_must_be_short(pin_stores: PinStores) -> None:
    store = pin_stores()
    with pytest.raises(ValueError, match="not a short name"):
        await store.set("quay.io/x", UBUNTU_HUB)
    with pytest.raises(ValueError, match="not a short name"):
        await store.setdefault("quay.io/x", UBUNTU_HUB)
    assert await store.list() == []


async def test_concurrent_first_pins_agree(pin_stores: PinStores) -> None:
    """Many handles (replicas, for Redis) race to pin one name to different registries:
    exactly one creates it and every caller gets that pin."""
    candidates = [UBUNTU_HUB, UBUNTU_CORP, Repository.of("quay.io", "ubuntu")] * 10
    results = await asyncio.gather(
        *(pin_stores().setdefault("ubuntu", repository) for repository in candidates)
    )
    winners = {pin.repository for pin, _ in results}
    assert len(winners) == 1
    assert sum(created for _, created in results) == 1
    assert (await pin_stores().get("ubuntu")) == results[0][0]


async def test_another_handle_sees_pins_and_removals(pin_stores: PinStores) -> None:
    await pin_stores().set("ubuntu", UBUNTU_HUB)
    other = pin_stores()
    pin = await other.get("ubuntu")
    assert pin is not None and pin.repository == UBUNTU_HUB
    assert await pin_stores().remove("ubuntu")
    assert await other.get("ubuntu") is None
