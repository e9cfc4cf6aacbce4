"""Measurements: the request path fills a :class:`RequestRecord` and calls
:meth:`Telemetry.submit`; a background batcher turns records into OpenTelemetry metrics (summed
and bucketed per label set: :mod:`.histograms`) and spans (encoded straight to OTLP protobuf:
:mod:`.otlp_spans`); the SDK's exporters (OTLP HTTP for metrics, OTLP gRPC for traces) ship
them from their own threads (:mod:`.span_export`)."""
from aisix.telemetry.batcher import Telemetry
from aisix.telemetry.records import RequestRecord, request_id
from aisix.telemetry.tracecontext import TraceContext, parse_traceparent

__all__ = ["Telemetry", "RequestRecord", "request_id", "TraceContext", "parse_traceparent"]
