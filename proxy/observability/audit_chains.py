"""The audit chains of several replicas side by side: which file belongs to which chain.

Owns `registry-gate audit verify DIR`: every replica writes its own hash chain
(`audit.path` with `{replica}`, each line naming its `replica`), rotated files included,
usually into one folder. `chains_in` sorts the files of a folder into chains (by the
replica their records name; a file with no readable record goes by its name) and orders
each chain's files by the sequence number they start at, so rotation names need not
sort; `verify_chains` verifies each chain on its own with `audit.verify`, so damage in
one replica's chain is reported for that replica only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy.observability.audit import (
    VerifyResult,
    _lines,
    _parse_record,
    format_verify_result,
    verify,
)

# What rotation appends to a file's name: the gate's own stamp, logrotate's numbers
# (`.1`) or dates (`-20240501`), and gzip.
_ROTATION_SUFFIX = re.compile(
    r"(\.\d{8}T\d{6}\.\d{6}Z(-\d+)?|\.\d+|-\d{8}(\d{2})?)?(\.gz)?$",
)
_NAME_EXTENSION = re.compile(r"\.(jsonl|json|log)$")
_UNREADABLE_SUFFIXES = (".bz2", ".xz", ".zst", ".lz4", ".zip")


@dataclass(frozen=True, slots=True)
class Chain:
    """One replica's chain: its name and its files, oldest first."""

    name: str
    files: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class _Opening:
    """What a file's first readable record says: whose chain, from which seq."""

    replica: str | None
    seq: int | None


def _opening(path: Path) -> _Opening:
    try:
        for _, raw in _lines(path):
            document = _parse_record(raw.rstrip(b"\n"))
            if document is not None:
                replica = document.get("replica")
                return _Opening(replica if isinstance(replica, str) else None, document["seq"])
    except (OSError, EOFError):
        pass  # the verifier reports it as unreadable
    return _Opening(None, None)


def _name_key(path: Path) -> str:
    """The file's name without what rotation appended (`b.jsonl.1.gz` -> `b.jsonl`)."""
    return _ROTATION_SUFFIX.sub("", path.name) or path.name


def _chain_name(key: str) -> str:
    """What a chain known only by its file name is called (`b.jsonl` -> `b`): a replica
    that has written nothing yet has the name its records will carry."""
    return _NAME_EXTENSION.sub("", key) or key


def _files(paths: Sequence[Path], notes: list[str]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            found.append(path)
            continue
        for child in sorted(path.iterdir()):
            # Hidden files are the writers' locks (`.<name>.lock`), not records.
            if child.name.startswith(".") or not child.is_file():
                continue
            if child.name.endswith(_UNREADABLE_SUFFIXES):
                notes.append(f"{child}: not read (decompress it to verify it)")
                continue
            found.append(child)
    return found


def chains_in(paths: Sequence[Path]) -> tuple[list[Chain], list[str]]:
    """The chains in these files and folders, by name, and notes on files left out."""
    notes: list[str] = []
    openings = {path: _opening(path) for path in _files(paths, notes)}
    groups: dict[str, list[Path]] = {}
    named_by_key: dict[str, str] = {}
    for path, opening in openings.items():
        if opening.replica is not None:
            groups.setdefault(opening.replica, []).append(path)
            named_by_key.setdefault(_name_key(path), opening.replica)
    for path, opening in openings.items():
        if opening.replica is None:
            # A file from a single gate (no replica in its lines), or one with no readable
            # record at all: it joins the replica whose files carry its name, if any.
            key = _name_key(path)
            groups.setdefault(named_by_key.get(key, _chain_name(key)), []).append(path)

    def oldest_first(path: Path) -> tuple[int, int, str]:
        seq = openings[path].seq
        return (0, seq, path.name) if seq is not None else (1, 0, path.name)

    chains = [Chain(name, tuple(sorted(files, key=oldest_first))) for name, files in groups.items()]
    return sorted(chains, key=lambda chain: chain.name), notes


@dataclass(frozen=True, slots=True)
class ChainsResult:
    """Each chain with its verification, and notes on files not verified."""

    chains: tuple[tuple[Chain, VerifyResult], ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return bool(self.chains) and all(result.ok for _, result in self.chains)


def verify_chains(paths: Sequence[Path], *, allow_partial: bool = False) -> ChainsResult:
    """Verify every chain in these files and folders, each on its own."""
    chains, notes = chains_in(paths)
    return ChainsResult(
        tuple((chain, verify(chain.files, allow_partial=allow_partial)) for chain in chains),
        tuple(notes),
    )


def format_chains_result(outcome: ChainsResult, where: Sequence[Path]) -> str:
    """The report of `audit verify DIR`: one block per replica, then a summary line."""
    lines = [f"note: {note}" for note in outcome.notes]
    for chain, result in outcome.chains:
        lines.append(f"replica {chain.name}:")
        lines.extend(f"  {line}" for line in format_verify_result(result).splitlines())
    failed = [chain.name for chain, result in outcome.chains if not result.ok]
    total = len(outcome.chains)
    if total == 0:
        lines.append(f"FAILED: no audit files in {', '.join(map(str, where))}")
    elif failed:
        lines.append(f"FAILED: {len(failed)} of {total} chains: {', '.join(failed)}")
    else:
        lines.append(f"OK: {total} chain{'s' if total != 1 else ''} verify")
    return "\n".join(lines)
