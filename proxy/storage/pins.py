"""Short-name pins: the store interface and its file-backed and in-memory implementations.

A pin records what a short name resolved to the first time (permissive mode, design §4),
so the same short name keeps meaning the same repository across restarts and search-list
changes until an operator removes the pin. Since a pin binds the name for everyone, only
the principals `PinCreators` allows (`policy.pin_creators`) create pins, and each pin
records who created it (`Creator`) and when. `PinStore` is the interface the resolver
uses; `FilePinStore` persists pins as one JSON document under the storage path (written
atomically: temporary file, fsync, rename, fsync of the directory) and notices edits
made by another process (the operator command); `proxy.storage.redis_pins` implements
the same protocol for several replicas, with a store of this module as its archive.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from proxy.errors import RegistryError, ServiceUnavailable
from proxy.names.references import Repository, looks_like_registry, validate_name, validate_registry
from proxy.policy.principal import Principal
from proxy.settings import PinCreatorGroups, PinCreatorsSetting
from proxy.storage.durable_files import write_atomically

T = TypeVar("T")
# A change to the pins: mutates the dict, returns (result, whether anything changed).
_Change = Callable[[dict[str, "Pin"]], tuple[T, bool]]

FORMAT_VERSION = 1
PINS_FILE_NAME = "pins.json"


class PinStoreError(ServiceUnavailable):
    """The pin store cannot be read or written (corrupt file, disk full)."""


@dataclass(frozen=True, slots=True)
class Creator:
    """Who created a pin: the principal and the request (its id names the audit record)."""

    user: str | None
    groups: tuple[str, ...] = ()
    client: str | None = None
    request_id: str | None = None

    @classmethod
    def of(
        cls, principal: Principal, client: str | None = None, request_id: str | None = None
    ) -> Creator:
        """The creator record of a principal's request."""
        return cls(principal.user, tuple(sorted(principal.groups)), client, request_id)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (file format and listing); `user` null is the anonymous principal."""
        return {
            "user": self.user,
            "groups": list(self.groups),
            "client": self.client,
            "request_id": self.request_id,
        }

    @classmethod
    def from_dict(cls, entry: object) -> Creator:
        """Parse the stored form (ValueError when it is not one)."""
        if not isinstance(entry, dict):
            raise ValueError("'created_by' must be an object")

        def text(key: str) -> str | None:
            value = entry.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"'created_by.{key}' must be a string or null")
            return value

        groups = entry.get("groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError("'created_by.groups' must be a list of strings")
        return cls(text("user"), tuple(groups), text("client"), text("request_id"))


@dataclass(frozen=True, slots=True)
class Pin:
    """A short name bound to a fully-qualified repository, when and by whom.

    `created` and `created_by` are None for pins written before they were recorded
    (unknown).
    """

    name: str
    repository: Repository
    created: str | None
    created_by: Creator | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (operator listing, explain); null `created`/`created_by`: unknown."""
        return {
            "name": self.name,
            "repository": str(self.repository),
            "created": self.created,
            "created_by": None if self.created_by is None else self.created_by.to_dict(),
        }


class PinCreators:
    """Who may create a pin (`policy.pin_creators`); everyone else resolves without one."""

    def __init__(self, setting: PinCreatorsSetting = "authenticated") -> None:
        self.setting = setting

    def allows(self, principal: Principal) -> bool:
        """Whether a pull by `principal` may pin the short name it resolves."""
        if isinstance(self.setting, PinCreatorGroups):
            return not principal.anonymous and bool(principal.groups & set(self.setting.groups))
        if self.setting == "anyone":
            return True
        if self.setting == "authenticated":
            return not principal.anonymous
        return False  # nobody

    def describe(self) -> str:
        """The setting in words, for explain and logs."""
        if isinstance(self.setting, PinCreatorGroups):
            return "members of " + ", ".join(self.setting.groups)
        return {
            "anyone": "anyone",
            "authenticated": "authenticated principals",
            "nobody": "nobody",
        }[self.setting]


class PinStore(Protocol):
    """Where short-name pins live. Implementations must be safe for concurrent use."""

    async def get(self, name: str) -> Pin | None:
        """The pin of a short name, if any."""
        ...

    async def set(self, name: str, repository: Repository, creator: Creator | None = None) -> Pin:
        """Pin (or re-pin) a short name."""
        ...

    async def setdefault(
        self, name: str, repository: Repository, creator: Creator | None = None
    ) -> tuple[Pin, bool]:
        """Pin a short name unless it is pinned already; the pin in force, and whether
        this call created it."""
        ...

    async def remove(self, name: str) -> bool:
        """Remove a pin; whether there was one."""
        ...

    async def list(self) -> Sequence[Pin]:
        """Every pin, sorted by name."""
        ...


def _now() -> str:
    return datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="seconds")


def new_pin(name: str, repository: Repository, creator: Creator | None = None) -> Pin:
    """A pin created now (the name checked to be a short name)."""
    return Pin(_check_name(name), repository, _now(), creator)


def parse_repository(text: str) -> Repository:
    """Parse the stored `registry/path` form of a pinned repository."""
    registry, slash, path = text.partition("/")
    if not slash or not looks_like_registry(registry):
        raise ValueError(f"{text!r} is not a fully-qualified repository")
    return Repository.of(validate_registry(registry), validate_name(path))


def _check_name(name: str) -> str:
    validate_name(name)
    if looks_like_registry(name.partition("/")[0]):
        raise ValueError(f"{name!r} is not a short name")
    return name


class MemoryPinStore:
    """Pins in a dict: for tests, and for explaining without a store on disk."""

    def __init__(self, pins: Sequence[Pin] = ()) -> None:
        self._pins = {pin.name: pin for pin in pins}

    async def get(self, name: str) -> Pin | None:
        """The pin of a short name, if any."""
        return self._pins.get(name)

    async def set(self, name: str, repository: Repository, creator: Creator | None = None) -> Pin:
        """Pin (or re-pin) a short name."""
        pin = new_pin(name, repository, creator)
        self._pins[name] = pin
        return pin

    async def setdefault(
        self, name: str, repository: Repository, creator: Creator | None = None
    ) -> tuple[Pin, bool]:
        """Pin a short name unless it is pinned already; the pin in force, and whether
        this call created it."""
        existing = self._pins.get(name)
        if existing is not None:
            return existing, False
        return await self.set(name, repository, creator), True

    async def remove(self, name: str) -> bool:
        """Remove a pin; whether there was one."""
        return self._pins.pop(name, None) is not None

    async def list(self) -> Sequence[Pin]:
        """Every pin, sorted by name."""
        return [self._pins[name] for name in sorted(self._pins)]


def _decode(data: bytes, path: Path) -> dict[str, Pin]:
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
            raise ValueError(f"expected a version {FORMAT_VERSION} pins document")
        entries = document.get("pins")
        if not isinstance(entries, dict):
            raise ValueError("'pins' must be an object")
        return {name: pin_from_entry(name, entry) for name, entry in entries.items()}
    except (ValueError, KeyError, RegistryError) as exc:
        reason = exc.message if isinstance(exc, RegistryError) else str(exc)
        # Pins decide where short names resolve: an unreadable store must not silently
        # become an empty one.
        raise PinStoreError(f"pin store {path} is corrupt: {reason}") from exc


def pin_from_entry(name: str, entry: object) -> Pin:
    """A pin from its stored form (`pin_entry`); ValueError, KeyError or RegistryError
    when it is not one."""
    if not isinstance(entry, dict):
        raise ValueError(f"pin {name!r} must be an object")
    created = entry.get("created")  # absent in early files: unknown
    creator = entry.get("created_by")
    return Pin(
        _check_name(name),
        parse_repository(str(entry["repository"])),
        str(created) if created else None,
        None if creator is None else Creator.from_dict(creator),
    )


def pin_entry(pin: Pin) -> dict[str, Any]:
    """The stored form of a pin (without its name, which is the key)."""
    entry: dict[str, Any] = {"repository": str(pin.repository)}
    if pin.created is not None:
        entry["created"] = pin.created
    if pin.created_by is not None:
        entry["created_by"] = pin.created_by.to_dict()
    return entry


def _encode(pins: dict[str, Pin]) -> bytes:
    document = {
        "version": FORMAT_VERSION,
        "pins": {name: pin_entry(pin) for name, pin in sorted(pins.items())},
    }
    return (json.dumps(document, indent=2) + "\n").encode()


_Signature = tuple[int, int, int]
_MISSING: _Signature = (0, 0, -1)
_UNKNOWN: _Signature = (0, 0, -2)


def _signature(path: Path) -> _Signature:
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return _MISSING
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class FilePinStore:
    """Pins in a JSON file, rewritten atomically on every change.

    Reads are served from memory and re-read the file when its inode, mtime or size
    changed (an operator removed a pin from another process). Writes take an exclusive
    `flock` on `<file>.lock`, re-read the file and write it back, so concurrent writers in
    several processes do not lose each other's pins.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._write_lock = asyncio.Lock()
        self._pins: dict[str, Pin] = {}
        self._seen = _UNKNOWN
        self._refresh()

    @classmethod
    def under(cls, storage_path: Path) -> FilePinStore:
        """The store at `<storage path>/pins.json` (the default location)."""
        return cls(storage_path / PINS_FILE_NAME)

    def _refresh(self) -> None:
        signature = _signature(self.path)
        if signature == self._seen:
            return
        if signature == _MISSING:
            self._pins = {}
        else:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise PinStoreError(f"cannot read pin store {self.path}: {exc.strerror}") from exc
            self._pins = _decode(data, self.path)
        self._seen = signature

    def _update(self, change: _Change[T]) -> T:
        """Run `change(pins)` under the file lock on fresh contents; persist if it changed."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._lock_path, "a+b") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                try:
                    self._seen = _UNKNOWN
                    self._refresh()
                    pins = dict(self._pins)
                    result, changed = change(pins)
                    if changed:
                        write_atomically(self.path, _encode(pins))
                        self._pins = pins
                        self._seen = _signature(self.path)
                    return result
                finally:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        except OSError as exc:
            raise PinStoreError(f"cannot write pin store {self.path}: {exc.strerror}") from exc

    async def _run(self, change: _Change[T]) -> T:
        async with self._write_lock:
            # fsync takes milliseconds: keep it off the event loop.
            return await asyncio.to_thread(self._update, change)

    async def get(self, name: str) -> Pin | None:
        """The pin of a short name, if any."""
        self._refresh()
        return self._pins.get(name)

    async def set(self, name: str, repository: Repository, creator: Creator | None = None) -> Pin:
        """Pin (or re-pin) a short name."""
        pin = new_pin(name, repository, creator)

        def change(pins: dict[str, Pin]) -> tuple[Pin, bool]:
            pins[name] = pin
            return pin, True

        return await self._run(change)

    async def setdefault(
        self, name: str, repository: Repository, creator: Creator | None = None
    ) -> tuple[Pin, bool]:
        """Pin a short name unless it is pinned already; the pin in force, and whether
        this call created it."""
        pin = new_pin(name, repository, creator)

        def change(pins: dict[str, Pin]) -> tuple[tuple[Pin, bool], bool]:
            existing = pins.get(name)
            if existing is not None:
                return (existing, False), False
            pins[name] = pin
            return (pin, True), True

        return await self._run(change)

    async def remove(self, name: str) -> bool:
        """Remove a pin; whether there was one."""

        def change(pins: dict[str, Pin]) -> tuple[bool, bool]:
            removed = pins.pop(name, None) is not None
            return removed, removed

        return await self._run(change)

    async def list(self) -> Sequence[Pin]:
        """Every pin, sorted by name."""
        self._refresh()
        return [self._pins[name] for name in sorted(self._pins)]
