"""The HTTP servers: the proxy app, the Admin API app, the measuring middleware, start and stop.

Start-up: config → store (load, upsert the file's resources) → telemetry → listeners.
Shutdown on SIGTERM/SIGINT: stop accepting, let in-flight requests (streams too) finish up to
``server.shutdown_grace_ms``, then drain the telemetry batcher and flush both exporters.
SIGHUP: worker 0 re-reads the config file's ``models``/``apikeys`` (:func:`reload_resources`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from time import perf_counter_ns

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from . import proxy
from .config import Config, ConfigError, load_config, parse_listen
from .cors import enable_cors
from .errors import CLIENT_CLOSED_REQUEST, GatewayError, error_type_for
from .gateway import GATEWAY, Gateway
from .hooks import Pipeline
from .proxy import RECORD
from .snapshot import SnapshotHolder
from .store import StoreError, create_store
from .telemetry import RequestRecord, Telemetry, parse_traceparent, request_id
from .telemetry.otel import instance_id
from .telemetry.tracecontext import new_span_id, new_trace_id
from .upstream import UpstreamPool

log = logging.getLogger("aisix")
#: One DEBUG line per request (``--log-level debug``): method, route, status, model, ms, request id.
access_log = logging.getLogger("aisix.access")

#: After the grace, the longest wait for cancelled requests to unwind before telemetry is flushed (s).
SHUTDOWN_SLACK_S = 1.0

#: ``endpoint`` label of requests that matched no route (keeps label values bounded).
UNMATCHED = "unmatched"


#: Probes on the proxy listener, never measured as proxy traffic.
HEALTH_PATHS = frozenset(("/livez", "/readyz"))
#: Set on the Admin API app: its requests are counted in ``aisix_admin_request_count``.
ADMIN_APP = web.AppKey("aisix_admin_app", bool)


@web.middleware
async def measure(request: web.Request, handler) -> web.StreamResponse:
    """Times the request from arrival to the last body byte sent, turns errors into the OpenAI
    envelope, and submits the record. A client that went away is measured as 499. Every
    response not already carrying one gets the gateway's ``x-request-id``
    (:func:`~aisix.telemetry.request_id`)."""
    if request.path in HEALTH_PATHS:
        return await handler(request)
    start_ns = perf_counter_ns()
    resource = request.match_info.route.resource
    rec = RequestRecord(request.method, resource.canonical if resource is not None else _unmatched_endpoint(request),
                        request.path, time.time_ns(), start_ns)
    rec.admin = request.app.get(ADMIN_APP, False)
    ctx = parse_traceparent(request.headers.get("traceparent"))
    if ctx is not None:
        rec.trace_id, rec.parent_span_id, rec.trace_flags = ctx
    else:
        rec.trace_id = new_trace_id()
        # TraceIdRatioBased, as the OTel SDK decides it: the trace id's low 64 bits under a bound
        rec.trace_flags = 1 if (rec.trace_id & 0xFFFFFFFFFFFFFFFF) < request.app[GATEWAY].telemetry.sample_bound else 0
    rec.span_id = new_span_id()
    request[RECORD] = rec
    inflight = request.app[GATEWAY].inflight
    inflight.add(request.task)
    try:
        try:
            if request.headers.get("Content-Encoding", "identity").strip().lower() not in ("identity", ""):
                # bodies are never inflated (auto_decompress=False): no decompression bomb can stall the loop
                raise GatewayError(415, "Compressed request bodies (Content-Encoding) are not supported.",
                                   "invalid_request_error", "unsupported_content_encoding")
            resp = await handler(request)
        except GatewayError as e:
            rec.error = e.message
            resp = e.response()
        except web.HTTPException as e:
            resp = GatewayError(e.status, _http_error_message(e, request), error_type_for(e.status),
                                _http_error_code(e.status), headers=_allow_header(e)).response()
        if not resp.prepared:
            rid = resp.headers["x-aisix-request-id"] = request_id(rec)
            if "x-request-id" not in resp.headers:
                resp.headers["x-request-id"] = rid
            await resp.prepare(request)
            await resp.write_eof()
        if rec.status == 0:
            rec.status = resp.status
        return resp
    except asyncio.CancelledError:
        gw = request.app[GATEWAY]
        # cancelled by the shutdown after the grace ran out: the gateway's failure, not the client's
        rec.status = 503 if gw.draining else CLIENT_CLOSED_REQUEST
        if gw.draining:
            rec.error = "cut at shutdown: server.shutdown_grace_ms ran out"
        raise
    except ConnectionResetError:  # the client went away while we wrote: nothing more to send
        rec.status = CLIENT_CLOSED_REQUEST
        return _GONE
    except Exception as e:
        log.exception("unhandled error on %s %s", request.method, rec.endpoint)
        rec.status = 500
        rec.error = f"internal error: {type(e).__name__}"
        if request.writer is not None and request.writer.output_size > 0:
            # the status line already went out (a stream): never write a second response into it
            if request.transport is not None:
                request.transport.close()
            return _GONE
        err = GatewayError(500, "The gateway failed to handle the request.", "api_error", "internal_error")
        return err.response()
    finally:
        inflight.discard(request.task)
        rec.end_ns = perf_counter_ns()
        request.app[GATEWAY].telemetry.submit(rec)
        if access_log.isEnabledFor(logging.DEBUG):
            access_log.debug("%s %s %d model=%s %.1fms id=%s", rec.method, rec.endpoint, rec.status,
                             rec.model or "-", (rec.end_ns - rec.start_ns) / 1e6, request_id(rec))  # = x-aisix-request-id


def _unmatched_endpoint(request: web.Request) -> str:
    """The ``endpoint`` label of a request no route took: its route's template when only the method
    was wrong (405; our routes are plain paths), else ``unmatched``."""
    for res in request.app.router.resources():
        if res.canonical == request.path:
            return res.canonical
    return UNMATCHED


class _Gone(web.StreamResponse):
    """Returned for a connection that is already closed: aiohttp's attempt to send it fails with
    ConnectionError, which it handles quietly (no second response, no traceback)."""

    async def prepare(self, request):
        raise ConnectionResetError("the connection is closed")


_GONE = _Gone()


class _EnvelopeRequestHandler(RequestHandler):
    """aiohttp's protocol handler, but errors its HTTP parser raises (a header over 8 KiB, a
    malformed request line, ...) are answered in the OpenAI envelope, and logged without the
    raw request head (which may carry ``Authorization``).

    Writes to a client that stops reading time out: when the transport's write buffer passes its
    high-water mark (``pause_writing``) and does not drain below the low one (``resume_writing``)
    within ``write_timeout`` seconds, the connection is aborted. The handler is then cancelled
    (``handler_cancellation``), so the request is measured 499 and frees what it holds (its
    concurrency slot, its upstream connection). One timer per stall, none on the hot path."""

    write_timeout: float | None = None
    _write_timer: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_timeout and self._write_timer is None:
            self._write_timer = asyncio.get_running_loop().call_later(self.write_timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_write_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_write_timer()
        super().connection_lost(exc)

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        log.debug("a client read nothing for %.0f ms: disconnecting it", self.write_timeout * 1000)
        if self.transport is not None:
            self.transport.abort()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status == 500:
            return super().handle_error(request, status, exc, message)
        log.info("bad HTTP request from %s: %s (HTTP %d)", request.remote, type(exc).__name__ if exc else "", status)
        if request.writer.output_size > 0:
            raise ConnectionError("response already sent")
        text = {400: "The request is not valid HTTP/1.1.", 413: "The request is too large.",
                431: "The request headers are too large."}.get(status, "The request could not be handled.")
        resp = GatewayError(status, text, error_type_for(status), "bad_http_request").response()
        resp.force_close()
        return resp


class _EnvelopeServer(web.Server):
    write_timeout: float | None = None

    def __call__(self) -> RequestHandler:
        handler = _EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.write_timeout = self.write_timeout
        return handler


class _Runner(web.AppRunner):
    """An AppRunner whose connections use :class:`_EnvelopeRequestHandler` (``write_timeout`` in s)."""

    def __init__(self, app: web.Application, *, write_timeout: float | None = None, **kwargs):
        super().__init__(app, **kwargs)
        self.write_timeout = write_timeout

    async def _make_server(self):
        server = await super()._make_server()
        server.__class__ = _EnvelopeServer  # the same object; only how it makes protocol handlers differs
        server.write_timeout = self.write_timeout
        return server


def _http_error_message(e: web.HTTPException, request: web.Request) -> str:
    if e.status == 404:
        return f"Unknown route: {request.method} {request.path}"
    if e.status == 405:
        return f"Method {request.method} is not allowed on {request.path}"
    if e.status == 413:
        return "The request body is too large."
    if e.status == 403 and e.text and e.text.startswith("CORS"):  # aiohttp-cors refusing a preflight
        return f"{e.text} (allowed origins: server.proxy.cors.allow_origins)"
    return e.reason


def _http_error_code(status: int) -> str:
    return {403: "cors_forbidden", 404: "not_found", 405: "method_not_allowed",
            413: "request_too_large"}.get(status, "http_error")


def _allow_header(e: web.HTTPException) -> dict[str, str]:
    return {"Allow": e.headers["Allow"]} if "Allow" in e.headers else {}


MAX_BODY_BYTES = 32 * 1024 * 1024


def create_proxy_app(gateway: Gateway) -> web.Application:
    """The proxy API app (``/v1/...``) with the measuring middleware."""
    app = web.Application(middlewares=[measure], client_max_size=MAX_BODY_BYTES)
    app[GATEWAY] = gateway
    proxy.add_routes(app)
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


def create_admin_app_measured(gateway: Gateway) -> web.Application | None:
    """The Admin API app, measured like the proxy; None if the Admin API is not available."""
    try:
        from .admin import create_admin_app
    except ImportError:
        return None
    app = create_admin_app(gateway)
    app.middlewares.insert(0, measure)
    app[GATEWAY] = gateway
    app[ADMIN_APP] = True
    return app


def build_pipeline(config: Config, holder: SnapshotHolder, telemetry: Telemetry) -> Pipeline:
    """The hooks: the rate limiter, on this process's counters or on Redis
    (``deployment.rate_limit_store``)."""
    store = config.deployment.rate_limit_store
    if store.kind == "redis":
        from .ratelimit_redis import RedisRateLimitHook
        return Pipeline([RedisRateLimitHook(store, holder, telemetry.count_ratelimit_store_error)])
    from .ratelimit import RateLimitHook
    return Pipeline([RateLimitHook(holder, clock=time.time)])


async def start_gateway(config: Config, worker: int = 0) -> Gateway:
    """Load the store (raising StoreError/ConfigError on a bad one) and build the gateway state.

    Worker 0 (the only one without ``--workers``) owns the store and upserts the config file's
    resources; other workers follow what it writes."""
    holder = SnapshotHolder()
    store = create_store(config, holder, follower=worker > 0)
    await store.start()
    if worker == 0:
        try:
            await store.seed(config.models, config.apikeys)
        except BaseException:
            await store.close()
            raise
    _, port = parse_listen(config.server.proxy.listen)
    try:
        telemetry = Telemetry(config.observability, instance_id(port, worker), worker=worker)
        if telemetry.enabled:
            telemetry.prices.preload(holder.current.models.values())
    except BaseException:  # e.g. the access log or the scrape endpoint can't be opened: a ConfigError
        await store.close()
        raise
    gateway = Gateway(config, holder, store, build_pipeline(config, holder, telemetry), telemetry, UpstreamPool())
    if config.deployment.rate_limit_store.kind == "redis":  # deployments' own limits are counted there too
        gateway.router.shared = gateway.pipeline.hooks[0]
    holder.on_swap(lambda old, new: gateway.router.prune(new.models.values()))
    return gateway


class Server:
    """Runs the proxy and Admin API listeners of one gateway process."""

    def __init__(self, gateway: Gateway, reuse_port: bool = False, admin: bool = True):
        self.gateway = gateway
        self.reuse_port = reuse_port
        self.admin = admin
        self.runners: list[web.AppRunner] = []

    async def start(self) -> None:
        cfg = self.gateway.config
        grace = cfg.server.shutdown_grace_ms / 1000
        apps = [(create_proxy_app(self.gateway), cfg.server.proxy.listen, cfg.server.proxy.client_write_timeout_ms / 1000)]
        admin = create_admin_app_measured(self.gateway) if self.admin else None
        if admin is not None:
            apps.append((admin, cfg.server.admin.listen, None))
        self.gateway.telemetry.start()
        try:
            for app, listen, write_timeout in apps:
                runner = _Runner(app, handle_signals=False, access_log=None, shutdown_timeout=grace,
                                 handler_cancellation=True, auto_decompress=False, keepalive_timeout=75,
                                 write_timeout=write_timeout)
                await runner.setup()
                self.runners.append(runner)
                host, port = parse_listen(listen)
                await web.TCPSite(runner, host, port, reuse_port=self.reuse_port or None).start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop accepting, wait for in-flight requests (up to the grace), then flush telemetry.
        Requests still running when the grace runs out are cancelled then (not after a second
        wait, as aiohttp's ``shutdown_timeout`` alone would do) and measured as 503."""
        self.gateway.draining = True
        cleanups = [asyncio.ensure_future(r.cleanup()) for r in self.runners]
        self.runners.clear()
        if cleanups:
            _, pending = await asyncio.wait(cleanups, timeout=self.gateway.config.server.shutdown_grace_ms / 1000)
            if pending:
                for task in list(self.gateway.inflight):
                    task.cancel()
                await asyncio.wait(pending, timeout=SHUTDOWN_SLACK_S)
            for t in cleanups:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    log.warning("stopping a listener failed: %r", t.exception())
        await self.gateway.pool.close()
        await self.gateway.pipeline.aclose()
        await self.gateway.store.close()
        await self.gateway.telemetry.stop()


async def reload_resources(gateway: Gateway) -> bool:
    """Re-read the config file (``gateway.config.source``) and upsert its ``models`` and ``apikeys``
    into the store, as at start-up (by name / by key; nothing is deleted, nothing else of the file
    is applied). The new snapshot serves from the next request; requests and connections under way
    are untouched. A file that no longer loads, or a store that refuses the write, is logged and
    the current configuration kept. Returns whether the upsert happened."""
    source = gateway.config.source
    if source == "embedded default":
        log.info("SIGHUP: no config file to re-read (embedded default)")
        return False
    try:
        fresh = load_config(source)
        await gateway.store.seed(fresh.models, fresh.apikeys)
    except (ConfigError, StoreError) as e:
        log.error("SIGHUP: keeping the current configuration: %s", e)
        return False
    log.warning("SIGHUP: re-read %s: %d models and %d API keys upserted", source, len(fresh.models),
                len(fresh.apikeys))
    return True


async def serve(config: Config, banner=None, worker: int = 0, reuse_port: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully. SIGHUP: worker 0 runs
    :func:`reload_resources`; other workers ignore it (they follow what worker 0 writes)."""
    gateway = await start_gateway(config, worker)
    server = Server(gateway, reuse_port, admin=worker == 0)
    await server.start()  # on failure it has already stopped what it started
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    def on_hup() -> None:
        if worker == 0:
            task = loop.create_task(reload_resources(gateway))
            reloads.add(task)
            task.add_done_callback(reloads.discard)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if banner:
        banner(gateway)
    if fd := os.environ.pop("AISIX_READY_FD", None):  # tell a --workers supervisor we listen
        os.write(int(fd), b"1")
        os.close(int(fd))
    await stop.wait()
    log.info("shutting down: finishing in-flight requests (up to %.0f ms)", config.server.shutdown_grace_ms)
    await server.stop()
    log.info("stopped")
