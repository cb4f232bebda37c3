"""The audit log: record fields, the hash chain, rotation, crash safety, the verifier."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.observability import audit as audit_module
from proxy.observability.audit import (
    AuditLog,
    AuditLogError,
    AuditRecord,
    AuditUnavailable,
    Decision,
    Event,
    Problem,
    StreamSink,
    format_verify_result,
    verify,
)
from proxy.observability.metrics import Metrics
from proxy.policy.principal import Principal
from proxy.settings import AuditSettings


def record(number: int = 0, **fields: Any) -> AuditRecord:
    defaults: dict[str, Any] = {
        "event": Event.MANIFEST_PULL,
        "action": "pull",
        "request_id": f"req-{number}",
        "client": "127.0.0.1",
        "principal": Principal("alice", frozenset({"platform", "dev"})),
        "name": "library/ubuntu",
        "resolved": "docker.io/library/ubuntu:22.04",
        "digest": "sha256:" + "a" * 64,
        "decision": Decision.ALLOW,
        "rule": "hub-official-images",
        "upstream": "docker.io",
        "status": 200,
        "bytes": 1000 + number,
    }
    defaults.update(fields)
    return AuditRecord(**defaults)


async def write_records(log: AuditLog, start: int, count: int) -> None:
    for number in range(start, start + count):
        await log.write(record(number))
    await log.flush()


async def make_log(path: Path, count: int, **options: Any) -> None:
    async with AuditLog(path=path, **options) as log:
        await write_records(log, 0, count)


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rehash(line: bytes, **changes: Any) -> bytes:
    """A line edited by someone who also recomputed its own hash."""
    document = json.loads(line)
    document.update(changes)
    document.pop("hash")
    encoded = audit_module._canonical(document)
    return audit_module._sealed(encoded, audit_module._sha256(encoded)) + b"\n"


# --- records --------------------------------------------------------------------------


async def test_a_line_holds_the_fields_of_the_design(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path=path) as log:
        await log.write(record(1, extra={"candidates": ["docker.io"], "where": tmp_path}))
        await log.write(AuditRecord(event=Event.DENIAL, action="push", decision=Decision.DENY))
    first, second = (json.loads(line) for line in lines_of(path))
    assert first["principal"] == {"user": "alice", "groups": ["dev", "platform"]}
    assert first["event"] == "manifest_pull"
    assert first["decision"] == "allow"
    assert first["rule"] == "hub-official-images"
    assert first["bytes"] == 1001
    assert first["extra"] == {"candidates": ["docker.io"], "where": str(tmp_path)}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert lines_of(path)[0].endswith(f',"hash":"{first["hash"]}"}}\n'.encode())
    assert (first["seq"], first["prev"]) == (1, None)
    assert first["hash"].startswith("sha256:")
    assert second["principal"] == {"user": None, "groups": []}
    assert "extra" not in second
    assert (second["seq"], second["prev"]) == (2, first["hash"])
    assert verify([path]).ok


async def test_a_value_json_cannot_encode_loses_only_that_detail(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path=path) as log:
        await log.write(record(1, extra={"ratio": float("nan")}))
    (line,) = lines_of(path)
    assert "unencodable" in json.loads(line)["extra"]
    assert verify([path]).ok


# --- tampering ------------------------------------------------------------------------


@pytest.fixture
async def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    await make_log(path, 8)
    return path


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def failure_of(paths: list[Path]) -> tuple[Problem, int, str]:
    result = verify(paths)
    assert not result.ok and result.failure is not None
    return result.failure.kind, result.failure.line, result.failure.message


def test_an_untouched_log_verifies_and_reports_the_chain_head(log_file: Path) -> None:
    result = verify([log_file])
    assert result.ok and result.records == 8 and result.head_seq == 8
    last = json.loads(lines_of(log_file)[-1])
    assert result.head_hash == last["hash"]
    assert f"OK: 8 audit records in 1 file verify; chain head seq 8 {last['hash']}" in (
        format_verify_result(result)
    )


def test_an_edited_line_is_named(log_file: Path) -> None:
    lines = lines_of(log_file)
    lines[2] = lines[2].replace(b'"status":200', b'"status":201')
    write_lines(log_file, lines)
    kind, line, message = failure_of([log_file])
    assert (kind, line) == (Problem.EDITED, 3)
    assert "edited" in message


def test_an_edited_and_rehashed_line_breaks_the_link_of_the_next(log_file: Path) -> None:
    lines = lines_of(log_file)
    lines[2] = rehash(lines[2], decision="deny")
    write_lines(log_file, lines)
    kind, line, message = failure_of([log_file])
    assert (kind, line) == (Problem.CHAIN_BREAK, 4)
    assert "line 3" in message


def test_a_reformatted_line_is_an_edit(log_file: Path) -> None:
    lines = lines_of(log_file)
    lines[4] = json.dumps(json.loads(lines[4]), indent=None).encode() + b"\n"
    write_lines(log_file, lines)
    assert failure_of([log_file])[:2] == (Problem.EDITED, 5)


def test_a_deleted_line_is_named(log_file: Path) -> None:
    lines = lines_of(log_file)
    del lines[2]
    write_lines(log_file, lines)
    kind, line, message = failure_of([log_file])
    assert (kind, line) == (Problem.DELETED, 3)
    assert "1 record (seq 3) missing" in message


def test_several_deleted_lines_are_counted(log_file: Path) -> None:
    lines = lines_of(log_file)
    del lines[2:5]
    write_lines(log_file, lines)
    kind, line, message = failure_of([log_file])
    assert (kind, line) == (Problem.DELETED, 3)
    assert "3 records (seq 3..5) missing" in message


def test_a_copied_line_inserted_later_is_named(log_file: Path) -> None:
    lines = lines_of(log_file)
    lines.insert(4, lines[1])
    write_lines(log_file, lines)
    kind, line, _ = failure_of([log_file])
    assert (kind, line) == (Problem.INSERTED, 5)


def test_a_forged_well_linked_line_is_caught_at_the_next_one(log_file: Path) -> None:
    lines = lines_of(log_file)
    previous = json.loads(lines[3])
    forged = rehash(lines[3], seq=previous["seq"] + 1, prev=previous["hash"], name="evil")
    lines.insert(4, forged)
    write_lines(log_file, lines)
    kind, line, message = failure_of([log_file])
    assert (kind, line) == (Problem.INSERTED, 6)
    assert "inserted before this one" in message


def test_a_plain_line_inserted_is_malformed(log_file: Path) -> None:
    lines = lines_of(log_file)
    lines.insert(3, b'{"event":"manifest_pull","name":"x"}\n')
    write_lines(log_file, lines)
    assert failure_of([log_file])[:2] == (Problem.MALFORMED, 4)


def test_swapped_lines_are_reported_as_reordered(log_file: Path) -> None:
    lines = lines_of(log_file)
    lines[2], lines[3] = lines[3], lines[2]
    write_lines(log_file, lines)
    kind, line, message = failure_of([log_file])
    assert (kind, line) == (Problem.REORDERED, 3)
    assert f"{log_file}:4" in message


def test_a_line_moved_to_the_end_is_reordered(log_file: Path) -> None:
    lines = lines_of(log_file)
    lines.append(lines.pop(1))
    write_lines(log_file, lines)
    assert failure_of([log_file])[:2] == (Problem.REORDERED, 2)


def test_format_names_file_and_line_of_the_first_bad_line(log_file: Path) -> None:
    lines = lines_of(log_file)
    del lines[5]
    write_lines(log_file, lines)
    report = format_verify_result(verify([log_file]))
    assert report.startswith(f"FAILED: {log_file}:6: deleted: ")
    assert "5 records before it verify (up to seq 5)" in report


def test_an_unreadable_file_fails(tmp_path: Path) -> None:
    result = verify([tmp_path / "missing.jsonl"])
    assert not result.ok and result.failure is not None
    assert result.failure.kind is Problem.UNREADABLE


# --- continuing and rotating ----------------------------------------------------------


async def test_a_restart_continues_the_chain_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await make_log(path, 3)
    await make_log(path, 2)
    result = verify([path])
    assert result.ok and result.records == 5
    assert [json.loads(line)["seq"] for line in lines_of(path)] == [1, 2, 3, 4, 5]


async def test_an_external_rename_continues_the_chain_in_a_new_file(tmp_path: Path) -> None:
    path, rotated = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    async with AuditLog(path=path) as log:
        await write_records(log, 0, 4)
        inode = path.stat().st_ino
        path.rename(rotated)  # logrotate, `create` mode without copytruncate
        await write_records(log, 4, 3)
    assert len(lines_of(rotated)) == 4 and len(lines_of(path)) == 3
    first = json.loads(lines_of(path)[0])
    assert first["prev"] == json.loads(lines_of(rotated)[-1])["hash"]
    assert first["prev_file"] == {"path": str(path), "inode": inode}

    both = verify([rotated, path])
    assert both.ok and both.records == 7 and both.files == 2

    kind, line, message = failure_of([path])
    assert (kind, line) == (Problem.MISSING_PREDECESSOR, 1)
    assert f"inode {inode}" in message and "oldest first" in message

    partial = verify([path], allow_partial=True)
    assert partial.ok and partial.records == 3 and "mid-chain" in partial.notes[0]

    kind, line, _ = failure_of([path, rotated])  # wrong order
    assert (kind, line) == (Problem.MISSING_PREDECESSOR, 1)


async def test_a_deleted_file_is_followed_too(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path=path) as log:
        await write_records(log, 0, 2)
        path.unlink()
        await write_records(log, 2, 2)
    assert [json.loads(line)["seq"] for line in lines_of(path)] == [3, 4]


async def test_a_missing_middle_file_is_a_deletion_at_the_next_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path=path) as log:
        for index in range(3):
            await write_records(log, index * 2, 2)
            path.rename(tmp_path / f"audit.jsonl.{3 - index}")
    kind, line, message = failure_of([tmp_path / "audit.jsonl.3", tmp_path / "audit.jsonl.1"])
    assert (kind, line) == (Problem.DELETED, 1)
    assert "a file is missing" in message
    assert verify([tmp_path / f"audit.jsonl.{n}" for n in (3, 2, 1)]).ok


async def test_a_line_deleted_at_the_end_of_a_rotated_file_is_found(tmp_path: Path) -> None:
    path, rotated = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    async with AuditLog(path=path) as log:
        await write_records(log, 0, 4)
        path.rename(rotated)
        await write_records(log, 4, 2)
    write_lines(rotated, lines_of(rotated)[:-1])
    kind, line, message = failure_of([rotated, path])
    assert (kind, line) == (Problem.DELETED, 1)
    assert f"the last record of {rotated}" in message


async def test_rotation_while_the_gate_was_down_links_to_the_rotated_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    await make_log(path, 3)
    path.rename(tmp_path / "audit.jsonl-20260101")
    (tmp_path / "audit.jsonl.2.gz").write_bytes(gzip.compress(b"older\n"))
    await make_log(path, 2)
    first = json.loads(lines_of(path)[0])
    assert first["seq"] == 4
    assert first["prev_file"]["path"] == str(tmp_path / "audit.jsonl-20260101")
    assert verify([tmp_path / "audit.jsonl-20260101", path]).ok


async def test_a_first_file_starts_a_chain(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    await make_log(path, 1)
    assert json.loads(lines_of(path)[0])["prev"] is None


async def test_a_chain_restarted_without_its_predecessor_is_a_break(tmp_path: Path) -> None:
    old, new = tmp_path / "old" / "audit.jsonl", tmp_path / "new" / "audit.jsonl"
    await make_log(old, 2)
    await make_log(new, 2)
    kind, line, message = failure_of([old, new])
    assert (kind, line) == (Problem.CHAIN_BREAK, 1)
    assert "new chain starts here" in message


def rotated_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("audit.jsonl.*"))


async def test_size_rotation_by_the_gate_keeps_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path=path, rotate_bytes=1500, batch_size=1) as log:
        for number in range(12):
            await log.write(record(number))
            await log.flush()
    rotated = rotated_files(tmp_path)
    assert len(rotated) >= 2
    files = [*rotated, path]
    result = verify(files)
    assert result.ok and result.records == 12, format_verify_result(result)
    second = json.loads(lines_of(rotated[1])[0])
    assert second["prev_file"]["path"] == str(rotated[0])


async def test_copytruncate_continues_the_chain(tmp_path: Path) -> None:
    path, copy = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    async with AuditLog(path=path) as log:
        await write_records(log, 0, 3)
        shutil.copyfile(path, copy)
        os.truncate(path, 0)
        await write_records(log, 3, 2)
    first = json.loads(lines_of(path)[0])
    assert first["prev_file"]["truncated"] is True
    assert verify([copy, path]).ok


async def test_compressed_rotated_files_verify(tmp_path: Path) -> None:
    path, rotated = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    async with AuditLog(path=path) as log:
        await write_records(log, 0, 3)
        path.rename(rotated)
        await write_records(log, 3, 3)
    compressed = tmp_path / "audit.jsonl.1.gz"
    compressed.write_bytes(gzip.compress(rotated.read_bytes()))
    result = verify([compressed, path])
    assert result.ok and result.records == 6


async def test_records_appended_by_someone_else_are_continued_not_forked(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path=path) as log:
        await write_records(log, 0, 2)
        await make_log(path, 2)  # a second writer (e.g. a one-off command) appends
        await write_records(log, 4, 2)
    result = verify([path])
    assert result.ok and result.records == 6


# --- crash safety ---------------------------------------------------------------------


async def test_a_torn_last_line_is_reported_as_truncated(log_file: Path) -> None:
    with log_file.open("ab") as handle:
        handle.write(b'{"action":"pull","bytes":12,"cli')
    result = verify([log_file])
    assert not result.ok and result.failure is not None
    assert (result.failure.kind, result.failure.line) == (Problem.TRUNCATED, 9)
    assert result.records == 8
    assert "interrupted" in result.failure.message


async def test_reopening_after_a_torn_line_records_a_recovery(log_file: Path) -> None:
    torn = b'{"action":"pull","bytes":12,"cli'
    with log_file.open("ab") as handle:
        handle.write(torn)
    await make_log(log_file, 2)
    lines = lines_of(log_file)
    assert lines[8] == torn + b"\n"  # kept as evidence, terminated
    recovery = json.loads(lines[9])
    assert recovery["event"] == "audit_recovery"
    assert recovery["torn"]["length"] == len(torn)
    assert recovery["prev"] == json.loads(lines[7])["hash"]
    result = verify([log_file])
    assert result.ok and result.records == 11
    assert any(f"{log_file}:9" in note for note in result.notes)
    assert "note:" in format_verify_result(result)


async def test_a_power_cut_tail_of_zero_bytes_is_recovered(log_file: Path) -> None:
    with log_file.open("ab") as handle:
        handle.write(b"\0" * 4096)
    assert verify([log_file]).failure.kind is Problem.TRUNCATED  # type: ignore[union-attr]
    await make_log(log_file, 1)
    assert verify([log_file]).ok


async def test_garbage_after_a_recovery_claim_is_not_accepted(log_file: Path) -> None:
    with log_file.open("ab") as handle:
        handle.write(b"torn")
    await make_log(log_file, 1)
    lines = lines_of(log_file)
    lines[8] = b"TORN\n"  # the evidence was changed afterwards
    write_lines(log_file, lines)
    assert failure_of([log_file])[:2] == (Problem.MALFORMED, 9)


async def test_a_file_that_is_not_an_audit_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "syslog"
    path.write_bytes(b"an ordinary log line that is not an audit record\n" * 40000)
    with pytest.raises(AuditLogError, match="not an audit log"):
        await AuditLog(path=path).start()


async def test_a_failed_write_is_retried_without_losing_or_tearing_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    real_write = os.write
    failures = {"left": 1}

    def flaky_write(fd: int, data: Any) -> int:
        if failures["left"] and os.fstat(fd).st_ino == path.stat().st_ino:
            failures["left"] -= 1
            real_write(fd, bytes(data[:10]))  # half a line reached the disk, then ENOSPC
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    metrics = Metrics(process_collectors=False)
    async with AuditLog(path=path, metrics=metrics) as log:
        await write_records(log, 0, 2)
        monkeypatch.setattr("proxy.observability.audit.os.write", flaky_write)
        await write_records(log, 2, 3)
        assert log.last_error is None
    result = verify([path])
    assert result.ok, format_verify_result(result)
    events = [json.loads(line)["event"] for line in lines_of(path)[:2] + lines_of(path)[3:]]
    assert events.count("manifest_pull") == 5 and events.count("audit_recovery") == 1
    assert metrics.audit_write_errors._value.get() == 1


# --- the writer and the event loop ----------------------------------------------------


class SlowSink:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.data = b""
        self.threads: set[str] = set()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        self.data += data

    def close(self) -> None:
        self.closed = True


async def test_writing_never_blocks_the_event_loop() -> None:
    sink = SlowSink(0.3)
    async with AuditLog(sinks=[sink]) as log:
        started = time.monotonic()
        for number in range(20):
            await log.write(record(number))
        ticks = 0
        while time.monotonic() - started < 0.2:
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks >= 5  # the loop kept running while the sink slept (blocked: 1)
        await log.flush()
    assert sink.threads and all(name.startswith("audit-writer") for name in sink.threads)
    assert sink.closed and len(sink.data.splitlines()) == 20


async def test_a_full_queue_makes_writers_wait_instead_of_dropping(tmp_path: Path) -> None:
    gate = threading.Event()

    class GatedSink:
        data = b""

        def write(self, data: bytes) -> None:
            gate.wait(5)
            self.data += data

        def close(self) -> None:
            pass

    sink = GatedSink()
    async with AuditLog(sinks=[sink], queue_size=2, batch_size=1) as log:
        await log.write(record(0))
        await asyncio.sleep(0.05)  # the writer took it and is stuck in the sink
        await log.write(record(1))
        await log.write(record(2))
        blocked = asyncio.create_task(log.write(record(3)))
        await asyncio.sleep(0.1)
        assert not blocked.done() and log.pending == 2
        gate.set()
        await asyncio.wait_for(blocked, 5)
    assert len(sink.data.splitlines()) == 4
    assert verify_stream(sink.data, tmp_path).ok


def verify_stream(data: bytes, directory: Path) -> Any:
    path = directory / "stream.jsonl"
    path.write_bytes(data)
    return verify([path])


async def test_concurrent_writers_produce_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    metrics = Metrics(process_collectors=False)
    async with AuditLog(path=path, queue_size=16, batch_size=7, metrics=metrics) as log:
        await asyncio.gather(*(log.write(record(number)) for number in range(300)))
    lines = lines_of(path)
    assert len(lines) == 300 and all(line.endswith(b"}\n") for line in lines)
    assert sorted(json.loads(line)["request_id"] for line in lines) == sorted(
        f"req-{n}" for n in range(300)
    )
    assert verify([path]).records == 300
    assert metrics.audit_records._value.get() == 300


async def test_stdout_sink_mirrors_the_file_byte_for_byte(tmp_path: Path) -> None:
    path, stream = tmp_path / "audit.jsonl", io.BytesIO()
    settings = AuditSettings(path=path, stdout=True)
    async with AuditLog.from_settings(settings, stdout=stream) as log:
        await write_records(log, 0, 5)
    assert stream.getvalue() == path.read_bytes()


async def test_a_stream_only_log_is_chained_too(tmp_path: Path) -> None:
    stream = io.BytesIO()
    async with AuditLog(sinks=[StreamSink(stream)]) as log:
        await write_records(log, 0, 3)
    assert verify_stream(stream.getvalue(), tmp_path).records == 3


async def test_a_broken_stream_does_not_stop_the_file(tmp_path: Path) -> None:
    path, stream = tmp_path / "audit.jsonl", io.BytesIO()
    stream.close()
    async with AuditLog(path=path, sinks=[StreamSink(stream)]) as log:
        await write_records(log, 0, 3)
    assert verify([path]).records == 3


async def test_without_sinks_records_are_discarded() -> None:
    log = AuditLog.from_settings(AuditSettings())
    assert not log.enabled
    await log.write(record(0))  # not started, not an error: there is nowhere to write


async def test_close_drains_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path=path, batch_size=1)
    await log.start()
    for number in range(50):
        await log.write(record(number))
    await log.close()
    assert len(lines_of(path)) == 50


async def test_a_record_after_close_is_logged_not_lost_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(path=tmp_path / "audit.jsonl")
    await log.start()
    await log.close()
    await log.write(record(7))
    assert "not running" in caplog.text
    assert caplog.records[-1].audit["request_id"] == "req-7"  # type: ignore[attr-defined]


# --- when the log cannot be written: fail_closed / fail_open, never a hang ---------------


class BrokenSink:
    """A stream sink of record that fails (like a full disk) until `healthy` is set."""

    def __init__(self) -> None:
        self.healthy = threading.Event()
        self.data = b""
        self.attempts = 0

    def write(self, data: bytes) -> None:
        self.attempts += 1
        if not self.healthy.is_set():
            raise OSError(28, "No space left on device")
        self.data += data

    def close(self) -> None:
        pass


async def wait_until(condition: Any) -> None:
    """Poll `condition` (state the writer thread changes) for up to 10 s."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 10 s")


def dropped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "registry_gate_audit_dropped_total", {"reason": reason}
    )
    return value or 0.0


async def test_fail_closed_refuses_at_once_while_failing_and_recovers_by_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink, metrics = BrokenSink(), Metrics(process_collectors=False)
    async with AuditLog(sinks=[sink], metrics=metrics) as log:
        log.check_available()  # healthy: nothing to refuse yet
        await log.write(record(0))  # queued: the failure is not known before a write
        await wait_until(lambda: log.problem is not None)
        assert log.refusing and "No space left" in (log.problem or "")
        with pytest.raises(AuditUnavailable) as refused:
            log.check_available()
        assert refused.value.status == 503 and refused.value.code == "UNAVAILABLE"
        assert "No space" not in refused.value.message  # the client is told no detail
        with pytest.raises(AuditUnavailable):
            await log.write(record(1))
        assert dropped(metrics, "refused") == 1
        assert any(getattr(r, "audit", {}).get("request_id") == "req-1" for r in caplog.records)
        sink.healthy.set()  # space again: the retry of record 0 is the probe
        await wait_until(lambda: log.problem is None)
        log.check_available()
        await write_records(log, 2, 1)
    # Record 0, queued before the failure was known, was kept and written; 1 was refused.
    assert [json.loads(line)["request_id"] for line in sink.data.splitlines()] == [
        "req-0",
        "req-2",
    ]
    assert verify_stream(sink.data, tmp_path).ok


async def test_fail_open_serves_and_counts_what_it_could_not_write(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink, metrics = BrokenSink(), Metrics(process_collectors=False)
    async with AuditLog(sinks=[sink], metrics=metrics, on_failure="fail_open") as log:
        await log.write(record(0))
        await wait_until(lambda: log.problem is not None)
        assert not log.refusing
        log.check_available()
        for number in range(1, 4):
            await log.write(record(number))  # no exception: the request proceeds
        assert dropped(metrics, "failing") == 3
        logged = {getattr(r, "audit", {}).get("request_id") for r in caplog.records}
        assert {"req-1", "req-2", "req-3"} <= logged
        sink.healthy.set()
        await log.flush()
    assert [json.loads(line)["request_id"] for line in sink.data.splitlines()] == ["req-0"]


async def test_a_full_queue_of_a_stuck_writer_refuses_instead_of_hanging() -> None:
    release = threading.Event()

    class StuckSink:
        def write(self, data: bytes) -> None:
            release.wait(10)

        def close(self) -> None:
            pass

    metrics = Metrics(process_collectors=False)
    log = AuditLog(
        sinks=[StuckSink()],
        queue_size=1,
        batch_size=1,
        queue_wait=0.2,
        stall_after=0.5,
        drain_timeout=0.2,
        metrics=metrics,
    )
    await log.start()
    try:
        await log.write(record(0))  # the writer takes it and never returns
        await wait_until(lambda: log.pending == 0)
        await log.write(record(1))  # fills the queue
        with pytest.raises(AuditUnavailable):
            await log.write(record(2))  # waits queue_wait at most, then refuses
        await wait_until(lambda: log.problem is not None)  # the stall is a failure too
        assert "has not finished" in (log.problem or "")
        with pytest.raises(AuditUnavailable):
            log.check_available()
        # A shutdown does not wait for the stuck writer: it reports what is unwritten.
        await asyncio.wait_for(log.close(), 5)
        assert dropped(metrics, "shutdown") == 2  # record 0 (in the write) and record 1
    finally:
        release.set()


async def test_closing_a_failing_log_does_not_wait_and_counts_the_queue(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink, metrics = BrokenSink(), Metrics(process_collectors=False)
    log = AuditLog(sinks=[sink], metrics=metrics, drain_timeout=30)
    await log.start()
    for number in range(3):
        await log.write(record(number))
    await wait_until(lambda: log.problem is not None)
    await asyncio.wait_for(log.close(), 5)  # not the 30 s drain: the disk is broken
    assert dropped(metrics, "shutdown") == 3
    logged = {getattr(r, "audit", {}).get("request_id") for r in caplog.records}
    assert {"req-0", "req-1", "req-2"} <= logged


def test_on_failure_is_validated() -> None:
    assert AuditSettings().on_failure == "fail_closed"
    assert AuditSettings(on_failure="fail_open").on_failure == "fail_open"
    with pytest.raises(ValueError):
        AuditSettings(on_failure="ignore")  # type: ignore[arg-type]
