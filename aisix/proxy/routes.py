"""The proxy app's routes: every client API aisix serves, and the handler of each.

``POST /v1/chat/completions``, ``/v1/embeddings``, ``GET /v1/models[/{model}]``
(:mod:`.handlers`, the OpenAI API); ``POST /v1/messages`` and ``/v1/messages/count_tokens`` (the
Anthropic Messages API, :mod:`.messages`), ``POST /v1/responses`` (the OpenAI Responses API,
stateless subset, :mod:`.responses`) and ``POST /v1/completions`` (legacy text completions,
:mod:`.completions`). Each takes the same keys, limits, routing and measurement; what passes
through and what is translated is said in each module.
"""
from __future__ import annotations

from typing import Callable

from aiohttp import web

from aisix.errors import GatewayError
from aisix.providers.messages_chat import AnthropicError
from aisix.proxy import completions, handlers, messages, responses

#: The route families whose errors go out in another API's envelope than OpenAI's: the path
#: prefix (the route and every path under it, matched or not) → the error in that envelope.
#: ``/v1/messages`` (+ ``/count_tokens``, and an unknown ``/v1/messages/batches``): Anthropic's.
ERROR_ENVELOPES: tuple[tuple[str, Callable[[GatewayError], GatewayError]], ...] = (
    ("/v1/messages", AnthropicError.of),
)


def add_routes(app: web.Application) -> None:
    """Register every client route on the proxy app (the route template is the ``endpoint`` label)."""
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_post("/v1/embeddings", handlers.embeddings)
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_get("/v1/models/{model:.+}", handlers.retrieve_model)
    app.router.add_post("/v1/messages", messages.create)
    app.router.add_post("/v1/messages/count_tokens", messages.count_tokens)
    app.router.add_post("/v1/responses", responses.create)
    app.router.add_post("/v1/completions", completions.create)


def error_envelope(path: str, err: GatewayError) -> GatewayError:
    """``err`` in the envelope of the API the request ``path`` belongs to (:data:`ERROR_ENVELOPES`;
    every other path: ``err`` itself, the OpenAI envelope). Two string comparisons per family, on
    the error path only (:func:`aisix.server.middleware.error_response` callers)."""
    for prefix, convert in ERROR_ENVELOPES:
        if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
            return convert(err)
    return err
