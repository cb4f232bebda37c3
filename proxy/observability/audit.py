"""The audit log: one hash-chained JSON line per decision-bearing request, and its verifier.

Owns the record (`AuditRecord`), the writer (`AuditLog`: a queue drained by one dedicated
thread into a rotation-safe file and optional stream sinks such as stdout) and the checker
behind `registry-gate audit verify` (`verify`, `format_verify_result`).

Chain format. A line is the canonical JSON (sorted keys, no spaces, ASCII) of the record's
fields plus `seq` (1, 2, 3, ... continuing across files) and `prev` (the `hash` of the
record before it, `null` only where a chain starts), with one more key appended last:
`hash`, `sha256:<hex>` of exactly those canonical bytes. So `hash` pins the line's bytes,
and the writer serialises each record once. The first line of a file that continues
a chain carries `prev_file` ({path, inode}: where the predecessor was written) as a hint
for the auditor. A write interrupted by a crash or power cut can leave an incomplete last
line; the writer never deletes it: on reopening it terminates it and writes an
`audit_recovery` record whose `torn` field ({length, sha256}) accounts for those bytes.

A hash chain without a key shows an edit, deletion, insertion or reordering unless the
editor rewrites every later line too, and it cannot show the loss of the final lines;
`verify` prints the chain head (seq and hash) so it can be compared with a copy kept
elsewhere (the stdout sink shipped to a log collector is such a copy).

Several replicas. Each replica writes its own chain (`{replica}` in `audit.path`), and
when the gate runs as several (`redis` set, or that placeholder) every line carries
`replica`, so merged copies (a collector's) can be split per chain again. A replica
claims its file with a lock beside it and refuses to start when another process holds
it: two writers of one chain would fork it. `audit_chains` verifies a folder of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import gzip
import hashlib
import json
import logging
import os
import socket
import stat
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO, Literal, Protocol

from proxy.errors import ServiceUnavailable
from proxy.observability.metrics import Metrics
from proxy.policy.principal import ANONYMOUS, Principal
from proxy.settings import AuditSettings, Settings
from proxy.storage.durable_files import fsync_dir

logger = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
RECOVERY_EVENT = "audit_recovery"
_CHAIN_KEYS = frozenset({"seq", "prev", "hash"})
# A damaged tail longer than this is not a torn write: the file is not an audit log.
_MAX_TORN_BYTES = 1024 * 1024
_TAIL_WINDOW = 64 * 1024
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")


class Event(StrEnum):
    """What an audit record is about."""

    MANIFEST_PULL = "manifest_pull"
    MANIFEST_HEAD = "manifest_head"
    BLOB_PUSH = "blob_push"
    PUSH = "push"
    DELETE = "delete"
    DENIAL = "denial"
    RESOLUTION = "resolution"
    PIN_CREATED = "pin_created"
    STALE_SERVE = "stale_serve"
    LOGIN_FAILURE = "login_failure"
    RECOVERY = RECOVERY_EVENT


class Decision(StrEnum):
    """The policy outcome recorded (`audit-deny`: a `mode: audit` rule would have denied)."""

    ALLOW = "allow"
    DENY = "deny"
    AUDIT_DENY = "audit-deny"


def rfc3339(timestamp: float) -> str:
    """Epoch seconds as RFC 3339 UTC with milliseconds (`2024-05-01T12:00:00.123Z`)."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """One audited decision; every field but `event` is optional (null in the line).

    `time` is taken when the record is made (epoch seconds, written as RFC 3339 UTC by
    the writer thread, which keeps the formatting off the request path). The writer reads
    `extra` later, in its thread: hand over a mapping nobody changes afterwards.
    """

    event: str
    action: str | None = None
    time: float = field(default_factory=time.time)
    request_id: str | None = None
    client: str | None = None
    principal: Principal = ANONYMOUS
    name: str | None = None
    resolved: str | None = None
    digest: str | None = None
    decision: str | None = None
    rule: str | None = None
    upstream: str | None = None
    status: int | None = None
    bytes: int | None = None
    reason: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON fields of the line (without the chain keys); `extra` only when set."""
        fields: dict[str, Any] = {
            "time": rfc3339(self.time),
            "request_id": self.request_id,
            "client": self.client,
            "principal": {
                "user": self.principal.user,
                "groups": sorted(self.principal.groups),
            },
            "action": None if self.action is None else str(self.action),
            "event": str(self.event),
            "name": self.name,
            "resolved": self.resolved,
            "digest": self.digest,
            "decision": None if self.decision is None else str(self.decision),
            "rule": self.rule,
            "upstream": self.upstream,
            "status": self.status,
            "bytes": self.bytes,
            "reason": self.reason,
        }
        if self.extra:
            fields["extra"] = dict(self.extra)
        return fields


# --- the chain ---------------------------------------------------------------------------


def _canonical(document: Mapping[str, Any]) -> bytes:
    # default=str makes odd values (Path, frozenset) strings, which re-serialise identically,
    # so the verifier's canonical form of a parsed line equals the bytes written.
    return json.dumps(
        document,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
        default=str,
    ).encode("ascii")


def _sha256(data: bytes) -> str:
    return HASH_PREFIX + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class _Head:
    """The last record of a chain: its sequence number and hash (None before the first)."""

    seq: int = 0
    hash: str | None = None


def _sealed(encoded_body: bytes, digest: str) -> bytes:
    """A line without its newline: the canonical body with `hash` appended as last key."""
    return encoded_body[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}'


def _seal(fields: Mapping[str, Any], head: _Head) -> tuple[bytes, _Head]:
    """The line for `fields` appended after `head`, and the new head."""
    body = {**fields, "seq": head.seq + 1, "prev": head.hash}
    try:
        encoded = _canonical(body)
    except ValueError:
        # NaN or infinity in `extra`: keep the record, lose only the unencodable detail.
        body["extra"] = {"unencodable": repr(fields.get("extra"))[:2000]}
        encoded = _canonical(body)
    digest = _sha256(encoded)
    return _sealed(encoded, digest) + b"\n", _Head(head.seq + 1, digest)


def _parse_record(text: bytes) -> dict[str, Any] | None:
    """The record on a line (without its newline) if it is a sound chain record, else None.

    Sound: JSON with `seq`, `prev`, `hash` of the right types; whether the hash matches is
    checked separately (`_hash_problem`) so that an edit is told apart from garbage.
    """
    try:
        document = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(document, dict) or not document.keys() >= _CHAIN_KEYS:
        return None
    seq, prev, digest = document["seq"], document["prev"], document["hash"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return None
    if not (prev is None or isinstance(prev, str)) or not isinstance(digest, str):
        return None
    return document


def _hash_problem(text: bytes, document: dict[str, Any]) -> str | None:
    """Why a parsed record's bytes do not match its `hash`, or None when they do."""
    body = {key: value for key, value in document.items() if key != "hash"}
    try:
        encoded = _canonical(body)
    except ValueError:
        return "the line holds values a writer never produces (NaN or infinity)"
    if _sha256(encoded) != document["hash"]:
        return "its content does not match its hash (the line was edited)"
    if _sealed(encoded, document["hash"]) != text:
        return "the line is not in the canonical form it was written in (it was rewritten)"
    return None


def _sound(text: bytes) -> dict[str, Any] | None:
    document = _parse_record(text)
    if document is None or _hash_problem(text, document) is not None:
        return None
    return document


@dataclass(frozen=True, slots=True)
class _Tail:
    """What ends a file: its last sound record (if any) and the damaged bytes after it."""

    record: dict[str, Any] | None
    torn: bytes


def _read_tail(read_at: Callable[[int, int], bytes], size: int, where: Path) -> _Tail:
    """Find the last sound record of a file of `size` bytes read by `read_at(length, offset)`."""
    window = _TAIL_WINDOW
    while True:
        start = max(0, size - window)
        data = read_at(size - start, start)
        # Complete lines end with b"\n"; walk them backwards from the end of the file.
        cut = data.rfind(b"\n")
        while cut >= 0:
            begin = data.rfind(b"\n", 0, cut) + 1
            if begin == 0 and start > 0:
                break  # this line may start before the window: read a larger one
            document = _sound(data[begin:cut])
            if document is not None:
                return _Tail(document, data[cut + 1 :])
            cut = begin - 1
        if start == 0 and size <= _MAX_TORN_BYTES:
            return _Tail(None, data)
        if size - start > _MAX_TORN_BYTES:
            raise AuditLogError(
                f"{where}: does not end with an audit record (none in its last "
                f"{size - start} bytes): it is not an audit log, or it is damaged; move it "
                "aside and keep it for the auditor"
            )
        window *= 4


def _file_tail(path: Path) -> _Tail | None:
    """The tail of a closed file, or None when it cannot be read."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            return _read_tail(lambda n, off: os.pread(handle.fileno(), n, off), size, path)
    except (OSError, AuditLogError):
        return None


# --- writing ----------------------------------------------------------------------------


class AuditLogError(Exception):
    """The audit log cannot be opened or continued (the gate must not run without it)."""


class AuditUnavailable(ServiceUnavailable):
    """503: the audit log cannot be written and `audit.on_failure` is `fail_closed`.

    The message is for clients: it names no path or error (those go to the log and
    `/readyz`).
    """

    def __init__(self) -> None:
        super().__init__(
            "the gate cannot write its audit log, so it refuses requests it could not "
            "record; retry later"
        )


def _recovery(torn: bytes, replica: str | None) -> dict[str, Any]:
    """The fields of the record that accounts for the bytes of an interrupted write."""
    recovery = _stamped(
        AuditRecord(
            event=Event.RECOVERY,
            reason="a write was interrupted (crash, power loss or a full disk); "
            "the bytes in `torn` precede this record",
        ).to_dict(),
        replica,
    )
    recovery["torn"] = {"length": len(torn), "sha256": _sha256(torn)}
    return recovery


def _stamped(fields: dict[str, Any], replica: str | None) -> dict[str, Any]:
    """`fields` naming the replica whose chain they join (when the gate runs as several)."""
    if replica is not None:
        fields["replica"] = replica
    return fields


def _torn_prefix(torn: bytes) -> bytes:
    """What terminates damaged bytes before the next line (a newline unless they end so)."""
    return b"" if torn[-1:] == b"\n" else b"\n"


class LineSink(Protocol):
    """Where finished lines go (stdout, a test buffer): whole lines, in order.

    A sink may have `torn` (bytes): what a failed write left in the stream since the
    last whole write; the log accounts for them with a recovery record when the sink is
    the sink of record.
    """

    def write(self, data: bytes) -> None:
        """Write one or more complete lines."""

    def close(self) -> None:
        """Flush; the sink's owner closes the underlying stream."""


class StreamSink:
    """A binary stream sink (stdout): a copy beside the file, or the sink of record without one.

    Lines go to the unbuffered stream under a buffered one (`raw`), so a failed write
    leaves nothing in a buffer to be written again after the retry (a duplicated line).
    """

    def __init__(self, stream: BinaryIO | IO[bytes]) -> None:
        self._stream = stream
        self.torn = b""

    def write(self, data: bytes) -> None:
        """Write whole lines now, so a collector reading the pipe sees them at once."""
        # Unbuffered (`raw`, or the stream itself under PYTHONUNBUFFERED): a short write
        # is seen, and a failed one leaves nothing buffered to be written twice.
        target = getattr(self._stream, "raw", self._stream)
        if target is not self._stream:
            self._stream.flush()  # anything buffered earlier goes first
        done = 0
        try:
            while done < len(data):
                written = target.write(data[done:])
                if not written:
                    raise OSError("the stream accepted no bytes")
                done += written
        except BaseException:
            self.torn += data[:done]  # a full disk took part of the line
            raise
        self.torn = b""

    def close(self) -> None:
        """Flush what is buffered; stdout itself stays open."""
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


class _ChainedFile:
    """The file of record: appends whole lines, follows rotation, keeps the chain going.

    Used only from the writer thread. Before each batch `sync` compares the open file with
    the path: a rename or deletion (logrotate `create`), truncation (`copytruncate`), our
    own size limit, or bytes written by someone else are each handled before the next line.
    """

    def __init__(
        self, path: Path, *, rotate_bytes: int | None, fsync: bool, replica: str | None = None
    ) -> None:
        self.path = path.absolute()  # `prev_file` hints must outlive a change of directory
        self._replica = replica
        self._lock_fd: int | None = None
        self._rotate_bytes = rotate_bytes
        self._fsync = fsync
        self._fd: int | None = None
        self._identity: tuple[int, int] = (0, 0)
        self._size = 0
        self._dirty = False  # a write failed: the file, not memory, says where the chain is
        self._hint: dict[str, Any] | None = None  # `prev_file` of the next record
        self._torn: bytes | None = None  # damaged tail to account for before the next record

    def lock(self) -> None:
        """Claim the file for this process: a second writer would fork the chain.

        An advisory lock on a hidden file beside it (`.<name>.lock`), held until
        `release`; the kernel drops it when the process dies, so a crash leaves no stale
        lock. It is what stops two replicas configured with one `replica.id` (or one
        `audit.path` without `{replica}` on a shared volume) from writing one file.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise AuditLogError(
                f"{self.path}: another process writes this audit log ({holder}); two writers "
                "would fork its hash chain. Give each replica its own replica.id and put "
                "{replica} in audit.path"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        who = f"pid {os.getpid()} on {socket.gethostname()}"
        if self._replica is not None:
            who += f", replica {self._replica}"
        with contextlib.suppress(OSError):  # the holder's name is only for the message
            os.ftruncate(fd, 0)
            os.pwrite(fd, who.encode() + b"\n", 0)
        self._lock_fd = fd

    def release(self) -> None:
        """Close the file and give up the claim on it."""
        self.close()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)

    def sync(self, head: _Head) -> _Head:
        """Reconcile with the file on disk before a batch; returns the head to continue."""
        if self._fd is not None and not self._dirty:
            self._follow_rotation()
        if self._fd is None:
            return self._open(head)
        if self._dirty:
            return self._reload(head)
        return head

    def _follow_rotation(self) -> None:
        assert self._fd is not None
        try:
            on_path = os.stat(self.path)
            moved = (on_path.st_dev, on_path.st_ino) != self._identity
        except FileNotFoundError:
            moved = True
        if moved:
            logger.info("audit log %s was rotated away; starting a new file", self.path)
            self._retire({"path": str(self.path), "inode": self._identity[1]})
            return
        size = os.fstat(self._fd).st_size
        if size == 0 and self._size > 0:
            logger.info("audit log %s was truncated in place (copytruncate)", self.path)
            self._hint = {"path": str(self.path), "inode": self._identity[1], "truncated": True}
            self._size = 0
        elif size != self._size:
            logger.warning(
                "audit log %s changed under the gate; continuing from its end", self.path
            )
            self._dirty = True
        elif self._rotate_bytes is not None and size >= max(self._rotate_bytes, 1):
            self._rotate()

    def _rotate(self) -> None:
        # Microseconds: names sort in rotation order and do not collide in practice.
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        suffix = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.{stamp}-{suffix}")
            suffix += 1
        os.rename(self.path, target)
        logger.info("audit log %s reached its size limit; rotated to %s", self.path, target)
        self._retire({"path": str(target), "inode": self._identity[1]})

    def _retire(self, hint: dict[str, Any]) -> None:
        self.close()
        self._hint = hint

    def _open(self, head: _Head) -> _Head:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        status = os.fstat(fd)
        self._fd, self._identity, self._size = fd, (status.st_dev, status.st_ino), 0
        if status.st_size > 0:
            return self._reload(head)
        self._sync_directory()
        if head.hash is None and self._hint is None:
            return self._find_predecessor(head)
        return head

    def _reload(self, head: _Head) -> _Head:
        """Continue from the file's own last record (after a restart or a failed write)."""
        assert self._fd is not None
        fd = self._fd
        self._size = os.fstat(fd).st_size
        try:
            tail = _read_tail(lambda n, off: os.pread(fd, n, off), self._size, self.path)
        except AuditLogError:
            self.close()
            raise
        self._dirty = False
        self._torn = tail.torn or None
        if tail.torn:
            logger.warning(
                "audit log %s ends with %d bytes of an interrupted write; recording a recovery",
                self.path,
                len(tail.torn),
            )
        if tail.record is not None:
            self._hint = None  # the file continues its own chain, in the file itself
            return _Head(tail.record["seq"], tail.record["hash"])
        if head.hash is None and self._hint is None:
            return self._find_predecessor(head)
        return head

    def _find_predecessor(self, head: _Head) -> _Head:
        """Link a new file to the newest rotated sibling (rotated while the gate was down)."""
        candidates: list[tuple[float, int, Path]] = []
        for sibling in self.path.parent.glob(f"{glob.escape(self.path.name)}[.-]*"):
            if sibling.name.endswith(_COMPRESSED_SUFFIXES):
                continue
            with contextlib.suppress(OSError):
                status = sibling.stat()
                if stat.S_ISREG(status.st_mode) and status.st_size > 0:
                    candidates.append((status.st_mtime, status.st_ino, sibling))
        for _, inode, sibling in sorted(candidates, reverse=True):
            tail = _file_tail(sibling)
            if tail is not None and tail.record is not None:
                logger.info("audit log %s continues the chain of %s", self.path, sibling)
                self._hint = {"path": str(sibling), "inode": inode}
                return _Head(tail.record["seq"], tail.record["hash"])
        return head

    def append(self, fields: Mapping[str, Any], head: _Head) -> tuple[list[bytes], _Head]:
        """Append one record (after a recovery record if one is owed); lines and new head."""
        lines: list[bytes] = []
        if self._torn is not None:
            torn = self._torn
            recovery = _recovery(torn, self._replica)
            line, head = self._append_line(recovery, head, prefix=_torn_prefix(torn))
            self._torn = None
            lines.append(line)
        line, head = self._append_line(fields, head)
        lines.append(line)
        return lines, head

    def _append_line(
        self, fields: Mapping[str, Any], head: _Head, prefix: bytes = b""
    ) -> tuple[bytes, _Head]:
        if self._hint is not None:
            fields = {**fields, "prev_file": self._hint}
        line, new_head = _seal(fields, head)
        self._write(prefix + line)
        self._hint = None
        return line, new_head

    def _write(self, data: bytes) -> None:
        # One os.write per line on an O_APPEND descriptor: lines never interleave and a
        # crash can tear only the last line, which `_reload` then accounts for.
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except BaseException:
            self._dirty = True
            raise
        self._size += len(data)

    def commit(self) -> None:
        """Make the batch durable (one fdatasync per batch: a group commit)."""
        if self._fd is not None and self._fsync:
            os.fdatasync(self._fd)

    def _sync_directory(self) -> None:
        if self._fsync:
            fsync_dir(self.path.parent)

    def close(self) -> None:
        """Close the descriptor (the next `sync` opens the path again)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


OnFailure = Literal["fail_closed", "fail_open"]
# Backoff between attempts at a failing batch; the retry is the probe that notices the
# log works again, so the cap is also how long recovery may take to be noticed.
_RETRY_FIRST, _RETRY_CAP = 0.05, 1.0


class AuditLog:
    """Writes audit records without blocking the event loop, and never hangs a request.

    `write` puts a record on a bounded queue; a task hands batches to one dedicated thread,
    which chains, writes and fsyncs them. A failing batch (disk full, EIO, permissions) is
    retried with backoff, and every record queued before the failure stays queued: the
    retry is the probe, and the log is healthy again as soon as one succeeds.

    While the log is unhealthy (`problem`: the last write failed, a write has not
    finished for `stall_after` seconds, or the queue stayed full for `queue_wait`
    seconds), a new record is not queued. `on_failure` says what happens to it:
    `fail_closed` raises `AuditUnavailable` (503, and the gatekeeper refuses requests
    before doing any work: see `check_available`), `fail_open` lets the request proceed.
    Either way the record is never lost silently: it is logged (CRITICAL, with its
    fields) and counted in `registry_gate_audit_dropped_total`. Closing waits at most
    `drain_timeout` seconds (none when the log is failing), then logs and counts what
    is left.

    Lifecycle (aiohttp `cleanup_ctx`): `async with AuditLog.from_settings(...) as audit:
    app[AUDIT] = audit; yield`; or call `start()` and `close()`.
    """

    def __init__(
        self,
        *,
        path: Path | None = None,
        sinks: Sequence[LineSink] = (),
        rotate_bytes: int | None = None,
        fsync: bool = True,
        queue_size: int = 4096,
        batch_size: int = 256,
        drain_timeout: float = 5.0,
        on_failure: OnFailure = "fail_closed",
        queue_wait: float = 2.0,
        stall_after: float = 10.0,
        metrics: Metrics | None = None,
        replica: str | None = None,
    ) -> None:
        self._file = (
            None
            if path is None
            else _ChainedFile(path, rotate_bytes=rotate_bytes, fsync=fsync, replica=replica)
        )
        # Set when the gate runs as several replicas: every line names its chain, so a
        # collector merging the stdout of all replicas can split them again.
        self._replica = replica
        self._sinks = list(sinks)
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._drain_timeout = drain_timeout
        self._on_failure = on_failure
        self._queue_wait = queue_wait
        self._stall_after = stall_after
        self._metrics = metrics
        self._head = _Head()  # touched only by the writer thread
        self._queue: asyncio.Queue[AuditRecord] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pump: asyncio.Task[None] | None = None
        self._closed = False
        self._last_error: str | None = None
        # The batch being written (the writer thread removes records as they are written)
        # and since when: a write that does not return is a failure too (a stalled pipe).
        self._batch: deque[AuditRecord] = deque()
        self._batch_since: float | None = None

    @classmethod
    def from_settings(
        cls,
        settings: AuditSettings,
        *,
        metrics: Metrics | None = None,
        stdout: BinaryIO | IO[bytes] | None = None,
        replica: str | None = None,
    ) -> AuditLog:
        """The audit log configured by `audit:` in gate.yaml (`path`, `stdout`, `on_failure`).

        `replica` (this process's `replica.id`, when it is one of several) replaces
        `{replica}` in the path and is recorded in every line; a path with `{replica}`
        needs it.
        """
        sinks: list[LineSink] = []
        if settings.stdout:
            sinks.append(StreamSink(stdout if stdout is not None else sys.stdout.buffer))
        if settings.per_replica and replica is None:
            raise ValueError("audit.path names {replica}: pass the replica id")
        path = None if replica is None else settings.file_for(replica)
        return cls(
            path=settings.path if path is None else path,
            sinks=sinks,
            on_failure=settings.on_failure,
            metrics=metrics,
            replica=replica,
        )

    @classmethod
    def for_gate(cls, settings: Settings, *, metrics: Metrics | None = None) -> AuditLog:
        """The gate's audit log: its lines name the replica when the gate runs as several
        (shared state in `redis`, or `{replica}` in `audit.path`)."""
        several = settings.redis is not None or settings.audit.per_replica
        return cls.from_settings(
            settings.audit, metrics=metrics, replica=settings.replica.id if several else None
        )

    @property
    def enabled(self) -> bool:
        """Whether any sink is configured (without one, records are discarded)."""
        return self._file is not None or bool(self._sinks)

    @property
    def on_failure(self) -> OnFailure:
        """What a request gets while the log cannot be written (`audit.on_failure`)."""
        return self._on_failure

    @property
    def last_error(self) -> str | None:
        """The error of the last failed write, None once writing works."""
        return self._last_error

    @property
    def problem(self) -> str | None:
        """Why the log cannot be written now (for /readyz), or None while it can."""
        if self._last_error is not None:
            return self._last_error
        since = self._batch_since
        if since is not None and time.monotonic() - since > self._stall_after:
            return f"an audit write has not finished for {time.monotonic() - since:.0f} s"
        return None

    @property
    def refusing(self) -> bool:
        """Whether requests are refused now (`fail_closed` and the log cannot be written)."""
        return self._on_failure == "fail_closed" and self.enabled and self.problem is not None

    def check_available(self) -> None:
        """Raise `AuditUnavailable` when a decision now could not be recorded (fail_closed).

        Called before a request does any work, so a refused request costs nothing.
        """
        if self.refusing:
            raise AuditUnavailable()

    @property
    def pending(self) -> int:
        """Records queued and not yet written."""
        return 0 if self._queue is None else self._queue.qsize()

    async def start(self) -> None:
        """Open the file (continuing its chain) and start the writer; raises AuditLogError."""
        if self._pump is not None:
            raise RuntimeError("AuditLog.start() called twice")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-writer")
        loop = asyncio.get_running_loop()
        if self._file is not None:
            chained = self._file

            def open_file() -> None:
                # One of several replicas: its chain is its own, so a second writer is a
                # misconfiguration. A single gate keeps continuing what another writer
                # appended (a one-off command) rather than refusing it.
                if self._replica is not None:
                    chained.lock()
                try:
                    self._head = chained.sync(self._head)
                except BaseException:
                    chained.release()
                    raise

            try:
                await loop.run_in_executor(self._executor, open_file)
            except BaseException:
                self._executor.shutdown(wait=False)
                self._executor = None
                raise
        self._queue = asyncio.Queue(maxsize=self._queue_size)
        self._pump = asyncio.create_task(self._run(), name="audit-writer")

    async def write(self, record: AuditRecord) -> None:
        """Queue a record; waits at most `queue_wait` seconds, and only while healthy.

        Raises `AuditUnavailable` (fail_closed) when the record cannot be queued; with
        fail_open the request goes on. Either way the record is logged and counted.
        """
        if not self.enabled:
            return
        if self._closed or self._queue is None:
            # Not silently: a record after close is a lifecycle bug, and the line is kept here.
            logger.error(
                "audit record written while the audit log is not running",
                extra={"audit": record.to_dict()},
            )
            self._count_dropped("closed")
            return
        problem = self.problem
        if problem is None:
            try:
                self._queue.put_nowait(record)
                return
            except asyncio.QueueFull:
                pass
            try:
                # A healthy log that is behind (a burst): wait a little, never indefinitely.
                await asyncio.wait_for(self._queue.put(record), self._queue_wait)
                return
            except TimeoutError:
                problem = f"the audit queue stayed full for {self._queue_wait:g} s"
        self._unrecorded(record, problem)

    def _unrecorded(self, record: AuditRecord, problem: str) -> None:
        """A record that cannot be queued: logged and counted; raises when fail_closed."""
        logger.critical(
            "audit record not written (%s; audit.on_failure: %s)",
            problem,
            self._on_failure,
            extra={"audit": record.to_dict()},
        )
        refused = self._on_failure == "fail_closed"
        self._count_dropped("refused" if refused else "failing")
        if refused:
            raise AuditUnavailable()

    def _count_dropped(self, reason: str, count: int = 1) -> None:
        if self._metrics is not None and count:
            self._metrics.audit_dropped.labels(reason).inc(count)

    async def flush(self) -> None:
        """Wait until every record queued so far is written."""
        if self._queue is not None:
            await self._queue.join()

    async def close(self) -> None:
        """Drain the queue (at most `drain_timeout` s, not at all while failing), then stop.

        What is still unwritten then is logged (CRITICAL, each record with its fields)
        and counted as dropped (`shutdown`): a shutdown never waits on a broken disk.
        """
        if self._closed:
            return
        self._closed = True
        if self._queue is not None and self.problem is None:
            # What is left after the deadline is reported below.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), self._drain_timeout)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        stuck = False
        if self._executor is not None:
            # Queued behind any batch still running, so the file closes after it; a writer
            # stuck in a write (a pipe nobody reads) is not waited for.
            closing = self._executor.submit(self._close_sinks)
            try:
                await asyncio.wait_for(asyncio.wrap_future(closing), self._drain_timeout)
            except TimeoutError:
                stuck = True
            self._executor.shutdown(wait=False)
        self._report_unwritten(stuck)

    def _report_unwritten(self, stuck: bool) -> None:
        unwritten = list(self._batch)
        self._batch = deque()
        while self._queue is not None and not self._queue.empty():
            unwritten.append(self._queue.get_nowait())
        if not unwritten:
            return
        logger.critical(
            "audit log closed with %d records unwritten (%s); each follows",
            len(unwritten),
            "the writer is stuck in a write" if stuck else self.problem or "drain timed out",
        )
        for record in unwritten:
            logger.critical("unwritten audit record", extra={"audit": record.to_dict()})
        self._count_dropped("shutdown", len(unwritten))

    async def __aenter__(self) -> AuditLog:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self) -> None:
        assert self._queue is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            batch = deque([await queue.get()])
            while len(batch) < self._batch_size and not queue.empty():
                batch.append(queue.get_nowait())
            taken, delay = len(batch), _RETRY_FIRST
            self._batch, self._batch_since = batch, time.monotonic()
            while batch:
                try:
                    await loop.run_in_executor(self._executor, self._write_batch, batch)
                    if self._last_error is not None:
                        logger.warning("audit log writable again")
                    self._last_error = None
                except Exception as exc:
                    self._note_failure(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_CAP)
            self._batch_since = None
            for _ in range(taken):
                queue.task_done()

    def _note_failure(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if message != self._last_error:
            logger.error("audit log write failed, retrying: %s", message)
        self._last_error = message
        if self._metrics is not None:
            self._metrics.audit_write_errors.inc()

    def _write_batch(self, batch: deque[AuditRecord]) -> None:
        """Writer thread: chain and write records, removing each from `batch` once written.

        Without a file the first sink is the sink of record: its failure fails the batch
        (retried) like a file's would; the other sinks are best-effort copies.
        """
        mirrored: list[bytes] = []
        primary = None if self._file is not None or not self._sinks else self._sinks[0]
        try:
            if self._file is not None:
                self._head = self._file.sync(self._head)
            while batch:
                fields = _stamped(batch[0].to_dict(), self._replica)
                if self._file is not None:
                    lines, self._head = self._file.append(fields, self._head)
                else:
                    lines = []
                    torn: bytes = getattr(primary, "torn", b"")
                    if primary is not None and torn:
                        line, head = _seal(_recovery(torn, self._replica), self._head)
                        primary.write(_torn_prefix(torn) + line)
                        self._head = head
                        lines.append(line)
                    line, head = _seal(fields, self._head)
                    if primary is not None:
                        primary.write(line)  # raises: the record stays first in the batch
                    self._head = head
                    lines.append(line)
                batch.popleft()
                mirrored.extend(lines)
            if self._file is not None:
                self._file.commit()
        finally:
            if mirrored:
                self._mirror(b"".join(mirrored), skip=primary)
                if self._metrics is not None:
                    self._metrics.audit_records.inc(len(mirrored))

    def _mirror(self, data: bytes, skip: LineSink | None) -> None:
        for sink in self._sinks:
            if sink is skip:
                continue
            try:
                sink.write(data)
            except Exception as exc:
                # Best effort: a closed stdout must not stop the file of record.
                logger.error("audit sink %r failed: %s", sink, exc)
                if self._metrics is not None:
                    self._metrics.audit_write_errors.inc()

    def _close_sinks(self) -> None:
        if self._file is not None:
            self._file.release()
        for sink in self._sinks:
            sink.close()


# --- verifying --------------------------------------------------------------------------


class Problem(StrEnum):
    """Kinds of damage `verify` reports."""

    EDITED = "edited"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"
    CHAIN_BREAK = "chain-break"
    TRUNCATED = "truncated"
    MALFORMED = "malformed"
    MISSING_PREDECESSOR = "missing-predecessor"
    UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True)
class VerifyFailure:
    """The first bad line: where, what kind, and an explanation for the auditor."""

    path: Path
    line: int
    kind: Problem
    message: str

    @property
    def location(self) -> str:
        """`file:line`."""
        return f"{self.path}:{self.line}"


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of `verify`: ok, how many records verified, and the chain head."""

    ok: bool
    records: int
    files: int
    head_seq: int = 0
    head_hash: str | None = None
    failure: VerifyFailure | None = None
    notes: tuple[str, ...] = ()


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        yield from enumerate(handle, start=1)


def _find_seq(paths: Sequence[Path], index: int, after: int, seq: int) -> str | None:
    """Where record `seq` appears after `paths[index]:after`, if anywhere."""
    for number, path in enumerate(paths[index:], start=index):
        with contextlib.suppress(OSError, EOFError):
            for line_number, raw in _lines(path):
                if number == index and line_number <= after:
                    continue
                document = _parse_record(raw.rstrip(b"\n"))
                if document is not None and document["seq"] == seq:
                    return f"{path}:{line_number}"
    return None


def _describe_hint(document: Mapping[str, Any]) -> str:
    hint = document.get("prev_file")
    if not isinstance(hint, dict):
        return ""
    inode = f", inode {hint['inode']}" if "inode" in hint else ""
    truncated = ", truncated in place" if hint.get("truncated") else ""
    return f" (it says its predecessor was written as {hint.get('path')}{inode}{truncated})"


class _Verifier:
    """Walks the files in order, keeping the expected chain head."""

    def __init__(self, paths: Sequence[Path], allow_partial: bool) -> None:
        self.paths = list(paths)
        self.allow_partial = allow_partial
        self.head: _Head | None = None  # None: nothing verified yet
        self.head_index = 0
        self.head_line = 0
        self.records = 0
        self.notes: list[str] = []

    def result(self, failure: VerifyFailure | None = None) -> VerifyResult:
        head = self.head or _Head()
        return VerifyResult(
            ok=failure is None,
            records=self.records,
            files=len(self.paths),
            head_seq=head.seq,
            head_hash=head.hash,
            failure=failure,
            notes=tuple(self.notes),
        )

    def run(self) -> VerifyResult:
        for index, path in enumerate(self.paths):
            try:
                failure = self._file(index, path)
            except (OSError, EOFError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                failure = VerifyFailure(path, 0, Problem.UNREADABLE, f"cannot read: {reason}")
            if failure is not None:
                return self.result(failure)
        return self.result()

    def _file(self, index: int, path: Path) -> VerifyFailure | None:
        torn: list[bytes] = []
        torn_at = 0
        empty = True
        for number, raw in _lines(path):
            empty = False
            text = raw[:-1] if raw.endswith(b"\n") else raw
            document = _parse_record(text)
            if document is None:
                torn_at = torn_at or number
                torn.append(raw)
                continue
            if torn:
                if not self._acknowledges(document, b"".join(torn)):
                    return self._garbage(path, torn_at)
                self.notes.append(
                    f"{path}:{torn_at}: {sum(map(len, torn))} bytes of an interrupted write, "
                    f"accounted for by the recovery record at line {number}"
                )
                torn, torn_at = [], 0
            problem = _hash_problem(text, document)
            if problem is not None:
                return VerifyFailure(path, number, Problem.EDITED, problem)
            failure = self._link(index, path, number, document)
            if failure is not None:
                return failure
            self.head = _Head(document["seq"], document["hash"])
            self.head_index, self.head_line = index, number
            self.records += 1
        if torn:
            if len(torn) == 1 and not torn[0].endswith(b"\n"):
                return VerifyFailure(
                    path,
                    torn_at,
                    Problem.TRUNCATED,
                    f"the last line is incomplete ({len(torn[0])} bytes, no newline): a write "
                    "was interrupted (crash or power loss) and the gate has not reopened the "
                    "file since; every record before it verifies",
                )
            return self._garbage(path, torn_at)
        if empty:
            self.notes.append(f"{path}: empty")
        return None

    @staticmethod
    def _acknowledges(document: Mapping[str, Any], torn: bytes) -> bool:
        """Whether a recovery record accounts for exactly these damaged bytes.

        The writer terminated the damaged tail with a newline unless it ended with one.
        """
        claim = document.get("torn")
        if document.get("event") != RECOVERY_EVENT or not isinstance(claim, dict):
            return False
        return any(
            claim.get("length") == len(candidate) and claim.get("sha256") == _sha256(candidate)
            for candidate in (torn, torn[:-1])
        )

    @staticmethod
    def _garbage(path: Path, line: int) -> VerifyFailure:
        return VerifyFailure(
            path,
            line,
            Problem.MALFORMED,
            "not an audit record (not JSON, or without seq/prev/hash): a line was inserted "
            "or overwritten",
        )

    def _link(
        self, index: int, path: Path, number: int, document: dict[str, Any]
    ) -> VerifyFailure | None:
        seq, prev = document["seq"], document["prev"]
        here = (path, number)
        if self.head is None:
            if prev is None:
                if seq != 1:
                    return VerifyFailure(
                        *here, Problem.CHAIN_BREAK, f"a chain starts here at seq {seq}, not 1"
                    )
                return None
            if self.allow_partial:
                self.notes.append(
                    f"{path}:{number}: verification starts mid-chain at seq {seq}; records "
                    "before it were not checked"
                )
                return None
            return VerifyFailure(
                *here,
                Problem.MISSING_PREDECESSOR,
                f"this line continues a chain from an earlier file (seq {seq}, prev "
                f"{prev}){_describe_hint(document)}, which was not given: verify the files "
                "together, oldest first",
            )
        expected = self.head.seq + 1
        if prev == self.head.hash and seq == expected:
            return None
        boundary = self.head_index != index
        after = (
            f"the last record of {self.paths[self.head_index]} (line {self.head_line})"
            if boundary
            else f"line {self.head_line}"
        )
        if prev is None:
            return VerifyFailure(
                *here,
                Problem.CHAIN_BREAK,
                f"a new chain starts here (prev is null) after {after}: the writer lost the "
                "previous file's last hash, or the files before it were replaced",
            )
        if seq == expected:
            return VerifyFailure(
                *here,
                Problem.CHAIN_BREAK,
                f"does not link to {after} (seq {self.head.seq}): that record or this one "
                f"was altered and re-hashed{_describe_hint(document) if boundary else ''}",
            )
        if seq > expected:
            later = _find_seq(self.paths, index, number, expected)
            if later is not None:
                return VerifyFailure(
                    *here,
                    Problem.REORDERED,
                    f"holds record seq {seq} where seq {expected} was expected; seq "
                    f"{expected} appears later, at {later}: lines were reordered",
                )
            missing = seq - expected
            plural = "s" if missing > 1 else ""
            span = f"seq {expected}" if missing == 1 else f"seq {expected}..{seq - 1}"
            return VerifyFailure(
                *here,
                Problem.DELETED,
                f"{missing} record{plural} ({span}) missing between {after} and this line: "
                f"deleted{', or a file is missing from the list' if boundary else ''}"
                f"{_describe_hint(document) if boundary else ''}",
            )
        return VerifyFailure(
            *here,
            Problem.INSERTED,
            f"record seq {seq} comes after seq {self.head.seq}: a line was inserted before "
            "this one (or copied)",
        )


def verify(paths: Sequence[Path], *, allow_partial: bool = False) -> VerifyResult:
    """Check the lines, hashes and links of audit files given oldest first (`.gz` allowed).

    `allow_partial` accepts a first file whose chain continues from a file not given
    (verifying only recent files); by default that is a `missing-predecessor` failure.
    """
    return _Verifier(paths, allow_partial).run()


def format_verify_result(result: VerifyResult) -> str:
    """The human report of `registry-gate audit verify` (the exit status is `result.ok`)."""
    lines = [f"note: {note}" for note in result.notes]
    files = f"{result.files} file{'s' if result.files != 1 else ''}"
    if result.failure is None:
        head = f"; chain head seq {result.head_seq} {result.head_hash}" if result.head_hash else ""
        lines.append(f"OK: {result.records} audit records in {files} verify{head}")
    else:
        failure = result.failure
        lines.append(f"FAILED: {failure.location}: {failure.kind}: {failure.message}")
        if result.records == 0:
            lines.append("no record before it verifies")
        else:
            plural = "s" if result.records != 1 else ""
            lines.append(
                f"{result.records} record{plural} before it verify (up to seq {result.head_seq})"
            )
    return "\n".join(lines)
