"""The provider interface: OpenAI shapes in, an upstream call out, OpenAI shapes back.

Every provider is sans-IO: it builds an :class:`~aisix.upstream.pool.UpstreamRequest`, turns a
whole response body into an OpenAI body, and gives a :class:`StreamDecoder` that turns each
upstream SSE event into the OpenAI ``chat.completion.chunk`` bytes to send (or nothing).
All I/O lives in the proxy (:mod:`aisix.proxy.handlers`), which sends the request through the
transports of :mod:`aisix.upstream`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from aisix.config.resources import Model
from aisix.errors import GatewayError
from aisix.providers.errors import error_envelope
from aisix.sse import SSEEvent
from aisix.upstream.pool import UpstreamRequest

#: Token counts at or above this (2**40, ~1.1e12 tokens) are taken as malformed usage.
MAX_TOKENS = 1 << 40


@dataclass(slots=True)
class Usage:
    """Token counts as OpenAI reports them (tokens). ``cached_tokens``: prompt tokens read from the
    provider's prompt cache (OpenAI ``prompt_tokens_details.cached_tokens``, DeepSeek
    ``prompt_cache_hit_tokens``, Anthropic ``cache_read_input_tokens``, Gemini
    ``cachedContentTokenCount``); ``cache_write_tokens``: prompt tokens written to it (Anthropic
    ``cache_creation_input_tokens``). Both are part of ``prompt_tokens``; they are priced apart."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    @classmethod
    def from_openai(cls, u: Mapping | None) -> "Usage | None":
        """From an OpenAI ``usage`` object; ``None`` if absent or malformed."""
        if not isinstance(u, Mapping):
            return None
        try:
            p = int(u.get("prompt_tokens") or 0)
            c = int(u.get("completion_tokens") or 0)
            t = int(u.get("total_tokens") or (p + c))
        except (TypeError, ValueError, OverflowError):
            return None
        if not (0 <= p < MAX_TOKENS and 0 <= c < MAX_TOKENS and 0 <= t < MAX_TOKENS):
            return None  # nonsense counts would poison the cumulative token counters for good
        return cls(p, c, t, _cached_of(u, p))


def _cached_of(u: Mapping, prompt: int) -> int:
    """Cached prompt tokens of an OpenAI-style ``usage`` (0 when absent or malformed; never over ``prompt``)."""
    details = u.get("prompt_tokens_details")
    n = details.get("cached_tokens") if isinstance(details, Mapping) else None
    if n is None:
        n = u.get("prompt_cache_hit_tokens")  # DeepSeek's name
    return n if type(n) is int and 0 <= n <= prompt else 0


#: Token estimate where an upstream gives no count: one token per this many bytes of request JSON
#: (OpenAI's ~4 characters per token for English; the JSON framing makes it err high).
BYTES_PER_TOKEN = 4


@dataclass(slots=True)
class ChatResult:
    """A whole (non-streamed) response translated to OpenAI: ``body`` is the JSON bytes to send."""

    body: bytes
    usage: Usage | None
    response_model: str | None = None
    finish_reasons: tuple[str, ...] = ()


#: What one upstream SSE event was: the bits of the ``kind`` that :meth:`StreamDecoder.feed` returns.
OTHER = 0   #: nothing the relay acts on: a comment, a role-only opener, a usage chunk, a ping
TOKEN = 1   #: generated output (content, reasoning, a tool call, a refusal): the first one is the first token
FINISH = 2  #: a finish reason (the model stopped; the stream may still carry usage, then its end)
DONE = 4    #: the upstream's end of stream (``[DONE]``, ``message_stop``, ``response.completed``)
ERROR = 8   #: an error event: the stream ends with :attr:`StreamDecoder.error`; nothing of it is sent


class StreamDecoder:
    """Per-stream state: feed upstream SSE events, get client bytes and a small event back.

    :meth:`feed` returns ``(bytes to send or None, kind)``, ``kind`` a sum of :data:`TOKEN`,
    :data:`FINISH`, :data:`DONE`, :data:`ERROR` (or :data:`OTHER`). TOKEN is exact up to the first
    token; after it a decoder may report a chunk it relays unparsed (the hot path) as TOKEN.
    What the stream got is read once, at its end: ``usage`` (the upstream's, once seen),
    ``response_model``, ``finish_reasons``; ``error`` is the :class:`GatewayError` of the ERROR
    event; ``finished``/``done`` say whether a FINISH/DONE came (for :meth:`end`).
    """

    include_usage: bool  # the client asked for the usage chunk

    def __init__(self, include_usage: bool):
        self.include_usage = include_usage
        self.usage: Usage | None = None
        self.error: GatewayError | None = None
        self.done = False
        self.finished = False  # a finish_reason was seen
        self.response_model: str | None = None
        self.finish_reasons: list[str] = []

    def feed(self, event: SSEEvent) -> tuple[bytes | None, int]:
        """``(bytes to send to the client for this event or None, kind)`` (see the class doc)."""
        raise NotImplementedError

    def end(self) -> bytes | None:
        """The upstream closed cleanly: final bytes to send (e.g. a ``data: [DONE]`` it left out)."""
        return None if self.done else b"data: [DONE]\n\n"

    def error_event(self, err: GatewayError) -> bytes:
        """The event that ends a stream already under way with ``err``, in the client's API
        (OpenAI's: ``data: {"error": {...}}``; the Messages and Responses decoders frame their own)."""
        return err.sse_event()


class Provider:
    """One upstream API. Subclasses set ``name``/``default_api_base`` and implement the methods."""

    name = ""
    default_api_base = ""
    #: The request header that carries ``provider_config.api_key``, and what precedes the key in it.
    key_header = "Authorization"
    key_prefix = "Bearer "

    def base_url(self, model: Model) -> str:
        return (model.provider_config.api_base or self.default_api_base).rstrip("/")

    def headers(self, model: Model, extra: Mapping[str, str]) -> dict[str, str]:
        """The upstream request's headers: a JSON body, no compression (the stream is relayed as
        its bytes), ``extra`` (``traceparent``, the API's version), then the API key, if any."""
        h = {"Content-Type": "application/json", "Accept-Encoding": "identity", **extra}
        if model.provider_config.api_key:
            h[self.key_header] = self.key_prefix + model.provider_config.api_key
        return h

    def chat_request(self, model: Model, body: dict, stream: bool, headers: dict[str, str]) -> UpstreamRequest:
        """The upstream call for an OpenAI chat completion ``body`` (a dict the caller owns; it may be
        changed). ``headers`` carries what the proxy adds (``traceparent``). Raises GatewayError 400
        for a request this provider cannot express."""
        raise NotImplementedError

    def chat_response(self, body: bytes) -> ChatResult:
        """Translate a 2xx whole response. Raises GatewayError 502 on a body that cannot be read."""
        raise NotImplementedError

    def stream_decoder(self, include_usage: bool) -> StreamDecoder:
        raise NotImplementedError

    def completions_request(self, model: Model, body: dict, stream: bool, headers: dict[str, str]) -> UpstreamRequest:
        """The upstream call for a legacy text completion ``body`` (``POST /v1/completions``,
        https://platform.openai.com/docs/api-reference/completions), passed through; its answer is
        read as a chat completion's (:meth:`chat_response`, :meth:`stream_decoder`). Raises 400
        ``unsupported_operation``: only OpenAI-compatible providers have this API."""
        raise GatewayError(400, f"provider `{self.name}` has no legacy completions API (POST /v1/completions); "
                           "use POST /v1/chat/completions", "invalid_request_error", "unsupported_operation")

    def embeddings_request(self, model: Model, body: dict, headers: dict[str, str]) -> UpstreamRequest:
        """The upstream call for an OpenAI embeddings ``body``. Raises GatewayError 400 if unsupported."""
        raise GatewayError(400, f"provider `{self.name}` does not support embeddings",
                           "invalid_request_error", "unsupported_operation")

    def embeddings_response(self, body: bytes, request: UpstreamRequest | None = None) -> ChatResult:
        """Translate a 2xx embeddings response. ``request`` is what :meth:`embeddings_request` built
        (Gemini needs it: its response has no token count and no model)."""
        raise NotImplementedError

    def error_from_response(self, status: int, headers: Mapping[str, str], body: bytes) -> GatewayError:
        """An upstream 4xx/5xx as an OpenAI error with the same status, whole and with its retry
        hints (:func:`~aisix.providers.errors.error_envelope`); a 5xx stays a 5xx."""
        return error_envelope(self.name, status, headers, body)

    def refused_stream_options(self, model: Model, err: GatewayError) -> bool:
        """Whether ``err`` (an upstream answer to a streamed request) rejects the ``stream_options``
        the gateway added, so the call should be made once more without them. Only OpenAI-style
        providers add them; the default is False."""
        return False

    def refused_credentials(self, status: int, err: GatewayError) -> bool:
        """Whether the upstream's error says it refused the *gateway's* provider credentials
        (401/403/407 here; a provider whose API answers a bad key otherwise says so)."""
        return status in (401, 403, 407)
