"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: the Anthropic Messages API
(https://docs.anthropic.com/en/api/messages, https://docs.anthropic.com/en/api/messages-count-tokens).

Keys: ``x-api-key: <aisix key>`` (the ``anthropic`` SDK's header) or ``Authorization: Bearer``.
To a deployment on the ``anthropic`` provider the request passes through: the body as the client
sent it with only ``model`` rewritten to the upstream model id, the client's ``anthropic-version``
and ``anthropic-beta`` headers, and the answer relayed as the upstream's bytes (every SSE event as
sent), so ``cache_control``, ``thinking``, tools, images and betas all survive. To any other
provider it is translated to a chat completion and back
(:mod:`aisix.providers.messages_chat`), streamed as the Messages event sequence. Every error
under ``/v1/messages`` (the handlers', the middleware's own 413/415/500, a 404/405) is in
Anthropic's envelope ``{"type": "error", "error": {"type", "message"}}``, with the status it
stands for: the middleware chooses it by route (:func:`aisix.proxy.routes.error_envelope`); a
stream's error is its ``error`` event. Tokens come from the Messages usage fields (``input_tokens`` +
``cache_creation_input_tokens`` + ``cache_read_input_tokens`` are the prompt, ``output_tokens``
the completion); the first token is the first ``content_block_delta`` with output.

``count_tokens`` goes to Anthropic's endpoint for an ``anthropic`` model; for others it is an estimate (:func:`~aisix.providers.messages_chat.estimate_input_tokens`),
said so by ``x-aisix-token-count: estimated`` and ``"estimated": true`` in the body. It passes
the key's and the model's rate limits like any call (one request of rpm/rpd, a concurrency slot
while it runs, the ``x-ratelimit-*`` headers, a 429 when over); its answer charges 0 tokens (it
generates nothing, and its count is not usage).
"""
from __future__ import annotations

import orjson
from aiohttp import web

from aisix.config.resources import Model
from aisix.providers import Provider
from aisix.providers.messages_chat import (
    MessagesEncoder,
    chat_body,
    estimate_input_tokens,
    message_result,
)
from aisix.providers.passthrough import (
    AnthropicEventsDecoder,
    anthropic_request,
    anthropic_result,
    rewrite_model,
)
from aisix.proxy.entry import chat_max_tokens_field, prepare, respond, run, translated
from aisix.proxy.handlers import (
    _call_upstream,
    _passthrough,
    _prepare_call,
    _upstream_headers,
    _with_hooks,
    read_whole,
)


async def create(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``, streamed (``"stream": true``) or not."""
    call, body, raw, stream = await prepare(request, "chat")

    async def attempt(provider: Provider, target: Model) -> web.StreamResponse:
        if provider.name == "anthropic":
            upreq = anthropic_request(provider, target, rewrite_model(raw, body, target.model_id), "/messages",
                                      request.headers, _upstream_headers(call))
            up = await _call_upstream(request, call, provider, upreq)
            return await respond(request, call, up, stream, AnthropicEventsDecoder(), anthropic_result)
        chat = chat_body(body, chat_max_tokens_field(provider.name))
        return await translated(request, call, provider, target, chat, stream, MessagesEncoder(), message_result)

    return await run(request, call, attempt)


async def count_tokens(request: web.Request) -> web.Response:
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": n}``."""
    call, body = await _prepare_call(request, "count_tokens")
    raw = await request.read()

    async def attempt(provider: Provider, target: Model) -> web.Response:
        if provider.name != "anthropic":
            return _estimate(body, call.response_headers)
        upreq = anthropic_request(provider, target, rewrite_model(raw, body, target.model_id),
                                  "/messages/count_tokens", request.headers, _upstream_headers(call))
        up = await _call_upstream(request, call, provider, upreq)
        data = await read_whole(up, call)
        call.record.llm_start_ns = 0  # not a generation: kept out of aisix_llm_latency
        return web.Response(body=data, content_type="application/json", headers=_passthrough(up, call.response_headers))

    async def estimate() -> web.Response:  # after the pre-call hooks: their headers go on it
        return _estimate(body, call.response_headers)

    if not any(t.provider == "anthropic" for t in call.model.targets):
        return await _with_hooks(request, call, estimate)
    return await run(request, call, attempt)


def _estimate(body: dict, headers: dict[str, str]) -> web.Response:
    doc = {"input_tokens": estimate_input_tokens(body), "estimated": True}
    return web.Response(body=orjson.dumps(doc), content_type="application/json",
                        headers={**headers, "x-aisix-token-count": "estimated"})
