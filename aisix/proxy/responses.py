"""``POST /v1/responses``: the OpenAI Responses API (https://platform.openai.com/docs/api-reference/responses).

To a deployment on the ``openai`` provider it passes through: the body as the client sent it
with only ``model`` rewritten, the answer relayed as the upstream's bytes (its events as sent), so
every feature OpenAI serves (stored responses, ``previous_response_id``, built-in tools) works.
To any other provider the stateless subset is translated to a chat completion and back
(:mod:`aisix.providers.responses_chat`), streamed as the Responses event sequence; a stateful
feature gets a 400 ``unsupported_parameter`` naming it. Errors: the OpenAI envelope. Tokens:
the Responses usage (``input_tokens``, ``output_tokens``); the first token is the first output
delta (``response.output_text.delta``, ``response.function_call_arguments.delta``, …).
"""
from __future__ import annotations

from aiohttp import web

from aisix.config.resources import Model
from aisix.providers import Provider
from aisix.providers.passthrough import (
    ResponsesEventsDecoder,
    openai_request,
    responses_result,
    rewrite_model,
)
from aisix.providers.responses_chat import ResponsesEncoder, chat_body, response_result
from aisix.proxy.entry import chat_max_tokens_field, prepare, respond, run, translated
from aisix.proxy.handlers import _call_upstream, _upstream_headers


async def create(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``, streamed (``"stream": true``) or not."""
    call, body, raw, stream = await prepare(request, "chat")

    async def attempt(provider: Provider, target: Model) -> web.StreamResponse:
        if provider.name == "openai":
            upreq = openai_request(provider, target, rewrite_model(raw, body, target.model_id), "/responses",
                                   _upstream_headers(call))
            up = await _call_upstream(request, call, provider, upreq)
            return await respond(request, call, up, stream, ResponsesEventsDecoder(), responses_result)
        chat = chat_body(body, chat_max_tokens_field(provider.name))
        return await translated(request, call, provider, target, chat, stream, ResponsesEncoder(body),
                                lambda result: response_result(result, body))

    return await run(request, call, attempt)
