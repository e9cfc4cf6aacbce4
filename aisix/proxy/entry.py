"""What the entry routes share, around :mod:`aisix.proxy.handlers`'s pieces (authentication, model and
key checks, hooks, routing, the relay)."""
from __future__ import annotations

from aiohttp import web

from aisix.config.resources import Model
from aisix.errors import invalid_request
from aisix.hooks.pipeline import Call
from aisix.providers import Provider, StreamDecoder
from aisix.providers.reencode import ChunkEncoder, ReencodingDecoder
from aisix.proxy.handlers import (
    _prepare_call,
    _upstream_headers,
    _whole,
    _with_hooks,
    call_streamable,
    relay_stream,
    route,
)
from aisix.upstream.pool import UpstreamResponse


def stream_flag(body: dict) -> bool:
    """The body's ``stream`` (absent: False). 400 ``invalid_type`` when it is not a boolean."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid_request("`stream` must be a boolean.", "invalid_type", "stream")
    return stream


def chat_max_tokens_field(provider: str) -> str:
    """The chat field a translated output limit goes in: ``max_completion_tokens`` for the
    ``openai`` provider (its reasoning models refuse ``max_tokens``), ``max_tokens`` for the others
    (DeepSeek and many OpenAI-compatible servers know only it; the translators read both)."""
    return "max_completion_tokens" if provider == "openai" else "max_tokens"


async def prepare(request: web.Request, operation: str) -> tuple[Call, dict, bytes, bool]:
    """Authenticate, read the body, resolve the model (:func:`aisix.proxy.handlers._prepare_call`), read
    ``stream``. Returns ``(call, body, raw body bytes, stream)``."""
    call, body = await _prepare_call(request, operation)
    stream = stream_flag(body)
    call.record.stream = call.stream = stream
    return call, body, await request.read(), stream


def run(request: web.Request, call: Call, attempt) -> web.StreamResponse:
    """The call with the hooks (limits) around it and the routing (deployments, retries,
    fallbacks) inside: ``await attempt(provider, target)`` per try."""
    return _with_hooks(request, call, lambda: route(request, call, attempt))


async def respond(request: web.Request, call: Call, up: UpstreamResponse, stream: bool, decoder: StreamDecoder,
                  result) -> web.StreamResponse:
    """The upstream's answer to the client: a stream relayed through ``decoder``, else the whole
    body through ``result(bytes) -> ChatResult``."""
    if stream:
        return await relay_stream(request, up, decoder, call)
    return await _whole(up, call, result)


async def translated(request: web.Request, call: Call, provider: Provider, target: Model, chat: dict, stream: bool,
                     encoder: ChunkEncoder, result) -> web.StreamResponse:
    """The request as the chat completion ``chat`` to ``provider`` (its own translator), the answer
    back through ``encoder`` (streamed) or ``result(ChatResult) -> ChatResult`` (whole)."""
    trace = _upstream_headers(call)
    up = await call_streamable(request, call, provider, stream,
                               lambda: provider.chat_request(target, dict(chat), stream, trace))
    decoder = ReencodingDecoder(provider.stream_decoder(True), encoder)
    return await respond(request, call, up, stream, decoder, lambda data: result(provider.chat_response(data)))
