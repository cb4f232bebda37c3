"""Logging: JSON and text formats, request ids, and credentials that never reach a log."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import Iterator
from typing import Literal

import pytest
from multidict import CIMultiDict

from proxy.observability.logging_setup import (
    ACCESS_LOGGER,
    FLUSH_DELAY,
    REDACTED,
    AccessLog,
    configure_logging,
    current_request_id,
    redact_headers,
    request_id_bound,
)


@pytest.fixture
def capture() -> Iterator[tuple[io.StringIO, logging.Logger]]:
    """A stream the gate's handler writes to; the root logger is restored afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    yield stream, logging.getLogger("proxy.test")
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_fixed_fields_and_extras(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    stream, log = capture
    configure_logging("info", "json", stream)
    log.info("fetched %s", "manifest", extra={"upstream": "docker.io", "bytes": 529})
    log.debug("not shown at info")
    (line,) = lines(stream)
    assert line["message"] == "fetched manifest"
    assert line["level"] == "info" and line["logger"] == "proxy.test"
    assert str(line["time"]).endswith("Z")
    assert line["upstream"] == "docker.io" and line["bytes"] == 529
    assert "request_id" not in line


def test_extras_never_replace_the_fixed_fields(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    stream, log = capture
    configure_logging("info", "json", stream)
    log.warning("real", extra={"level": "fake", "logger": "fake"})
    (line,) = lines(stream)
    assert (line["level"], line["logger"]) == ("warning", "proxy.test")


async def test_the_request_id_follows_the_task(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    stream, log = capture
    configure_logging("info", "json", stream)

    async def handle(request_id: str) -> None:
        with request_id_bound(request_id):
            await asyncio.sleep(0)
            log.info("handled")
            assert current_request_id() == request_id

    await asyncio.gather(handle("r-1"), handle("r-2"))
    log.info("outside")
    assert sorted(str(line.get("request_id")) for line in lines(stream)) == [
        "None",
        "r-1",
        "r-2",
    ]
    assert current_request_id() is None


def test_exceptions_are_one_json_line(capture: tuple[io.StringIO, logging.Logger]) -> None:
    stream, log = capture
    configure_logging("info", "json", stream)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    (line,) = lines(stream)
    assert "ValueError: boom" in str(line["exc"])


def test_text_format(capture: tuple[io.StringIO, logging.Logger]) -> None:
    stream, log = capture
    configure_logging("debug", "text", stream)
    with request_id_bound("abc"):
        log.debug("cache hit", extra={"kind": "blob", "note": "two words"})
    text = stream.getvalue().strip()
    assert ' DEBUG proxy.test [abc] cache hit kind=blob note="two words"' in text


def test_configuring_twice_replaces_the_handler(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    stream, log = capture
    configure_logging("info", "json", stream)
    configure_logging("info", "json", stream)
    log.info("once")
    assert len(lines(stream)) == 1


def test_redact_headers_keeps_the_scheme_and_drops_credentials() -> None:
    headers = CIMultiDict(
        [
            ("Authorization", "Bearer eyJhbGciOi.payload.sig"),
            ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
            ("Cookie", "session=1"),
            ("X-Registry-Auth", "eyJ1c2VybmFtZSI6ImEifQ=="),
            ("X-Api-Token", "t0ken"),
            ("Accept", "application/vnd.oci.image.index.v1+json"),
            ("Accept", "application/vnd.oci.image.manifest.v1+json"),
            ("User-Agent", "docker/26.1"),
        ]
    )
    safe = redact_headers(headers)
    assert safe["Authorization"] == f"Bearer {REDACTED}"
    assert safe["Proxy-Authorization"] == f"Basic {REDACTED}"
    assert safe["Cookie"] == safe["X-Registry-Auth"] == safe["X-Api-Token"] == REDACTED
    assert safe["Accept"] == (
        "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
    )
    assert safe["User-Agent"] == "docker/26.1"
    assert redact_headers({"authorization": "garbage"})["authorization"] == REDACTED


def test_credentials_in_extras_are_redacted(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    stream, log = capture
    configure_logging("info", "json", stream)
    log.info(
        "upstream answered",
        extra={
            "headers": {"Authorization": "Bearer secret-token", "Docker-Content-Digest": "d"},
            "password": "hunter2",
            "token_ttl": 300,
        },
    )
    text = stream.getvalue()
    assert "secret-token" not in text and "hunter2" not in text
    (line,) = lines(stream)
    assert line["headers"] == {"Authorization": f"Bearer {REDACTED}", "Docker-Content-Digest": "d"}
    assert line["token_ttl"] == 300


def test_auto_format_is_text_on_a_terminal_and_json_elsewhere(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    primary, secondary = os.openpty()
    with os.fdopen(secondary, "w", buffering=1) as terminal, os.fdopen(primary, "rb", 0) as screen:
        configure_logging("info", "auto", terminal)
        logging.getLogger("registry_gate.test").info("to a person")
        line = screen.read(4096).decode()
    assert "INFO registry_gate.test [-] to a person" in line, line
    assert not line.lstrip().startswith("{")
    pipe = io.StringIO()
    configure_logging("info", "auto", pipe)
    logging.getLogger("registry_gate.test").info("to a collector")
    assert json.loads(pipe.getvalue().splitlines()[-1])["message"] == "to a collector"


# -- the access log and when lines reach the stream -----------------------------------------


ACCESS_FIELDS = {
    "client": "127.0.0.1",
    "route": "manifest",
    "status": 200,
    "duration_ms": 0.25,
    "client_request_id": None,
}


def buffered() -> tuple[io.BytesIO, io.TextIOWrapper]:
    """A stream that holds what it is given until flushed (as stderr, unbuffered by
    configure_logging), and the bytes that reached the file below it."""
    raw = io.BytesIO()
    return raw, io.TextIOWrapper(raw, encoding="utf-8", line_buffering=True)


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_an_access_line_is_the_line_logging_would_write(
    capture: tuple[io.StringIO, logging.Logger], log_format: Literal["json", "text"]
) -> None:
    stream, _ = capture
    configure_logging("info", log_format, stream)
    AccessLog().write("GET", "/v2/x/manifests/1", 200, "r" * 32, dict(ACCESS_FIELDS))
    # The same record through logging's own path: another handler on the logger makes
    # AccessLog fall back to logging.
    extra = logging.getLogger(ACCESS_LOGGER)
    other = logging.StreamHandler(io.StringIO())
    extra.addHandler(other)
    try:
        AccessLog().write("GET", "/v2/x/manifests/1", 200, "r" * 32, dict(ACCESS_FIELDS))
    finally:
        extra.removeHandler(other)
    direct, through_logging = stream.getvalue().splitlines()
    assert other.stream.getvalue() == "GET /v2/x/manifests/1 200\n"
    if log_format == "json":
        one, two = json.loads(direct), json.loads(through_logging)
        assert list(one) == list(two)  # the same keys in the same order
        assert one.pop("time") and two.pop("time")
        assert one == two
        assert one["message"] == "GET /v2/x/manifests/1 200" and one["request_id"] == "r" * 32
    else:
        # Everything after the timestamp is the same.
        assert direct.split(" ", 1)[1] == through_logging.split(" ", 1)[1]
        assert f"INFO {ACCESS_LOGGER} [{'r' * 32}] GET /v2/x/manifests/1 200" in direct


def test_access_lines_below_the_level_are_not_written(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    stream, _ = capture
    configure_logging("warning", "json", stream)
    AccessLog().write("GET", "/v2/", 200, "r" * 32, dict(ACCESS_FIELDS))
    assert stream.getvalue() == ""


async def test_request_lines_on_a_loop_are_written_together_warnings_at_once(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    _, log = capture
    raw, stream = buffered()
    configure_logging("info", "json", stream)
    assert not stream.line_buffering
    AccessLog().write("GET", "/v2/", 200, "a" * 32, dict(ACCESS_FIELDS))
    log.info("an info line on the loop")
    assert raw.getvalue() == b""  # held, not yet written
    await asyncio.sleep(FLUSH_DELAY * 5)
    written = raw.getvalue().decode().splitlines()
    assert [json.loads(line)["message"] for line in written] == [
        "GET /v2/ 200",
        "an info line on the loop",
    ]
    AccessLog().write("GET", "/v2/", 200, "b" * 32, dict(ACCESS_FIELDS))
    log.warning("a warning")
    # The warning is written at once, with the line held before it, in order.
    written = raw.getvalue().decode().splitlines()[2:]
    assert [json.loads(line)["message"] for line in written] == ["GET /v2/ 200", "a warning"]


def test_lines_without_a_running_loop_are_written_at_once(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    _, log = capture
    raw, stream = buffered()
    configure_logging("info", "json", stream)
    log.info("from a thread without a loop")
    AccessLog().write("GET", "/v2/", 200, "c" * 32, dict(ACCESS_FIELDS))
    assert len(raw.getvalue().decode().splitlines()) == 2
