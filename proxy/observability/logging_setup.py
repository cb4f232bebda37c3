"""Process logging: JSON or text lines on stderr, the request id, and credential redaction.

Owns the log formats, the request id carried through a request's tasks (a `ContextVar`
that a filter copies onto every record), and `redact_headers`, the one place that decides
which header values never reach a log line. Audit records are not logs: they go to the
audit sinks (stdout when configured), which is why logs go to stderr.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

REDACTED = "<redacted>"

# A ContextVar is per-task state, not a shared singleton: asyncio copies the context into
# every task, so each request sees only its own id. The docs require module-level creation.
_REQUEST_ID: ContextVar[str | None] = ContextVar("registry_gate_request_id", default=None)

# Header and field names whose values are credentials. `x-registry-auth` carries Docker's
# base64 JSON credentials; `x-registry-config` a build's registry credentials.
_SECRET_NAMES = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-registry-auth",
        "x-registry-config",
    }
)
_SECRET_PATTERN = re.compile(r"passw(or)?d|secret|token|api[-_]?key|credential", re.IGNORECASE)
_AUTH_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s+\S")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "request_id",
}


@functools.lru_cache(maxsize=1024)
def is_secret_name(name: str) -> bool:
    """Whether a header or field with this name holds a credential (names repeat: every
    log line asks about the same `extra=` keys, so the answers are remembered)."""
    lowered = name.lower()
    return lowered in _SECRET_NAMES or _SECRET_PATTERN.search(lowered) is not None


def _redact_value(name: str, value: str) -> str:
    if name.lower() in ("authorization", "proxy-authorization"):
        # Keep the scheme (Basic, Bearer): it is what one debugs, and it is not a secret.
        scheme = _AUTH_SCHEME.match(value)
        if scheme is not None:
            return f"{scheme.group(1)} {REDACTED}"
    return REDACTED


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of `headers` safe to log: credential values replaced by `<redacted>`.

    Works for aiohttp's multi-dicts too; repeated headers are joined with `, `.
    """
    result: dict[str, str] = {}
    for name, value in headers.items():
        safe = _redact_value(name, value) if is_secret_name(name) else value
        result[name] = f"{result[name]}, {safe}" if name in result else safe
    return result


def _scrub(name: str, value: Any) -> Any:
    """An `extra=` value made safe: secret-named strings redacted, mappings recursively."""
    if isinstance(value, str | bytes):
        if is_secret_name(name):
            return _redact_value(name, value if isinstance(value, str) else "")
        return value
    if value is None or isinstance(value, int | float):
        # The common extras, answered before the (slow, abstract) Mapping check.
        return value
    if isinstance(value, Mapping):
        return {str(key): _scrub(str(key), item) for key, item in value.items()}
    return value


def current_request_id() -> str | None:
    """The request id of the running task, if a request is being handled."""
    return _REQUEST_ID.get()


def set_request_id(request_id: str | None) -> Token[str | None]:
    """Bind a request id to the current task (and tasks it creates); reset with the token."""
    return _REQUEST_ID.set(request_id)


def reset_request_id(token: Token[str | None]) -> None:
    """Undo `set_request_id`."""
    _REQUEST_ID.reset(token)


@contextmanager
def request_id_bound(request_id: str | None) -> Iterator[None]:
    """`with request_id_bound(rid):` every log record inside carries `request_id`."""
    token = _REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        _REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Copies the task's request id onto each record (unless `extra=` already set one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate; never drops a record."""
        if getattr(record, "request_id", None) is None:
            record.request_id = _REQUEST_ID.get()
        return True


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _timestamp(created: float) -> str:
    # Lines come many per second: the date and time are formatted once per second.
    whole = int(created)
    return f"{_second(whole)}.{int((created - whole) * 1000):03d}Z"


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = vars(record)
    if fields.keys() <= _RECORD_ATTRIBUTES:
        return {}
    # Kept in the order they were given (a set difference would shuffle them).
    return {
        key: _scrub(key, value)
        for key, value in fields.items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


# One encoder for every line (json.dumps with options builds a new one per call).
_JSON = json.JSONEncoder(default=str, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record; `extra=` fields follow the fixed ones and never replace them."""
        document: dict[str, Any] = _extra_fields(record)
        document.update(
            time=_timestamp(record.created),
            level=record.levelname.lower(),
            logger=record.name,
            message=record.getMessage(),
        )
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            document["request_id"] = request_id
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return _JSON.encode(document)

    def access_line(
        self, created: float, logger: str, message: str, request_id: str, fields: dict[str, Any]
    ) -> str:
        """The line `format` would render for an INFO record with `fields` as `extra=`."""
        fields.update(time=_timestamp(created), level="info", logger=logger, message=message)
        fields["request_id"] = request_id
        return _JSON.encode(fields)


class TextFormatter(logging.Formatter):
    """`2024-05-01T12:00:00.123Z INFO proxy.http.routes [req-id] message key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record on one line (a traceback follows on the next lines)."""
        request_id = getattr(record, "request_id", None)
        line = _text_line(
            _timestamp(record.created),
            record.levelname,
            record.name,
            request_id,
            record.getMessage(),
            _extra_fields(record),
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line

    def access_line(
        self, created: float, logger: str, message: str, request_id: str, fields: dict[str, Any]
    ) -> str:
        """The line `format` would render for an INFO record with `fields` as `extra=`."""
        return _text_line(_timestamp(created), "INFO", logger, request_id, message, fields)


def _text_line(
    stamp: str,
    level: str,
    logger: str,
    request_id: str | None,
    message: str,
    fields: Mapping[str, Any],
) -> str:
    parts = [stamp, level, logger, f"[{request_id or '-'}]", message]
    for key, value in fields.items():
        text = value if isinstance(value, str) and value and " " not in value else None
        parts.append(f"{key}={text or json.dumps(value, default=str)}")
    return " ".join(parts)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or foreign stream
        return False


# How late a request's log line may be written (see _GateHandler).
FLUSH_DELAY = 0.01


class _GateHandler(logging.StreamHandler[TextIO]):
    """The handler `configure_logging` installs (so a second call replaces, not adds).

    Lines logged on an event loop's thread below WARNING (the access log, one line per
    request) are written together, at most `FLUSH_DELAY` after the first of them, not
    with one write to stderr each: every write releases the GIL, and taking it back from
    the audit writer's thread made a write per request cost more than building the line
    (measured under load: 8,600 warm manifests/s without the access log, 6,500 with a
    write per line). The stream must not be line-buffered for that (`configure_logging`
    turns it off for stderr). Warnings and errors, and lines from other threads, are
    written at once, with what was buffered before them; exit flushes the rest (a
    SIGKILL loses at most the last `FLUSH_DELAY` of request lines).
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._flush_pending = False

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record's line (`handle` holds the lock)."""
        try:
            line = self.format(record)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        self._put(line, record, urgent=record.levelno >= logging.WARNING)

    def write_line(self, line: str) -> None:
        """Write a line rendered without a LogRecord (the access log's), flushed like an
        INFO record's."""
        self._put(line, None, urgent=False)

    def _put(self, line: str, record: logging.LogRecord | None, *, urgent: bool) -> None:
        """Write `line`; flush now if `urgent` or no loop turn's flush can take it."""
        self.acquire()
        try:
            self.stream.write(line + self.terminator)
        except RecursionError:
            raise
        except Exception:
            # As logging does: a broken stderr must not fail the request.
            self.handleError(record or logging.makeLogRecord({"msg": line}))
            return
        finally:
            self.release()
        if urgent or not self._defer_flush():
            self.flush()

    def _defer_flush(self) -> bool:
        """Schedule a flush at the loop's next turn (True), or say there is no loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if not self._flush_pending:
            self._flush_pending = True
            loop.call_later(FLUSH_DELAY, self._flush_turn)
        return True

    def _flush_turn(self) -> None:
        self._flush_pending = False
        self.flush()


ACCESS_LOGGER = "registry_gate.access"


class AccessLog:
    """The access log: one INFO line per request on the `registry_gate.access` logger.

    Through the handler `configure_logging` installs, the line is rendered straight from
    its fields: the same line a `logger.info(..., extra=fields)` would give, without the
    LogRecord, the filters and the handler chain, which cost a warm manifest request
    about 30 us of its ~140 us on the event loop (measured under load; the fields are
    never secret-named, so there is nothing to redact). Anywhere else (another handler
    installed, the logger configured by an embedding program, tests) the line goes
    through logging like any record.
    """

    def __init__(self) -> None:
        self._logger = logging.getLogger(ACCESS_LOGGER)

    def write(
        self, method: str, path: str, status: int, request_id: str, fields: dict[str, Any]
    ) -> None:
        """Log `METHOD path status` with `request_id` and `fields` (consumed)."""
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        handler = self._direct_handler()
        if handler is None:
            logger.info(
                "%s %s %d", method, path, status, extra={**fields, "request_id": request_id}
            )
            return
        formatter = handler.formatter
        assert isinstance(formatter, JsonFormatter | TextFormatter)
        message = f"{method} {path} {status}"
        handler.write_line(
            formatter.access_line(time.time(), ACCESS_LOGGER, message, request_id, fields)
        )

    def _direct_handler(self) -> _GateHandler | None:
        """The gate's handler when it is the only place this logger's records go."""
        logger = self._logger
        if logger.handlers or logger.filters or not logger.propagate:
            return None
        parent = logger.parent
        while parent is not None and parent.parent is not None:
            if parent.handlers or parent.filters or not parent.propagate:
                return None
            parent = parent.parent
        root = logging.getLogger()
        handlers = root.handlers
        if len(handlers) != 1 or root.filters:
            return None
        handler = handlers[0]
        if not isinstance(handler, _GateHandler) or handler.level > logging.INFO:
            return None
        if not isinstance(handler.formatter, JsonFormatter | TextFormatter):
            return None
        return handler


def configure_logging(
    level: str = "info",
    log_format: Literal["json", "text", "auto"] = "auto",
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send all logging to `stream` (stderr) in the chosen format; returns the handler.

    `auto`: text for a person at a terminal, JSON for a collector (anything else).
    Called once by the command line (`settings.log_level`, `settings.log_format`).
    """
    target = stream if stream is not None else sys.stderr
    if log_format == "auto":
        log_format = "text" if _is_terminal(target) else "json"
    if isinstance(target, io.TextIOWrapper) and target.line_buffering:
        # The handler flushes: once per loop turn for request lines, at once otherwise.
        target.reconfigure(line_buffering=False)
    handler = _GateHandler(target)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    # No formatter here prints the thread, process or source line of a record: skip
    # looking them up for every line (logging HOWTO, "Optimization").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, _GateHandler):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
