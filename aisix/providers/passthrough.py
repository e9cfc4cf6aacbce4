"""Native pass-through: a client's request body sent to an upstream that speaks the same API,
and the upstream's answer relayed as its own bytes, measured on the way.

Two native APIs pass through: the Anthropic Messages API (``POST /v1/messages`` and
``/v1/messages/count_tokens`` to the ``anthropic`` provider, https://docs.anthropic.com/en/api/messages)
and the OpenAI Responses API (``POST /v1/responses`` to the ``openai`` provider,
https://platform.openai.com/docs/api-reference/responses). The body goes as the client sent it
but for ``model`` (:func:`rewrite_model`); the stream decoders here relay every event as its raw
bytes and read only what the metrics need: the first token, usage, the stop reason, errors.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

import orjson

from aisix.config.resources import Model
from aisix.errors import GatewayError, invalid_request
from aisix.providers.anthropic import API_VERSION, AnthropicStreamDecoder, usage_of
from aisix.providers.anthropic import _finish as finish_reason
from aisix.providers.base import DONE, ERROR, FINISH, OTHER, TOKEN, ChatResult, Provider, StreamDecoder, Usage
from aisix.providers.messages_chat import anthropic_error_body
from aisix.providers.openai import OpenAIProvider, error_from_event
from aisix.providers.responses_chat import responses_error_event
from aisix.providers.translate import as_int, guard_answer, load_object, str_or
from aisix.sse import SSEEvent
from aisix.upstream.pool import UpstreamRequest

#: Client headers an Anthropic upstream gets as sent (https://docs.anthropic.com/en/api/versioning,
#: https://docs.anthropic.com/en/api/beta-headers); ``anthropic-version`` defaults to :data:`API_VERSION`.
ANTHROPIC_CLIENT_HEADERS = ("anthropic-version", "anthropic-beta")

#: Anthropic ``stop_reason`` / Responses ``status`` values in OpenAI's ``finish_reason`` words, for
#: ``gen_ai.response.finish_reasons`` (one vocabulary on every route).
_RESPONSES_FINISH = {"completed": "stop", "incomplete": "length", "failed": "error", "cancelled": "error"}


def rewrite_model(raw: bytes, body: dict, model_id: str) -> bytes:
    """``raw`` (a JSON object's bytes, ``body`` its parse) with the top-level ``model`` value set to
    ``model_id`` and every other byte as it was. Each ``"model"`` key found in the bytes is tried
    in turn: the one whose replaced value makes the body parse to ``body`` but for ``model`` is
    it (a nested ``"model"`` key changes something else). When none is (the key written with
    escapes, ``"mod\\u0065l"``), the body is serialised anew: the same JSON, other bytes.
    Raises 400 ``duplicate_key`` when the object has ``model`` more than once (the gateway routes
    by the last one; an upstream that keeps the first would serve a model the key may not use)."""
    if raw.count(b'"model"') > 1 and _top_level_model_repeats(raw):
        raise invalid_request("`model` appears more than once in the request body.", "duplicate_key", "model")
    want = {**body, "model": model_id}
    new_value = orjson.dumps(model_id)
    start = 0
    while (i := raw.find(b'"model"', start)) >= 0:
        start = i + 7
        if i and raw[i - 1] == 92:  # a backslash: the word inside a string
            continue
        j = start
        while j < len(raw) and raw[j] in b" \t\r\n:":
            j += 1
        if j >= len(raw) or raw[j] != 34:  # the top-level model is a string: resolve_model checked it
            continue
        end = _string_end(raw, j)
        candidate = raw[:j] + new_value + raw[end:]
        try:
            if orjson.loads(candidate) == want:
                return candidate
        except orjson.JSONDecodeError:
            continue
    return orjson.dumps(want)


def _top_level_model_repeats(raw: bytes) -> bool:
    """Whether the top-level object of ``raw`` has the key ``model`` twice or more (the standard
    library's parser reports every pair; orjson keeps the last). Only called when the bytes hold
    ``"model"`` more than once."""
    top: list = []

    def pairs(items):  # called innermost first: the top-level object's pairs come last
        top[:] = [k for k, _ in items]
        return None
    json.loads(raw, object_pairs_hook=pairs)
    return top.count("model") > 1


def _string_end(raw: bytes, quote: int) -> int:
    """The index just after the JSON string that opens at ``raw[quote]``."""
    k = quote + 1
    while True:
        k = raw.find(b'"', k)
        if k < 0:
            return len(raw)
        n = 0
        while raw[k - 1 - n] == 92:
            n += 1
        k += 1
        if n % 2 == 0:
            return k


def anthropic_request(provider: Provider, model: Model, raw: bytes, path: str, client: Mapping[str, str],
                      extra: dict[str, str]) -> UpstreamRequest:
    """``POST {api_base}{path}`` (``/messages`` or ``/messages/count_tokens``) with the body
    ``raw`` as it is, ``x-api-key`` from ``provider_config``, the client's ``anthropic-version``
    (else :data:`API_VERSION`) and ``anthropic-beta``, and ``extra`` (``traceparent``)."""
    h = {"anthropic-version": API_VERSION}
    for name in ANTHROPIC_CLIENT_HEADERS:
        if (v := client.get(name)) is not None:
            h[name] = v
    return UpstreamRequest(f"{provider.base_url(model)}{path}", provider.headers(model, {**h, **extra}), raw)


def openai_request(provider: OpenAIProvider, model: Model, raw: bytes, path: str,
                   extra: dict[str, str]) -> UpstreamRequest:
    """``POST {api_base}{path}`` (``/responses``) with the body ``raw`` as it is and the
    provider's usual headers (``Authorization: Bearer``)."""
    return UpstreamRequest(f"{provider.base_url(model)}{path}", provider.headers(model, extra), raw)


# -- Anthropic Messages --------------------------------------------------------------------------
@guard_answer
def anthropic_result(body: bytes) -> ChatResult:
    """A whole Messages API response, as it is (``body`` unchanged), measured: usage
    (``prompt_tokens`` = ``input_tokens`` + ``cache_creation_input_tokens`` +
    ``cache_read_input_tokens``, ``completion_tokens`` = ``output_tokens``), model, stop reason
    (in ``finish_reason`` words). Raises 502 for a body that is not a JSON object."""
    obj = load_object(body, "anthropic")
    usage, _ = usage_of(obj.get("usage"))
    reason = obj.get("stop_reason")
    return ChatResult(body, usage if isinstance(obj.get("usage"), dict) else None,
                      str_or(obj.get("model"), None), (finish_reason(reason),) if reason is not None else ())


def anthropic_error_event(err: GatewayError) -> bytes:
    """``err`` as the Messages API's stream ``error`` event (``event: error``, ``{"type": "error",
    "error": {"type", "message"}}``, https://docs.anthropic.com/en/docs/build-with-claude/streaming#error-events)."""
    return b"event: error\ndata: " + orjson.dumps(anthropic_error_body(err)) + b"\n\n"


class _UpstreamErrorEvent:
    """Relays the upstream's own error event as it was sent, unless its message had to change
    (a secret masked in it): then :meth:`error_event` frames the changed error anew."""

    error: GatewayError | None
    _error_raw: tuple[bytes, str] | None = None

    def _keep_error(self, event: SSEEvent) -> None:
        if self.error is not None and self._error_raw is None:
            self._error_raw = (event.raw, self.error.message)

    def _raw_error(self, err: GatewayError) -> bytes | None:
        raw = self._error_raw
        return raw[0] if raw is not None and err is self.error and err.message == raw[1] else None


class AnthropicEventsDecoder(_UpstreamErrorEvent, AnthropicStreamDecoder):
    """A Messages API stream relayed as the upstream sent it (every event, ``ping`` and comments
    included, as its raw bytes), measured by :class:`~aisix.providers.anthropic.AnthropicStreamDecoder`'s
    reading of it: usage (``message_start``, then each ``message_delta``), stop reason, ``error``
    events, ``message_stop`` (the end). First token: the first ``content_block_delta`` that
    carries text, thinking or tool input. A stream that finished without ``message_stop`` gets it;
    an upstream ``error`` event ends it, relayed as sent (framed anew if its message was masked)."""

    def __init__(self):
        super().__init__(False)

    def feed(self, event: SSEEvent) -> tuple[bytes | None, int]:
        _, kind = super().feed(event)
        if kind & ERROR:
            self._keep_error(event)
            return None, kind
        return event.raw, kind

    def on_event(self, obj: dict, name: str | None) -> bytes | None:
        out = super().on_event(obj, name)
        if self.token and (obj.get("type") or name) != "content_block_delta":
            self.token = False  # a tool_use block's start names the tool; its input is the output
        return out

    def end(self) -> bytes | None:
        return None if self.done else b'event: message_stop\ndata: {"type":"message_stop"}\n\n'

    def error_event(self, err: GatewayError) -> bytes:
        return self._raw_error(err) or anthropic_error_event(err)


# -- OpenAI Responses ----------------------------------------------------------------------------
def usage_of_response(u) -> Usage | None:
    """The Responses API's ``usage`` (``input_tokens``, ``output_tokens``, ``total_tokens``) in
    tokens; None when absent or not an object."""
    if not isinstance(u, dict):
        return None
    p, c = as_int(u.get("input_tokens")), as_int(u.get("output_tokens"))
    return Usage(p, c, as_int(u.get("total_tokens")) or p + c)


def _response_measures(resp: dict) -> tuple[Usage | None, str | None, tuple[str, ...]]:
    status = resp.get("status")
    finish = _RESPONSES_FINISH.get(status) if isinstance(status, str) else None
    return usage_of_response(resp.get("usage")), str_or(resp.get("model"), None), (finish,) if finish else ()


@guard_answer
def responses_result(body: bytes) -> ChatResult:
    """A whole Responses API ``response`` object, as it is, measured (usage, model, status).
    Raises 502 for a body that is not a JSON object."""
    usage, model, finish = _response_measures(load_object(body, "openai"))
    return ChatResult(body, usage, model, finish)


#: Responses stream events that carry generated output (the first one is the first token).
OUTPUT_EVENTS = frozenset(("response.output_text.delta", "response.function_call_arguments.delta",
                           "response.refusal.delta", "response.reasoning_summary_text.delta",
                           "response.reasoning_text.delta", "response.custom_tool_call_input.delta"))
#: The events that end a Responses stream (it has no ``[DONE]``), with the whole response.
END_EVENTS = frozenset(("response.completed", "response.incomplete", "response.failed"))


class ResponsesEventsDecoder(_UpstreamErrorEvent, StreamDecoder):
    """A Responses API stream relayed as the upstream sent it, measured: the first output delta
    (:data:`OUTPUT_EVENTS`) is the first token; ``response.completed`` / ``.incomplete`` /
    ``.failed`` end it with the response's usage; an ``error`` event ends it with its error
    (relayed as sent, framed anew if its message was masked).
    Events are read by their ``type`` (the ``event:`` line, else the JSON's ``type``)."""

    def __init__(self):
        super().__init__(False)

    def feed(self, event: SSEEvent) -> tuple[bytes | None, int]:
        kind = event.event
        if event.data is None or kind is not None and kind not in END_EVENTS and kind != "error":
            return event.raw, TOKEN if kind in OUTPUT_EVENTS else OTHER
        try:
            obj = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return event.raw, OTHER
        if not isinstance(obj, dict):
            return event.raw, OTHER
        kind = kind or obj.get("type")
        if not isinstance(kind, str):
            return event.raw, OTHER
        if kind in OUTPUT_EVENTS:
            return event.raw, TOKEN
        if kind == "error":
            self.error = error_from_event(obj.get("error") if isinstance(obj.get("error"), dict) else obj, "openai")
            self._keep_error(event)
            return None, ERROR
        if kind in END_EVENTS:
            resp = obj.get("response") if isinstance(obj.get("response"), dict) else {}
            self.usage, self.response_model, finish = _response_measures(resp)
            self.finish_reasons.extend(finish)
            self.finished = self.done = True
            return event.raw, FINISH | DONE
        return event.raw, OTHER

    def end(self) -> bytes | None:
        return None

    def error_event(self, err: GatewayError) -> bytes:
        return self._raw_error(err) or responses_error_event(err)
