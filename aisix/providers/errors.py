"""Upstream errors read once: the OpenAI error envelope, the retry hints, and statuses.

One parser for every provider: :func:`error_envelope` reads an OpenAI-shaped
``{"error": {"message", "type", "param", "code"}}`` (https://platform.openai.com/docs/guides/error-codes);
Anthropic and Gemini parse only their own shape and fall back to it. :func:`retry_headers` is
the one reader of the hints a client's retry logic uses.
"""
from __future__ import annotations

from typing import Mapping

import orjson

from aisix.errors import GatewayError, error_type_for

#: Status an OpenAI error ``type`` stands for, when an error arrives with no status of its own
#: (the first event of a stream that already answered 200).
STATUS_BY_TYPE = {
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
    "not_found_error": 404, "rate_limit_error": 429, "requests": 429, "tokens": 429,
    "insufficient_quota": 429, "overloaded_error": 529, "timeout_error": 504, "server_error": 500,
}
#: The same for OpenAI error ``code`` values that say more than their ``type``.
STATUS_BY_CODE = {
    "rate_limit_exceeded": 429, "insufficient_quota": 429, "context_length_exceeded": 400,
    "invalid_api_key": 401, "model_not_found": 404,
}


def json_text(v) -> str:
    """An upstream error's ``message``/``code`` as text: a string as it is, anything else as its
    JSON encoding (never a Python repr)."""
    if isinstance(v, str):
        return v
    try:
        return orjson.dumps(v).decode()
    except TypeError:  # orjson.JSONEncodeError: only for what orjson.loads cannot produce
        return ""


def retry_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream's retry hints, to pass back: ``retry-after``, ``retry-after-ms`` (which the
    openai client reads first) and every ``x-ratelimit-*`` header; names in lower case but
    ``Retry-After`` (header names are case-insensitive, RFC 9110 §5.1)."""
    out = {}
    for name, value in headers.items():
        low = name.lower()
        if low == "retry-after":
            out["Retry-After"] = value
        elif low == "retry-after-ms" or low.startswith("x-ratelimit-"):
            out[low] = value
    return out


def error_fields(err) -> tuple[str, str | None, str | None, str | None]:
    """``(message, type, param, code)`` of an OpenAI error object (a dict, or a bare string);
    empty message when there is none. Non-string values become their JSON text."""
    if isinstance(err, str):
        return err, None, None, None
    if not isinstance(err, dict):
        return "", None, None, None
    message = json_text(err["message"]) if err.get("message") is not None else ""
    etype = err["type"] if isinstance(err.get("type"), str) and err["type"] else None
    param = json_text(err["param"]) if err.get("param") is not None else None
    code = (json_text(err["code"]) or None) if err.get("code") is not None else None
    return message, etype, param, code


def error_envelope(provider: str, status: int, headers: Mapping[str, str], body: bytes) -> GatewayError:
    """An upstream 4xx/5xx as an OpenAI error with the same status: an OpenAI-style
    ``{"error": {...}}`` is passed on whole (message, type, param, code), a top-level
    ``{"message": ...}`` is used, anything else (HTML, text) gets a generic message; the retry
    hints (:func:`retry_headers`) are kept."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    message, etype, param, code = "", None, None, None
    if isinstance(doc, dict):
        if doc.get("error") is not None:
            message, etype, param, code = error_fields(doc["error"])
        elif doc.get("message") is not None:
            message = json_text(doc["message"])
    if not message:
        message = f"upstream {provider} answered HTTP {status}"
    return GatewayError(status, message, etype or error_type_for(status), code, retry_headers(headers), param)


def status_of_error_event(err) -> int:
    """The HTTP status an error object sent as a stream's first event stands for: from its
    ``status``/``code`` when numeric, else its ``code``, else its ``type``; 502 when it can't be told."""
    if isinstance(err, dict):
        for v in (err.get("status"), err.get("code")):
            if isinstance(v, int) and 400 <= v < 600:
                return v
            if isinstance(v, str) and v.isdigit() and 400 <= int(v) < 600:
                return int(v)
        code, etype = err.get("code"), err.get("type")
        if isinstance(code, str) and code in STATUS_BY_CODE:
            return STATUS_BY_CODE[code]
        if isinstance(etype, str) and etype in STATUS_BY_TYPE:
            return STATUS_BY_TYPE[etype]
    return 502
