"""Short-name pin stores (proxy/storage/pins.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.names.references import Repository
from proxy.policy.principal import ANONYMOUS, Principal
from proxy.settings import PinCreatorGroups
from proxy.storage.pins import (
    Creator,
    FilePinStore,
    MemoryPinStore,
    PinCreators,
    PinStore,
    PinStoreError,
)

UBUNTU_HUB = Repository.of("docker.io", "ubuntu")
UBUNTU_CORP = Repository("registry.corp.example", "ubuntu")


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> PinStore:
    if request.param == "memory":
        return MemoryPinStore()
    return FilePinStore(tmp_path / "state" / "pins.json")


async def test_get_set_remove_list(store: PinStore) -> None:
    assert await store.get("ubuntu") is None
    pin = await store.set("ubuntu", UBUNTU_HUB)
    assert pin.repository == UBUNTU_HUB and pin.name == "ubuntu" and pin.created
    assert await store.get("ubuntu") == pin
    await store.set("team/app", Repository("quay.io", "team/app"))
    assert [p.name for p in await store.list()] == ["team/app", "ubuntu"]
    assert await store.remove("ubuntu") is True
    assert await store.remove("ubuntu") is False
    assert await store.get("ubuntu") is None


async def test_setdefault_keeps_the_first_pin(store: PinStore) -> None:
    first, created = await store.setdefault("ubuntu", UBUNTU_HUB)
    second, again = await store.setdefault("ubuntu", UBUNTU_CORP)
    assert first == second and second.repository == UBUNTU_HUB
    assert created and not again
    # set() is the operator's explicit re-pin.
    assert (await store.set("ubuntu", UBUNTU_CORP)).repository == UBUNTU_CORP


async def test_names_must_be_short(store: PinStore) -> None:
    with pytest.raises(ValueError, match="not a short name"):
        await store.set("quay.io/x", UBUNTU_HUB)


async def test_file_store_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    await FilePinStore(path).set("ubuntu", UBUNTU_HUB)
    reopened = FilePinStore(path)
    pin = await reopened.get("ubuntu")
    assert pin is not None and pin.repository == UBUNTU_HUB
    document = json.loads(path.read_text())
    assert document == {
        "version": 1,
        "pins": {"ubuntu": {"repository": "docker.io/library/ubuntu", "created": pin.created}},
    }
    # Only the document and its lock file: no temporary file left behind.
    assert _names(tmp_path) == ["pins.json", "pins.json.lock"]


async def test_file_store_sees_another_process_edit(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    server, operator = FilePinStore(path), FilePinStore(path)
    await server.set("ubuntu", UBUNTU_HUB)
    await server.set("alpine", Repository.of("docker.io", "alpine"))
    assert await operator.remove("ubuntu")
    assert await server.get("ubuntu") is None
    # The server's next write does not resurrect the removed pin.
    await server.set("redis", Repository.of("docker.io", "redis"))
    assert [p.name for p in await operator.list()] == ["alpine", "redis"]
    path.unlink()
    assert await server.list() == []


async def test_concurrent_first_pins_agree(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    a, b = FilePinStore(path), FilePinStore(path)
    (first, one), (second, other) = await asyncio.gather(
        *(store.setdefault("ubuntu", repo) for store, repo in [(a, UBUNTU_HUB), (b, UBUNTU_CORP)])
    )
    assert first.repository == second.repository and one != other  # exactly one created it


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"version": 2, "pins": {}}',
        '{"version": 1, "pins": []}',
        '{"version": 1, "pins": {"ubuntu": {"repository": "ubuntu"}}}',
        '{"version": 1, "pins": {"quay.io/x": {"repository": "quay.io/x"}}}',
        '{"version": 1, "pins": {"ubuntu": {}}}',
    ],
)
def test_corrupt_file_is_an_error_not_an_empty_store(tmp_path: Path, content: str) -> None:
    path = tmp_path / "pins.json"
    path.write_text(content)
    with pytest.raises(PinStoreError, match="is corrupt") as raised:
        FilePinStore(path)
    assert raised.value.status == 503


def test_default_location_under_storage(tmp_path: Path) -> None:
    assert FilePinStore.under(tmp_path).path == tmp_path / "pins.json"


async def test_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = FilePinStore(blocker / "pins.json")
    with pytest.raises(PinStoreError, match="cannot write pin store"):
        await store.set("ubuntu", UBUNTU_HUB)


ALICE = Principal("alice", frozenset({"platform"}))
BOB = Principal("bob")


async def test_the_creator_is_stored_and_listed(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    creator = Creator.of(ALICE, "10.0.0.7", "req-1")
    await FilePinStore(path).setdefault("ubuntu", UBUNTU_HUB, creator)
    (pin,) = await FilePinStore(path).list()
    assert pin.created_by == creator and pin.created
    assert pin.to_dict()["created_by"] == {
        "user": "alice",
        "groups": ["platform"],
        "client": "10.0.0.7",
        "request_id": "req-1",
    }
    entry = json.loads(path.read_text())["pins"]["ubuntu"]
    assert entry["created_by"]["user"] == "alice"


async def test_pins_written_before_creators_were_recorded_read_as_unknown(
    tmp_path: Path,
) -> None:
    path = tmp_path / "pins.json"
    path.write_text(
        '{"version": 1, "pins": {"ubuntu": {"repository": "docker.io/library/ubuntu"}, '
        '"alpine": {"repository": "docker.io/library/alpine", "created": "2024-05-01T12:00:00"}}}'
    )
    store = FilePinStore(path)
    listed = {pin.name: pin.to_dict() for pin in await store.list()}
    assert listed["ubuntu"]["created"] is None and listed["ubuntu"]["created_by"] is None
    assert listed["alpine"]["created"] == "2024-05-01T12:00:00"
    # A later write keeps them as they were (no invented creator).
    await store.set("redis", Repository.of("docker.io", "redis"), Creator.of(BOB))
    entries = json.loads(path.read_text())["pins"]
    assert entries["ubuntu"] == {"repository": "docker.io/library/ubuntu"}


def test_a_malformed_creator_is_a_corrupt_store(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    path.write_text(
        '{"version": 1, "pins": {"ubuntu": {"repository": "docker.io/library/ubuntu", '
        '"created_by": {"user": 7}}}}'
    )
    with pytest.raises(PinStoreError, match=r"created_by\.user"):
        FilePinStore(path)


@pytest.mark.parametrize(
    ("setting", "anonymous", "bob", "alice"),
    [
        ("authenticated", False, True, True),
        ("anyone", True, True, True),
        ("nobody", False, False, False),
        (PinCreatorGroups(groups=["platform"]), False, False, True),
    ],
)
def test_who_may_create_pins(setting: Any, anonymous: bool, bob: bool, alice: bool) -> None:
    creators = PinCreators(setting)
    assert [creators.allows(p) for p in (ANONYMOUS, BOB, ALICE)] == [anonymous, bob, alice]
    assert creators.describe()


def test_the_default_is_authenticated_principals() -> None:
    assert not PinCreators().allows(ANONYMOUS) and PinCreators().allows(BOB)
