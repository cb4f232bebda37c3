"""The HTTP server around the app: requests aiohttp refuses before any middleware runs.

aiohttp answers a request its parser refuses (an oversized or malformed request line or
header, conflicting framing, bad chunked encoding) itself, with a text body quoting the
offending bytes, and logs the parser's message with them. Those bytes can be an
`Authorization` header. aiohttp has no hook for these answers (aio-libs/aiohttp#3287),
so the gate's runner builds its connections with `GateRequestHandler`, whose
`handle_error` answers in the OCI JSON form, names no byte the client sent, and logs
the kind of error only.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.errors import RegistryError

log = logging.getLogger("registry_gate.http")

# What each refusal says: fixed text, never the parser's message (it quotes the request).
_PARSER_ERRORS: dict[int, tuple[str, str]] = {
    400: ("UNSUPPORTED", "malformed request"),
    431: ("UNSUPPORTED", "request line or header too large"),
    500: ("UNKNOWN", "internal error"),
    504: ("UNAVAILABLE", "request handling timed out"),
}


def _status_of(status: int, exc: BaseException | None) -> int:
    if isinstance(exc, LineTooLong):
        return 431
    return status if status in _PARSER_ERRORS else 500 if status >= 500 else 400


class GateRequestHandler(RequestHandler):
    """aiohttp's connection handler, with refusals that repeat nothing the client sent."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer a request aiohttp could not hand to the app (parser errors, mostly)."""
        request_id = uuid.uuid4().hex
        status = _status_of(status, exc)
        kind = type(exc).__name__ if exc is not None else "none"
        if isinstance(exc, HttpProcessingError) or status < 500:
            # The exception's text quotes the request's bytes: its type is all we log.
            log.warning(
                "refused a request the HTTP parser rejected (%s)",
                kind,
                extra={"request_id": request_id, "client": request.remote, "status": status},
            )
        else:
            # Not a parser error: the gate's own failure, with its traceback to debug it.
            log.error(
                "error outside the application (%s)",
                kind,
                exc_info=exc,
                extra={"request_id": request_id, "client": request.remote, "status": status},
            )
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error response")
        code, text = _PARSER_ERRORS[status]
        error = RegistryError(text)
        error.code, error.status = code, status
        response = web.Response(status=status, body=error.body(), content_type="application/json")
        response.headers["X-Request-Id"] = request_id
        # The rest of the connection cannot be trusted to be framed right.
        response.force_close()
        return response


class GateServer(web.Server):
    """`web.Server` whose connections are `GateRequestHandler`s."""

    def __call__(self) -> RequestHandler:
        """A handler for one new connection."""
        return GateRequestHandler(self, loop=self._loop, **self._kwargs)


class GateRunner(web.AppRunner):
    """`web.AppRunner` serving its app through a `GateServer`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        kwargs: dict[str, Any] = dict(server._kwargs)
        return GateServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **kwargs,
        )
