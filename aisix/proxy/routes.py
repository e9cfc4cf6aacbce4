"""The proxy app's routes: every client API aisix serves, and the handler of each.

``POST /v1/chat/completions``, ``/v1/embeddings``, ``GET /v1/models[/{model}]``
(:mod:`.handlers`, the OpenAI API); ``POST /v1/messages`` and ``/v1/messages/count_tokens`` (the
Anthropic Messages API, :mod:`.messages`), ``POST /v1/responses`` (the OpenAI Responses API,
stateless subset, :mod:`.responses`) and ``POST /v1/completions`` (legacy text completions,
:mod:`.completions`). Each takes the same keys, limits, routing and measurement; what passes
through and what is translated is said in each module.
"""
from __future__ import annotations

from aiohttp import web

from aisix.proxy import completions, handlers, messages, responses


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
