"""The HTTP/1.1 protocol layer under both apps: aiohttp's, with two changes.

Errors its HTTP parser raises (a header over 8 KiB, a malformed request line, ...) are answered in
the OpenAI envelope and logged without the raw request head (which may carry ``Authorization``);
a client that stops reading is disconnected after ``write_timeout`` seconds.
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from aisix.errors import GatewayError, error_type_for
from aisix.server.middleware import error_response

log = logging.getLogger("aisix")


class EnvelopeRequestHandler(RequestHandler):
    """aiohttp's protocol handler, but errors its HTTP parser raises (a header over 8 KiB, a
    malformed request line, ...) are answered in the OpenAI envelope, and logged without the
    raw request head (which may carry ``Authorization``).

    Writes to a client that stops reading time out: when the transport's write buffer passes its
    high-water mark (``pause_writing``) and does not drain below the low one (``resume_writing``)
    within ``write_timeout`` seconds, the connection is aborted. The handler is then cancelled
    (``handler_cancellation``), so the request is measured 499 and frees what it holds (its
    concurrency slot, its upstream connection). One timer per stall, none on the hot path."""

    write_timeout: float | None = None
    _write_timer: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_timeout and self._write_timer is None:
            self._write_timer = asyncio.get_running_loop().call_later(self.write_timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_write_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_write_timer()
        super().connection_lost(exc)

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        log.debug("a client read nothing for %.0f ms: disconnecting it", self.write_timeout * 1000)
        if self.transport is not None:
            self.transport.abort()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status == 500:
            return super().handle_error(request, status, exc, message)
        log.info("bad HTTP request from %s: %s (HTTP %d)", request.remote, type(exc).__name__ if exc else "", status)
        if request.writer.output_size > 0:
            raise ConnectionError("response already sent")
        text = {400: "The request is not valid HTTP/1.1.", 413: "The request is too large.",
                431: "The request headers are too large."}.get(status, "The request could not be handled.")
        resp = error_response(GatewayError(status, text, error_type_for(status), "bad_http_request"))
        resp.force_close()
        return resp


class EnvelopeServer(web.Server):
    """aiohttp's low-level server, making :class:`EnvelopeRequestHandler` protocol handlers."""

    write_timeout: float | None = None

    def __call__(self) -> RequestHandler:
        handler = EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.write_timeout = self.write_timeout
        return handler


class Runner(web.AppRunner):
    """An AppRunner whose connections use :class:`EnvelopeRequestHandler` (``write_timeout`` in s)."""

    def __init__(self, app: web.Application, *, write_timeout: float | None = None, **kwargs):
        super().__init__(app, **kwargs)
        self.write_timeout = write_timeout

    async def _make_server(self):
        server = await super()._make_server()
        server.__class__ = EnvelopeServer  # the same object; only how it makes protocol handlers differs
        server.write_timeout = self.write_timeout
        return server
