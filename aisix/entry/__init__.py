"""More ways in: client APIs besides OpenAI chat completions, each to every provider.

``POST /v1/messages`` and ``/v1/messages/count_tokens`` (the Anthropic Messages API,
:mod:`.messages`), ``POST /v1/responses`` (the OpenAI Responses API, stateless subset,
:mod:`.responses`) and ``POST /v1/completions`` (legacy text completions, :mod:`.completions`).
Each takes the same keys, limits, routing and measurement as ``/v1/chat/completions``
(:mod:`aisix.proxy`); what passes through and what is translated is said in each module.
"""
from __future__ import annotations

from aiohttp import web

from . import completions, messages, responses


def add_routes(app: web.Application) -> None:
    """Register the routes on the proxy app."""
    app.router.add_post("/v1/messages", messages.create)
    app.router.add_post("/v1/messages/count_tokens", messages.count_tokens)
    app.router.add_post("/v1/responses", responses.create)
    app.router.add_post("/v1/completions", completions.create)
