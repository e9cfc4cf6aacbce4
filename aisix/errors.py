"""Errors in the OpenAI error envelope.

Shape (https://platform.openai.com/docs/guides/error-codes):
``{"error": {"message": str, "type": str, "code": str | None}}``
"""
from __future__ import annotations

from typing import Mapping

import orjson


class GatewayError(Exception):
    """An error that ends a request with an OpenAI-shaped error body.

    ``status`` is the HTTP status (int); ``headers`` extra response headers
    (e.g. ``Retry-After``). Raise it anywhere on the request path; the server
    middleware turns it into the response (:func:`aisix.server.middleware.error_response`).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, headers: Mapping[str, str] | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.upstream_status: int | None = None  # what the upstream answered, when this came from it

    def body(self) -> dict:
        """The envelope as a dict: ``{"error": {"message", "type", "code"[, "param"]}}``."""
        err = {"message": self.message, "type": self.type, "code": self.code}
        if self.param is not None:
            err["param"] = self.param
        return {"error": err}

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    def sse_event(self) -> bytes:
        """The error as one SSE event (``data: {...}\\n\\n``) for a stream already under way."""
        return b"data: " + self.to_bytes() + b"\n\n"



def invalid_request(message: str, code: str | None = None, param: str | None = None) -> GatewayError:
    """400 ``invalid_request_error``."""
    return GatewayError(400, message, "invalid_request_error", code, param=param)


def upstream_unreachable(message: str) -> GatewayError:
    """502 ``upstream_unreachable``: the upstream could not be reached (refused, reset or closed
    before it answered)."""
    return GatewayError(502, message, "api_error", "upstream_unreachable")


def upstream_malformed(message: str) -> GatewayError:
    """502 ``upstream_malformed_response``: the upstream answered, with something that is not what
    its API documents (a body that is not JSON, an event of the wrong shape, bad HTTP framing)."""
    return GatewayError(502, message, "api_error", "upstream_malformed_response")


def upstream_stream_broken(message: str) -> GatewayError:
    """502 ``upstream_stream_broken``: the upstream's answer began, then its connection broke or
    it closed before the response was complete (a stream before its finish, a body cut short)."""
    return GatewayError(502, message, "api_error", "upstream_stream_broken")


def upstream_too_large(message: str) -> GatewayError:
    """502: the upstream's response (its head, or a body read whole) is over the gateway's limits."""
    return GatewayError(502, message, "api_error", "upstream_response_too_large")


def upstream_body_too_large(limit: int) -> GatewayError:
    """502 ``upstream_response_too_large`` for a body read whole over ``limit`` bytes."""
    return upstream_too_large(f"the upstream's response body is over {limit} bytes (provider_config.max_response_bytes)")


def upstream_timeout(message: str) -> GatewayError:
    """504: the upstream did not answer in time."""
    return GatewayError(504, message, "timeout_error", "upstream_timeout")


# nginx's convention for "client closed request": the status a request is measured
# with when the client went away before the response was fully sent.
CLIENT_CLOSED_REQUEST = 499

_TYPE_BY_STATUS = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_error",
}


def error_type_for(status: int) -> str:
    """The OpenAI error ``type`` usual for an HTTP status (5xx → ``api_error``)."""
    return _TYPE_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
