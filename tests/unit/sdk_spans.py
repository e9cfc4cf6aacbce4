"""The oracle for the span encoder: the spans the gateway sent through the OpenTelemetry SDK
before it encoded them itself (``ReadableSpan`` s, then the SDK exporter's own encoder), built
from a record exactly as ``aisix.telemetry.batcher`` built them up to commit 02f3245, plus the prompt-cache
attributes added since."""
from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from aisix.telemetry.otlp_spans import GEN_AI_PROVIDER


def sdk_request(records, resource, scope) -> ExportTraceServiceRequest:
    """What the SDK's OTLP exporter would send for ``records`` (one request, every span)."""
    spans = []
    for r in records:
        spans += sdk_spans(r, resource, scope)
    return encode_spans(spans)


def sdk_spans(r, resource, scope) -> list[ReadableSpan]:
    """The SERVER span of record ``r`` and a CLIENT span per attempt, as SDK ``ReadableSpan`` s."""
    wall = r.start_wall_ns - r.start_ns
    flags = TraceFlags(r.trace_flags)
    parent = SpanContext(r.trace_id, r.parent_span_id, is_remote=True, trace_flags=flags) if r.parent_span_id else None
    attrs = {"http.request.method": r.method, "url.path": r.path, "http.route": r.endpoint,
             "http.response.status_code": r.status}
    if r.model is not None:
        attrs["gen_ai.operation.name"] = r.operation
        attrs["gen_ai.provider.name"] = GEN_AI_PROVIDER.get(r.provider, r.provider or "")
        attrs["gen_ai.request.model"] = r.request_model or ""
        attrs["aisix.model"] = r.model
        attrs["aisix.stream"] = r.stream
        if r.response_model:
            attrs["gen_ai.response.model"] = r.response_model
        if r.total_tokens is not None or r.usage_estimated:
            attrs["gen_ai.usage.input_tokens"] = r.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = r.completion_tokens
            _cache_attributes(r, attrs)
            if r.usage_estimated:
                attrs["aisix.usage.estimated"] = True
        if r.finish_reasons:
            attrs["gen_ai.response.finish_reasons"] = list(r.finish_reasons)
        if r.upstream_status is not None:
            attrs["aisix.upstream.status_code"] = r.upstream_status
        if r.cost_usd is not None:
            attrs["aisix.cost_usd"] = r.cost_usd
    status = Status(StatusCode.UNSET)
    if r.status >= 500:
        status = Status(StatusCode.ERROR, r.error or None)
        attrs["error.type"] = str(r.status)
    events = (Event("gen_ai.first_token", timestamp=r.first_token_ns + wall),) if r.first_token_ns else ()
    server = SpanContext(r.trace_id, r.span_id, is_remote=False, trace_flags=flags)
    out = [ReadableSpan(f"{r.method} {r.endpoint}", server, parent, resource, attrs, events, kind=SpanKind.SERVER,
                        status=status, start_time=r.start_wall_ns, end_time=r.end_ns + wall,
                        instrumentation_scope=scope)]
    return out + [_attempt_span(r, a, server, flags, wall, resource, scope) for a in r.attempts]


def _attempt_span(r, a, server, flags, wall, resource, scope) -> ReadableSpan:
    attrs = {"gen_ai.operation.name": r.operation, "gen_ai.provider.name": GEN_AI_PROVIDER.get(a.provider, a.provider),
             "gen_ai.request.model": a.upstream_model, "server.address": a.server_address,
             "aisix.model": a.model, "aisix.deployment": a.deployment}
    status = Status(StatusCode.UNSET)
    if a.ok:
        if a.status.isdigit():
            attrs["http.response.status_code"] = int(a.status)
        if r.response_model:
            attrs["gen_ai.response.model"] = r.response_model
        if r.total_tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = r.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = r.completion_tokens
            _cache_attributes(r, attrs)
    else:
        attrs["error.type"] = a.status
        if a.status.isdigit():
            attrs["http.response.status_code"] = int(a.status)
        status = Status(StatusCode.ERROR, a.error)
    return ReadableSpan(f"{r.operation} {a.upstream_model}", SpanContext(r.trace_id, a.span_id, is_remote=False,
                                                                          trace_flags=flags),
                        server, resource, attrs, (), kind=SpanKind.CLIENT, status=status,
                        start_time=a.start_ns + wall, end_time=a.end_ns + wall, instrumentation_scope=scope)


def _cache_attributes(r, attrs: dict) -> None:
    """Added after 02f3245: the prompt-cache parts of the input, when reported."""
    if r.cached_tokens:
        attrs["gen_ai.usage.cache_read.input_tokens"] = r.cached_tokens
    if r.cache_write_tokens:
        attrs["gen_ai.usage.cache_creation.input_tokens"] = r.cache_write_tokens
