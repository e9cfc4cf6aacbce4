"""CORS on the proxy listener, for browser clients: off unless ``server.proxy.cors`` is set.

aiohttp-cors (aio-libs) does the protocol (https://fetch.spec.whatwg.org/#http-cors-protocol):
it answers preflights (``OPTIONS`` with ``Access-Control-Request-Method``) on every route and adds
``Access-Control-Allow-Origin`` and friends to every response of an allowed origin, errors and
streams included (it hooks ``on_response_prepare``). Preflights are measured like any request.
"""
from __future__ import annotations

import aiohttp_cors
from aiohttp import web

from aisix.config.loader import CorsConfig


def enable_cors(app: web.Application, cfg: CorsConfig) -> None:
    """Allow ``cfg.allow_origins`` on every route of ``app`` (call after all routes are added)."""
    options = aiohttp_cors.ResourceOptions(
        allow_credentials=cfg.allow_credentials,
        expose_headers="*" if cfg.expose_headers == ["*"] else tuple(cfg.expose_headers),
        allow_headers="*" if cfg.allow_headers == ["*"] else tuple(cfg.allow_headers),
        max_age=cfg.max_age_s, allow_methods="*")
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in cfg.allow_origins})
    for route in list(app.router.routes()):
        cors.add(route)
