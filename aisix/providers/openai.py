"""OpenAI and OpenAI-compatible upstreams (``openai``, ``deepseek``, any ``api_base``).

Streaming passes bytes through untouched: each upstream event is relayed as its raw bytes,
parsed only as far as the metrics need (the first token, usage, errors, finish reasons).
Wire format: https://platform.openai.com/docs/api-reference/chat-streaming
"""
from __future__ import annotations

import orjson

from aisix.config.resources import Model
from aisix.errors import GatewayError, upstream_malformed
from aisix.providers.base import DONE, ERROR, FINISH, OTHER, TOKEN, ChatResult, Provider, StreamDecoder, Usage
from aisix.providers.errors import error_fields, json_text, status_of_error_event
from aisix.sse import SSEEvent
from aisix.upstream.pool import UpstreamRequest

_DELTA_OUTPUT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal", "tool_calls", "function_call")


def delta_has_output(choices) -> bool:
    """True if any choice's ``delta`` carries generated output (non-empty content, reasoning,
    refusal, tool call or function call). A role-only opener (``content: ""``) is not output."""
    if not isinstance(choices, list):
        return False
    for ch in choices:
        delta = ch.get("delta") if isinstance(ch, dict) else None
        if isinstance(delta, dict):
            for f in _DELTA_OUTPUT_FIELDS:
                if delta.get(f):
                    return True
        elif isinstance(ch, dict) and ch.get("text"):  # legacy completions chunk
            return True
    return False


def error_from_event(err, name: str) -> GatewayError:
    """An upstream error object sent as a stream event, as a GatewayError whole (message, type,
    param, code) with the status it stands for (:func:`~aisix.providers.errors.status_of_error_event`:
    a 400 ``invalid_request_error`` is a 400, a rate limit a 429, 502 when it can't be told). That
    status answers the client when no byte was sent yet; after that, the stream ends with it."""
    message, etype, param, code = error_fields(err)
    if not message and err is not None and not isinstance(err, (dict, str)):
        message = json_text(err)
    e = GatewayError(status_of_error_event(err), message or f"upstream {name} reported an error mid-stream",
                     etype or "api_error", code, param=param)
    e.upstream_status = 200
    return e


def _null_or_absent(data: bytes, key: bytes) -> bool:
    """True if ``key`` (a quoted JSON key) is absent from ``data`` or its first occurrence is
    followed by ``null`` (OpenAI sends ``"usage":null`` and ``"finish_reason":null`` on every
    chunk). A cheap byte scan; when in doubt it says False and the caller parses."""
    i = data.find(key)
    if i < 0:
        return True
    i += len(key)
    n = len(data)
    while i < n and data[i] in b" \t\r\n:":
        i += 1
    return data.startswith(b"null", i)


class OpenAIStreamDecoder(StreamDecoder):
    """Relays OpenAI chunks byte for byte; drops the ``choices: []`` usage chunk unless asked for."""

    name = "openai"

    def feed(self, event: SSEEvent) -> tuple[bytes | None, int]:
        data = event.data
        if data is None:  # comments / keep-alives: relayed, never tokens
            return event.raw, OTHER
        if data == b"[DONE]":
            self.done = True
            return event.raw, DONE
        if self.token_seen and _null_or_absent(data, b'"usage"') and _null_or_absent(data, b'"finish_reason"') \
                and b'"error"' not in data:
            return event.raw, TOKEN  # the hot path after the first token: no parse
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            if not data.strip():
                return event.raw, OTHER  # an empty data line: nothing (SSE dispatches no such event)
            self.error = upstream_malformed(f"upstream {self.name} sent an event that is not a JSON object")
            return None, ERROR
        if "error" in obj and obj["error"] is not None:
            self.error = error_from_event(obj["error"], self.name)
            return None, ERROR
        if self.response_model is None and isinstance(obj.get("model"), str):
            self.response_model = obj["model"]
        choices = obj.get("choices")
        kind = OTHER
        if delta_has_output(choices):  # every parsed event; after the first token only a finish or usage is
            self.token_seen = True
            kind = TOKEN
        if isinstance(choices, list):
            for ch in choices:
                fr = ch.get("finish_reason") if isinstance(ch, dict) else None
                if isinstance(fr, str):
                    self.finished = True
                    self.finish_reasons.append(fr)
                    kind |= FINISH
        usage = Usage.from_openai(obj.get("usage"))
        if usage is not None:
            self.usage = usage
            if not self.include_usage and not choices:
                return None, kind  # the usage chunk we asked for on the client's behalf
        return event.raw, kind

    def __init__(self, include_usage: bool):
        super().__init__(include_usage)
        self.token_seen = False


class OpenAIProvider(Provider):
    """``POST {api_base}/chat/completions`` with ``Authorization: Bearer {api_key}``."""

    name = "openai"
    default_api_base = "https://api.openai.com/v1"

    def __init__(self):
        self._no_stream_options: set[tuple[str, str]] = set()  # (alias, api_base) whose upstream refused them

    def chat_request(self, model: Model, body: dict, stream: bool, headers: dict[str, str]) -> UpstreamRequest:
        """The body as the client sent it, ``model`` rewritten; a stream also asks for usage
        (``stream_options.include_usage``, merged into the client's own) unless the model's
        ``provider_config.stream_usage`` is ``never`` or its upstream refused them (``auto``), in
        which case no ``stream_options`` go at all. ``body`` is not changed."""
        return self._json_request("/chat/completions", model, body, stream, headers)

    def completions_request(self, model: Model, body: dict, stream: bool, headers: dict[str, str]) -> UpstreamRequest:
        """``POST {api_base}/completions``: the body as :meth:`chat_request` passes it on."""
        return self._json_request("/completions", model, body, stream, headers)

    def _json_request(self, path: str, model: Model, body: dict, stream: bool, headers: dict[str, str]) -> UpstreamRequest:
        out = {**body, "model": model.model_id}
        if stream:
            mode = model.provider_config.stream_usage
            if mode == "always" or mode == "auto" and (model.name, self.base_url(model)) not in self._no_stream_options:
                opts = body.get("stream_options")
                out["stream_options"] = {**opts, "include_usage": True} if isinstance(opts, dict) else {"include_usage": True}
            else:  # never, or an upstream that refused them: none go, the client's own neither
                out.pop("stream_options", None)
        return UpstreamRequest(f"{self.base_url(model)}{path}", self.headers(model, headers), orjson.dumps(out))

    def refused_stream_options(self, model: Model, err: GatewayError) -> bool:
        """``stream_usage: auto`` and a 400 whose message or ``param`` names ``stream_options``
        (strict OpenAI-compatible servers reject the field): remember it for this model and its
        ``api_base`` (for this process's life) and say to retry once without them."""
        key = (model.name, self.base_url(model))
        if model.provider_config.stream_usage != "auto" or err.status != 400 or key in self._no_stream_options:
            return False
        if "stream_options" not in err.message and "stream_options" not in (err.param or ""):
            return False
        self._no_stream_options.add(key)
        return True

    def chat_response(self, body: bytes) -> ChatResult:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise upstream_malformed(f"upstream {self.name} sent a body that is not JSON") from e
        if isinstance(obj, dict) and obj.get("error") is not None and "choices" not in obj:
            e = error_from_event(obj["error"], self.name)  # a 200 whose body is an error: keep its message
            e.status = 502
            e.message = f"upstream {self.name} answered 200 with an error: {e.message}"
            raise e
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list) and not isinstance(obj.get("data") if isinstance(obj, dict) else None, list):
            raise upstream_malformed(f"upstream {self.name} sent a body of an unexpected shape")
        reasons = tuple(ch.get("finish_reason") for ch in choices or ()
                        if isinstance(ch, dict) and isinstance(ch.get("finish_reason"), str))
        model = obj.get("model") if isinstance(obj.get("model"), str) else None
        return ChatResult(body, Usage.from_openai(obj.get("usage")), model, reasons)

    def stream_decoder(self, include_usage: bool) -> StreamDecoder:
        d = OpenAIStreamDecoder(include_usage)
        d.name = self.name
        return d

    def embeddings_request(self, model: Model, body: dict, headers: dict[str, str]) -> UpstreamRequest:
        body["model"] = model.model_id
        return UpstreamRequest(f"{self.base_url(model)}/embeddings", self.headers(model, headers),
                               orjson.dumps(body))

    def embeddings_response(self, body: bytes, request: UpstreamRequest | None = None) -> ChatResult:
        return self.chat_response(body)


class DeepSeekProvider(OpenAIProvider):
    """DeepSeek speaks the OpenAI API (https://api-docs.deepseek.com/)."""

    name = "deepseek"
    default_api_base = "https://api.deepseek.com/v1"


class MockProvider(OpenAIProvider):
    """The built-in ``mock`` provider: OpenAI's API, answered in the process by the ``mock://``
    transport (:class:`aisix.upstream.mock.MockTransport`), no network and no key."""

    name = "mock"
    default_api_base = "mock://local"
