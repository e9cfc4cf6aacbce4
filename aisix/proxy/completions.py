"""``POST /v1/completions``: legacy text completions (https://platform.openai.com/docs/api-reference/completions).

Passed through to OpenAI-compatible providers (``openai``, ``deepseek``, ``mock``): the body as
the chat route passes one (``model`` rewritten; a stream asks for usage, the usage chunk
dropped again unless the client asked for it), the answer relayed as the upstream's bytes.
Other providers have no such API: 400 ``unsupported_operation``. Measured like chat
completions: ``gen_ai.operation.name`` is ``text_completion``; the first token is the first
chunk whose choice carries ``text``.
"""
from __future__ import annotations

from aiohttp import web

from aisix.config.resources import Model
from aisix.providers import Provider
from aisix.proxy.entry import prepare, respond, run
from aisix.proxy.handlers import _upstream_headers, call_streamable


async def create(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``, streamed or not."""
    call, body, _, stream = await prepare(request, "text_completion")
    opts = body.get("stream_options")
    include_usage = stream and isinstance(opts, dict) and opts.get("include_usage") is True

    async def attempt(provider: Provider, target: Model) -> web.StreamResponse:
        up = await call_streamable(request, call, provider, stream, lambda: provider.completions_request(
            target, body, stream, _upstream_headers(call)))
        return await respond(request, call, up, stream, provider.stream_decoder(include_usage), provider.chat_response)

    return await run(request, call, attempt)
