"""Short-name pin stores (proxy/pins.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proxy.pins import FilePinStore, MemoryPinStore, PinStore, PinStoreError
from proxy.references import Repository

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
    first = await store.setdefault("ubuntu", UBUNTU_HUB)
    second = await store.setdefault("ubuntu", UBUNTU_CORP)
    assert first == second and second.repository == UBUNTU_HUB
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
    pins = await asyncio.gather(
        *(store.setdefault("ubuntu", repo) for store, repo in [(a, UBUNTU_HUB), (b, UBUNTU_CORP)])
    )
    assert pins[0].repository == pins[1].repository


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
