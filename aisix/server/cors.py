"""CORS on the proxy listener, for browser clients: off unless ``server.proxy.cors`` is set.

aiohttp-cors (aio-libs) does the protocol (https://fetch.spec.whatwg.org/#http-cors-protocol):
it answers preflights (``OPTIONS`` with ``Access-Control-Request-Method``) on every route and adds
``Access-Control-Allow-Origin`` and friends to every response of an allowed origin on a route,
errors and streams included (it hooks ``on_response_prepare``). The answers of no route (aiohttp's
404 and 405, sent in the envelope by :func:`aisix.server.middleware.http_error`) it leaves alone;
:func:`enable_cors` adds the same headers to those, so a browser can read those errors too.
Preflights are measured like any request.
"""
from __future__ import annotations

import aiohttp_cors
from aiohttp import hdrs, web

from aisix.config.loader import CorsConfig

#: Response headers a browser lets scripts read without ``Access-Control-Expose-Headers``
#: (the CORS-safelisted response headers, https://fetch.spec.whatwg.org/#cors-safelisted-response-header-name).
SAFELISTED = frozenset(h.lower() for h in ("Cache-Control", "Content-Language", "Content-Length", "Content-Type",
                                           "Expires", "Last-Modified", "Pragma"))


def enable_cors(app: web.Application, cfg: CorsConfig) -> None:
    """Allow ``cfg.allow_origins`` on every route of ``app`` (call after all routes are added),
    and on the answers of no route (404, 405)."""
    options = aiohttp_cors.ResourceOptions(
        allow_credentials=cfg.allow_credentials,
        expose_headers="*" if cfg.expose_headers == ["*"] else tuple(cfg.expose_headers),
        allow_headers="*" if cfg.allow_headers == ["*"] else tuple(cfg.allow_headers),
        max_age=cfg.max_age_s, allow_methods="*")
    defaults = {origin: options for origin in cfg.allow_origins}
    cors = aiohttp_cors.setup(app, defaults=defaults)
    for route in list(app.router.routes()):
        cors.add(route)

    async def on_unrouted(request: web.Request, response: web.StreamResponse) -> None:
        """aiohttp-cors' headers (CORS 6.1) on a response no route produced (its resource is None)."""
        origin = request.headers.get(hdrs.ORIGIN)
        opts = defaults.get(origin, defaults.get("*")) if origin is not None else None
        if opts is None or request.match_info.route.resource is not None \
                or hdrs.ACCESS_CONTROL_ALLOW_ORIGIN in response.headers:
            return
        if opts.expose_headers == "*":
            exposed = [h for h in response.headers if h.lower() not in SAFELISTED]
        else:
            exposed = list(opts.expose_headers)
        if exposed:
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = ",".join(exposed)
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        if opts.allow_credentials:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"

    app.on_response_prepare.append(on_unrouted)
