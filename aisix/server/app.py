"""The two aiohttp apps of a gateway process: the proxy API and the Admin API, each behind
:func:`~aisix.server.middleware.measure`."""
from __future__ import annotations

from aiohttp import web

from aisix.admin.api import create_admin_app
from aisix.gateway import GATEWAY, Gateway
from aisix.proxy import routes
from aisix.server.cors import enable_cors
from aisix.server.middleware import ADMIN_APP, measure

#: The largest request body the proxy reads (bytes); larger ones get 413 ``request_too_large``.
MAX_BODY_BYTES = 32 * 1024 * 1024


def create_proxy_app(gateway: Gateway) -> web.Application:
    """The proxy API app (``/v1/...``, ``/livez``, ``/readyz``) with the measuring middleware."""
    app = web.Application(middlewares=[measure], client_max_size=MAX_BODY_BYTES)
    app[GATEWAY] = gateway
    routes.add_routes(app)
    app.router.add_get("/livez", _livez)
    app.router.add_get("/readyz", _readyz)
    if gateway.config.server.proxy.cors is not None:
        enable_cors(app, gateway.config.server.proxy.cors)
    return app


async def _livez(request: web.Request) -> web.Response:
    """``GET /livez``: 200 while the process serves HTTP at all."""
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 once the store is loaded (the listener opens only after that) and
    until shutdown begins; 503 while draining, so a load balancer stops sending new requests."""
    if request.app[GATEWAY].draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})


def create_admin_app_measured(gateway: Gateway) -> web.Application:
    """The Admin API app (:func:`aisix.admin.api.create_admin_app`), measured like the proxy
    (``aisix_admin_request_count``) and answering every failure in the same envelope."""
    app = create_admin_app(gateway)
    app.middlewares.insert(0, measure)
    app[ADMIN_APP] = True
    return app
