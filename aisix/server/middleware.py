"""The one middleware both apps run first: measure every request, answer every failure in the
envelope of the route's API: OpenAI's, but Anthropic's under ``/v1/messages``
(:func:`aisix.proxy.routes.error_envelope`; the Admin API: always OpenAI's).

A request is timed from arrival to the last body byte sent (``aisix_request_latency_milliseconds``)
and its :class:`~aisix.telemetry.RequestRecord` submitted to the batcher once, whatever the exit:
a handler's :class:`~aisix.errors.GatewayError`, aiohttp's own 404/405/413 and aiohttp-cors' 403
(:func:`http_error`), a client that went away (499), a shutdown that cut it (503) or a bug (500).
Error envelope: https://platform.openai.com/docs/guides/error-codes
"""
from __future__ import annotations

import asyncio
import logging
import time
from time import perf_counter_ns

from aiohttp import web

from aisix.errors import CLIENT_CLOSED_REQUEST, GatewayError, error_type_for
from aisix.gateway import GATEWAY
from aisix.proxy.handlers import RECORD
from aisix.proxy.routes import error_envelope
from aisix.telemetry import RequestRecord, request_id
from aisix.telemetry.tracecontext import new_span_id, request_context

log = logging.getLogger("aisix")
#: One DEBUG line per request (``--log-level debug``): method, route, status, model, ms, request id.
access_log = logging.getLogger("aisix.access")

#: ``endpoint`` label of requests that matched no route (keeps label values bounded).
UNMATCHED = "unmatched"
#: Probes on the proxy listener, never measured as proxy traffic.
HEALTH_PATHS = frozenset(("/livez", "/readyz"))
#: Set on the Admin API app: its requests are counted in ``aisix_admin_request_count``.
ADMIN_APP = web.AppKey("aisix_admin_app", bool)


@web.middleware
async def measure(request: web.Request, handler) -> web.StreamResponse:
    """Times the request from arrival to the last body byte sent, turns errors into the route's
    envelope (:func:`_error`), and submits the record. A client that went away is measured as 499. Every
    response not already carrying one gets the gateway's ``x-request-id``
    (:func:`~aisix.telemetry.request_id`)."""
    if request.path in HEALTH_PATHS and not request.app.get(ADMIN_APP, False):
        return await _probe(request, handler)
    gw = request.app[GATEWAY]
    rec = request[RECORD] = _new_record(request, gw.telemetry.sample_bound)
    gw.inflight.add(request.task)
    try:
        resp = await _respond(request, handler, rec)
        if rec.status == 0:
            rec.status = resp.status
        return resp
    except asyncio.CancelledError:
        # cancelled by the shutdown after the grace ran out: the gateway's failure, not the client's
        rec.status = 503 if gw.draining else CLIENT_CLOSED_REQUEST
        if gw.draining:
            rec.error = "cut at shutdown: server.shutdown_grace_ms ran out"
        raise
    except ConnectionResetError:  # the client went away while we wrote: nothing more to send
        rec.status = CLIENT_CLOSED_REQUEST
        return _GONE
    except Exception as e:
        return _internal_error(request, rec, e)
    finally:
        gw.inflight.discard(request.task)
        rec.end_ns = perf_counter_ns()
        gw.telemetry.submit(rec)
        if access_log.isEnabledFor(logging.DEBUG):
            access_log.debug("%s %s %d model=%s %.1fms id=%s", rec.method, rec.endpoint, rec.status,
                             rec.model or "-", (rec.end_ns - rec.start_ns) / 1e6, request_id(rec))  # = x-aisix-request-id


async def _probe(request: web.Request, handler) -> web.StreamResponse:
    """A health probe on the proxy listener: not measured, but a wrong method is still a 405 in
    the envelope (with ``Allow``)."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        return error_response(http_error(e, request))


def _new_record(request: web.Request, sample_bound: int) -> RequestRecord:
    """The request's record, stamped on arrival, in the incoming trace or a new one."""
    start_ns = perf_counter_ns()
    resource = request.match_info.route.resource
    rec = RequestRecord(request.method, resource.canonical if resource is not None else _unmatched_endpoint(request),
                        request.path, time.time_ns(), start_ns)
    rec.admin = request.app.get(ADMIN_APP, False)
    rec.trace_id, rec.parent_span_id, rec.trace_flags = request_context(request.headers.get("traceparent"),
                                                                        sample_bound)
    rec.span_id = new_span_id()
    return rec


async def _respond(request: web.Request, handler, rec: RequestRecord) -> web.StreamResponse:
    """The handler's response, or the envelope of the error it raised, sent in full."""
    try:
        if request.headers.get("Content-Encoding", "identity").strip().lower() not in ("identity", ""):
            # bodies are never inflated (auto_decompress=False): no decompression bomb can stall the loop
            raise GatewayError(415, "Compressed request bodies (Content-Encoding) are not supported.",
                               "invalid_request_error", "unsupported_content_encoding")
        te = request.headers.get("Transfer-Encoding")
        if te is not None and te.strip().lower() != "chunked":  # RFC 9112 §6.1: 501 for a coding not understood
            raise GatewayError(501, "Only the chunked transfer coding is supported (Transfer-Encoding).",
                               "invalid_request_error", "unsupported_transfer_encoding")
        resp = await handler(request)
    except GatewayError as e:
        rec.error = e.message
        resp = _error(request, rec, e)
    except web.HTTPException as e:
        resp = _error(request, rec, http_error(e, request))
    if not resp.prepared:
        rid = resp.headers["x-aisix-request-id"] = request_id(rec)
        if "x-request-id" not in resp.headers:
            resp.headers["x-request-id"] = rid
        await resp.prepare(request)
        await resp.write_eof()
    return resp


def _internal_error(request: web.Request, rec: RequestRecord, e: Exception) -> web.StreamResponse:
    """A bug: logged with its traceback, measured 500, answered 500 unless a stream already began
    (then the connection is closed: a second response must never go into it)."""
    log.exception("unhandled error on %s %s", request.method, rec.endpoint)
    rec.status = 500
    rec.error = f"internal error: {type(e).__name__}"
    if request.writer is not None and request.writer.output_size > 0:
        if request.transport is not None:
            request.transport.close()
        return _GONE
    resp = _error(request, rec, GatewayError(500, "The gateway failed to handle the request.", "api_error",
                                             "internal_error"))
    resp.headers["x-aisix-request-id"] = resp.headers["x-request-id"] = request_id(rec)  # to find it in the log
    return resp


def _error(request: web.Request, rec: RequestRecord, err: GatewayError) -> web.Response:
    """``err`` as the response, in the envelope of the API its route belongs to
    (:func:`~aisix.proxy.routes.error_envelope`: Anthropic's under ``/v1/messages``); on the Admin
    API always OpenAI's. Only failures pay for the choice."""
    return error_response(err if rec.admin else error_envelope(request.path, err))


def error_response(err: GatewayError) -> web.Response:
    """``err`` as the response: its status, its envelope as a JSON body (OpenAI's, or the one a
    subclass gives, e.g. Anthropic's), its headers."""
    return web.Response(status=err.status, body=err.to_bytes(), content_type="application/json", headers=err.headers)


def http_error(e: web.HTTPException, request: web.Request) -> GatewayError:
    """aiohttp's own HTTP error (no route 404, wrong method 405 with ``Allow``, body over
    ``client_max_size`` 413, aiohttp-cors' refused preflight 403) as the gateway's error."""
    status = e.status
    if status == 404:
        message = f"Unknown route: {request.method} {request.path}"
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.path}"
    elif status == 413:
        message = f"The request body is too large ({e.text})."  # aiohttp says the limit and the size
    elif status == 403 and e.text and e.text.startswith("CORS"):
        message = f"{e.text} (allowed origins: server.proxy.cors.allow_origins)"
    else:
        message = e.reason
    code = {403: "cors_forbidden", 404: "not_found", 405: "method_not_allowed",
            413: "request_too_large"}.get(status, "http_error")
    headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
    return GatewayError(status, message, error_type_for(status), code, headers=headers)


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
