"""OpenTelemetry set-up: resource, meter provider with cumulative OTLP/HTTP export (the
batcher's own histograms and counters added to each collection), tracer provider whose span
processor ships the batcher's encoded spans through the SDK's OTLP/gRPC exporter. The wire is
the SDK's: no exporter of our own.
"""
from __future__ import annotations

import logging
import os
import socket

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    TraceBasedExemplarFilter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from aisix.config.loader import ObservabilityConfig
from aisix.telemetry.histograms import reader_with_histograms
from aisix.telemetry.otlp_spans import request_prefix
from aisix.telemetry.span_export import SPAN_QUEUE_SIZE, BytesSpanExporter, SpanShipper

__all__ = ["LATENCY_BUCKETS_MS", "TOKEN_BUCKETS_MS", "SPAN_QUEUE_SIZE", "setup", "instance_id"]

#: Histogram bucket edges in ms. Source: the OpenTelemetry GenAI semantic conventions' advice for
#: ``gen_ai.client.operation.duration`` (0.01 s … 81.92 s, doubling), in ms, extended by halving
#: down to 1.25 ms and by doubling up to 655 360 ms (~11 min, for long reasoning runs).
LATENCY_BUCKETS_MS = (1.25, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240,
                      20480, 40960, 81920, 163840, 327680, 655360)

#: Bucket edges in ms for the per-token series (``aisix_llm_inter_token_latency``,
#: ``aisix_llm_time_per_output_token``, aggregated by the batcher: :mod:`.histograms`): the GenAI
#: semantic conventions' advice for ``gen_ai.server.time_per_output_token`` (0.01 s … 2.5 s), in ms,
#: extended down to 1 ms and up to 10 s.
TOKEN_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 75, 100, 150, 200, 300, 400, 500, 750, 1000, 2500, 5000, 10000)

_CUMULATIVE = {k: AggregationTemporality.CUMULATIVE for k in
               (Counter, UpDownCounter, Histogram, ObservableCounter, ObservableUpDownCounter, ObservableGauge)}


class _OnceFilter(logging.Filter):
    """Lets the first export failure of each logger through, then stays quiet: with nothing
    listening, the gateway logs the failure once, not per export or per request."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if record.name in self.seen:
            return False
        self.seen.add(record.name)
        record.msg = (f"{record.msg} (telemetry export failing; further failures of this exporter are not "
                      "logged. Nothing listening? `make prometheus` runs a Prometheus for the metrics; "
                      "observability.metrics/traces.otlp_endpoint: null turns a push off)")
        return True


_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc",
    "opentelemetry.sdk.metrics._internal.export",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace.export",
)


def quiet_export_failures() -> None:
    f = _OnceFilter()
    for name in _EXPORT_LOGGERS:
        logging.getLogger(name).addFilter(f)


def instance_id(port: int, worker: int = 0) -> str:
    """A ``service.instance.id`` stable across restarts of the same listener: ``host:port[/wN]``."""
    return f"{socket.gethostname()}:{port}" + (f"/w{worker}" if worker else "")


def _grpc_endpoint(url: str) -> tuple[str, bool]:
    insecure = not url.startswith("https://")
    return url.split("://", 1)[-1].rstrip("/"), insecure


def setup(cfg: ObservabilityConfig, service_instance_id: str, histograms=(), readers=()):
    """Build ``(meter_provider, tracer_provider, span_shipper)`` for ``cfg``; encoded spans go to
    ``span_shipper.offer`` (a :class:`~aisix.telemetry.span_export.SpanShipper`, the tracer
    provider's span processor, whose ``shutdown`` flushes it; None when
    ``cfg.traces.otlp_endpoint`` is None). Every
    metric collection also carries ``histograms`` (:class:`~aisix.telemetry.histograms.BucketHistogram`,
    aggregated by the batcher) in the ``aisix`` scope. ``readers``: more metric readers (the scrape
    endpoint's).

    Metrics: OTLP/HTTP to ``cfg.metrics.otlp_endpoint`` (used verbatim; None: no push), cumulative temporality
    (Prometheus drops delta), every ``export_interval_ms``. Traces: OTLP/gRPC to
    ``cfg.traces.otlp_endpoint`` (the SDK's exporter, fed serialized requests). Both exporters time out after
    ``export_timeout_ms`` and run on the SDK's own threads, never on the event loop.
    """
    quiet_export_failures()
    resource = Resource.create({"service.name": cfg.service_name, "service.instance.id": service_instance_id,
                                "service.version": __import__("aisix").__version__,
                                "process.pid": os.getpid()})
    if cfg.metrics.otlp_endpoint is not None:
        metric_exporter = OTLPMetricExporter(endpoint=cfg.metrics.otlp_endpoint,
                                             timeout=cfg.metrics.export_timeout_ms / 1000,
                                             preferred_temporality=_CUMULATIVE)
        readers = (reader_with_histograms(PeriodicExportingMetricReader, histograms, "aisix")(
            metric_exporter, export_interval_millis=cfg.metrics.export_interval_ms,
            export_timeout_millis=cfg.metrics.export_timeout_ms), *readers)
    # (the latency histograms are the batcher's own now; the view keeps any SDK histogram on the same buckets)
    views = [View(instrument_type=Histogram, aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS_MS))]
    # Exemplars: the batcher passes each sampled request's span context with its latencies; the
    # trace-based filter keeps those (one per bucket, the SDK's aligned reservoir), never a counter's.
    exemplar_filter = TraceBasedExemplarFilter() if cfg.metrics.exemplars else AlwaysOffExemplarFilter()
    meter_provider = MeterProvider(resource=resource, metric_readers=list(readers), views=views,
                                   exemplar_filter=exemplar_filter, shutdown_on_exit=False)

    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # Telemetry.stop does it, bounded
    if cfg.traces.otlp_endpoint is None:
        return meter_provider, tracer_provider, None
    endpoint, insecure = _grpc_endpoint(cfg.traces.otlp_endpoint)
    exporter = BytesSpanExporter(endpoint=endpoint, insecure=insecure, timeout=cfg.traces.export_timeout_ms / 1000)
    prefix = request_prefix(resource.attributes, resource.schema_url, "aisix", __import__("aisix").__version__)
    shipper = SpanShipper(exporter, prefix)
    tracer_provider.add_span_processor(shipper)
    return meter_provider, tracer_provider, shipper
