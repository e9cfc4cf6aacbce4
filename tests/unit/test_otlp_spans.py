"""The gateway's own OTLP span encoding (aisix.telemetry.otlp_spans) sends exactly the spans the
OpenTelemetry SDK sent before (tests/unit/sdk_spans.py: ReadableSpans through the SDK exporter's
encoder): compared message by message, offline and as a real OTLP/gRPC receiver gets them."""
from __future__ import annotations

import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

import aisix
from aisix.config.loader import ObservabilityConfig
from aisix.telemetry import RequestRecord, Telemetry
from aisix.telemetry.otlp_spans import SpanEncoder, any_value, export_request, request_prefix, varint
from aisix.telemetry.records import Attempt
from tests.support import otlp_trace_sink, services
from tests.unit.sdk_spans import sdk_request


def _record(i: int, **kw) -> RequestRecord:
    start = time.perf_counter_ns()
    r = RequestRecord(kw.pop("method", "POST"), kw.pop("endpoint", "/v1/chat/completions"),
                      kw.pop("path", "/v1/chat/completions"), time.time_ns(), start)
    r.trace_id, r.span_id, r.status, r.end_ns = (i + 1) * 0x1234567890ABCDEF1234567, 1000 + i, 200, start + 3_000_000
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def _attempt(r: RequestRecord, span_id: int, status: str, ok: bool, error: str | None = None,
             model="m1", deployment="m1#0") -> Attempt:
    a = Attempt(model, deployment, "openai", "gpt-4o-mini", "api.example.com", span_id, r.start_ns + 10_000)
    a.end(status, ok, r.end_ns - 10_000, error)
    r.attempts.append(a)
    return a


def records() -> list[RequestRecord]:
    """Every shape of record: no model (a 404), admin, whole and streamed chat with usage, cost and
    finish reasons, an incoming (remote) parent, a 502 after a failed attempt and a fallback, an
    estimate of the usage, an upstream error inside a stream, a 4xx, big ids and counts."""
    out = [_record(0, method="GET", endpoint="/v1/models", path="/v1/models"),
           _record(1, method="GET", endpoint="/{tail:.*}", path="/nope/ünï", status=404),
           _record(2, method="PUT", endpoint="/apisix/admin/models/{id}", path="/apisix/admin/models/x", admin=True)]
    r = _record(3, model="m1", provider="openai", request_model="gpt-4o-mini", response_model="gpt-4o-mini-2024",
                finish_reasons=("stop",), cost_usd=0.000123, llm_start_ns=1)
    r.set_usage(12, 34, 46)
    _attempt(r, 31, "200", True)
    out.append(r)
    r = _record(4, model="m1", provider="anthropic", request_model="claude", stream=True, parent_span_id=0xABCDEF,
                trace_flags=1, finish_reasons=("stop", "length"), operation="chat")
    r.first_token_ns = r.start_ns + 1_500_000
    r.set_usage(2**40, 300, 2**40 + 300, cached=5, cache_write=7)
    _attempt(r, 41, "200", True)
    out.append(r)
    r = _record(5, model="m2", provider="gemini", request_model="gemini-2.5", status=502, error="upstream said no",
                upstream_status=503, fallbacks=["m3"])
    _attempt(r, 51, "503", False, "503 from upstream", model="m2", deployment="m2#1")
    _attempt(r, 52, "connect_error", False, "", model="m3", deployment="m3#0")
    _attempt(r, 53, "timeout", False, None, model="m3", deployment="m3#1")
    out.append(r)
    r = _record(6, model="m1", provider="deepseek", request_model="", stream=True, status=200, upstream_status=200)
    r.estimate_usage(7, 0)
    _attempt(r, 61, "200", True)
    out.append(r)
    out.append(_record(7, model="m1", provider=None, request_model=None, status=429, error="slow down"))
    out.append(_record(8, status=500, error=None, trace_id=2**128 - 1, span_id=2**64 - 1))
    r = _record(9, model="m9", provider="openai", request_model="o3", response_model="o3", operation="text_completion",
                cost_usd=12.5)
    r.set_usage(0, 0, 0)
    _attempt(r, 91, "200", True, model="m9", deployment="m9#0")
    out.append(r)
    return out


RESOURCE = Resource.create({"service.name": "aisix-test", "service.instance.id": "host:1/w2", "process.pid": 4242})
SCOPE = InstrumentationScope("aisix", aisix.__version__)


def _ours(recs, encoder=None) -> ExportTraceServiceRequest:
    enc = encoder or SpanEncoder()
    spans = [s for r in recs for s in enc.encode(r)]
    prefix = request_prefix(RESOURCE.attributes, RESOURCE.schema_url, SCOPE.name, SCOPE.version)
    return ExportTraceServiceRequest.FromString(export_request(prefix, spans))


def test_every_shape_of_record_encodes_to_the_spans_the_sdk_sent():
    recs = records()
    ours, sdk = _ours(recs), sdk_request(recs, RESOURCE, SCOPE)
    assert len(sdk.resource_spans[0].scope_spans[0].spans) == 17
    assert ours.resource_spans[0].resource == sdk.resource_spans[0].resource
    assert ours.resource_spans[0].scope_spans[0].scope == sdk.resource_spans[0].scope_spans[0].scope
    for mine, theirs in zip(ours.resource_spans[0].scope_spans[0].spans, sdk.resource_spans[0].scope_spans[0].spans):
        assert mine == theirs, (mine, theirs)
    assert ours == sdk


def test_cached_blocks_give_the_same_bytes_as_fresh_ones_and_the_cache_is_bounded():
    """A second pass through a warm cache encodes the same; a cache past its bound starts over."""
    from aisix.telemetry import otlp_spans
    enc, recs = SpanEncoder(), records()
    first = [s for r in recs for s in enc.encode(r)]
    assert [s for r in recs for s in enc.encode(r)] == first
    assert _ours(recs, enc) == sdk_request(recs, RESOURCE, SCOPE)
    for i in range(otlp_spans._CACHE_MAX + 10):
        enc.encode(_record(i, path=f"/v1/x{i}", endpoint="/{tail:.*}", status=404))
    assert len(enc._blocks) <= otlp_spans._CACHE_MAX


def test_wire_primitives_match_protobuf():
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue
    for n in (0, 1, 127, 128, 16383, 16384, 2**35, 2**64 - 1):
        assert varint(n) == AnyValue(int_value=n if n < 2**63 else n - 2**64).SerializeToString()[1:]
    for v, msg in ((-5, AnyValue(int_value=-5)), (True, AnyValue(bool_value=True)), (False, AnyValue(bool_value=False)),
                   (2.5, AnyValue(double_value=2.5)), ("é" * 200, AnyValue(string_value="é" * 200)),
                   (["a", "b"], AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a"),
                                                                       AnyValue(string_value="b")])))):
        assert AnyValue.FromString(any_value(v)) == msg, v


class _RawSink(otlp_trace_sink.TraceSink):
    """The tests' OTLP/gRPC receiver, keeping each request message as it came."""

    def __init__(self):
        super().__init__()
        self.raw: list[ExportTraceServiceRequest] = []

    def Export(self, request, context):  # noqa: N802
        self.raw.append(request)
        return super().Export(request, context)


async def test_a_real_otlp_grpc_receiver_gets_the_spans_the_sdk_sent():
    """Records through the whole path (batcher → encoder → shipper → the SDK's gRPC exporter) reach
    a real gRPC receiver as the spans the SDK would have sent for them, under the SDK's resource."""
    sink = _RawSink()
    port = services.free_port()
    server = otlp_trace_sink.serve(sink, f"127.0.0.1:{port}")
    try:
        cfg = ObservabilityConfig.model_validate({"metrics": {"otlp_endpoint": "http://127.0.0.1:1/x"},
                                                  "traces": {"otlp_endpoint": f"http://127.0.0.1:{port}"}})
        tel = Telemetry(cfg, "encoder-test")
        recs = records()
        for r in recs:
            tel.submit(r)
        assert tel.drain() == len(recs)
        await tel.stop()
        assert sum(len(rs.scope_spans[0].spans) for req in sink.raw for rs in req.resource_spans) == 17
        resource = tel.tracer_provider.resource
        sdk = sdk_request(recs, resource, SCOPE)
        got = [sp for req in sink.raw for sp in req.resource_spans[0].scope_spans[0].spans]
        assert got == list(sdk.resource_spans[0].scope_spans[0].spans)
        assert {req.resource_spans[0].resource.SerializeToString(deterministic=True) for req in sink.raw} == {
            sdk.resource_spans[0].resource.SerializeToString(deterministic=True)}
        assert sink.spans[0]["service.name"] == "aisix" and sink.spans[0]["scope"] == "aisix"
        assert tel._spans.failed == 0 and tel._spans.settled()
    finally:
        server.stop(0).wait()
