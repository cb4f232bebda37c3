"""Process logging: JSON or text lines on stderr, the request id, and credential redaction.

Owns the log formats, the request id carried through a request's tasks (a `ContextVar`
that a filter copies onto every record), and `redact_headers`, the one place that decides
which header values never reach a log line. Audit records are not logs: they go to the
audit sinks (stdout when configured), which is why logs go to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
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


class TextFormatter(logging.Formatter):
    """`2024-05-01T12:00:00.123Z INFO proxy.http.routes [req-id] message key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record on one line (a traceback follows on the next lines)."""
        request_id = getattr(record, "request_id", None)
        parts = [
            _timestamp(record.created),
            record.levelname,
            record.name,
            f"[{request_id or '-'}]",
            record.getMessage(),
        ]
        for key, value in _extra_fields(record).items():
            text = value if isinstance(value, str) and value and " " not in value else None
            parts.append(f"{key}={text or json.dumps(value, default=str)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or foreign stream
        return False


class _GateHandler(logging.StreamHandler[TextIO]):
    """The handler `configure_logging` installs (so a second call replaces, not adds)."""


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
