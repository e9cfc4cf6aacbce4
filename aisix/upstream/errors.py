"""What can go wrong talking to an upstream, in transport terms, before any API meaning.

A small taxonomy in the spirit of httpcore's (https://www.encode.io/httpcore/exceptions/): the
transports (:mod:`aisix.upstream.pool`, :mod:`aisix.upstream.raw`, :mod:`aisix.upstream.mock`)
raise these and nothing else; the proxy turns them into the client's error in one place
(:func:`aisix.proxy.upstream_errors.gateway_error`) and the router decides on them whether to
retry (``connect_error`` and ``timeout`` are retried; a broken stream never is once a byte went
to the client). Each carries a human ``message`` that names no secret (no URL query, no header).
"""
from __future__ import annotations


class UpstreamError(Exception):
    """Base of every transport failure. ``message``: str, safe to show a client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConnectError(UpstreamError):
    """No connection: refused, reset, DNS failure, no host in the URL, or closed by the upstream
    before it sent any byte of an answer. The upstream did not process the request."""


class ConnectTimeout(UpstreamError):
    """Connecting took longer than ``connect_timeout_ms``."""


class ReadTimeout(UpstreamError):
    """Connected, but no byte arrived for ``read_timeout_ms`` while the gateway waited (for the
    response head, or between body reads)."""


class RemoteProtocolError(UpstreamError):
    """The upstream answered with bytes that are not valid HTTP/1.1 (a bad status line, bad
    framing, a second response nobody asked for)."""


class ResponseTooLarge(UpstreamError):
    """The response head or a body read whole is over the gateway's limits (``MAX_HEAD_BYTES``,
    ``max_response_bytes``, ...)."""


class StreamBroken(UpstreamError):
    """The answer began (status and headers arrived), then the connection broke or closed before
    the body was complete."""


def body_too_large(limit: int) -> ResponseTooLarge:
    """A body read whole that is over ``limit`` bytes (``provider_config.max_response_bytes``)."""
    return ResponseTooLarge(f"the upstream's response body is over {limit} bytes (provider_config.max_response_bytes)")
