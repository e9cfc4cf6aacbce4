"""The Prometheus scrape endpoint (``observability.metrics.prometheus.listen``): ``GET /metrics``.

The OpenTelemetry SDK's own Prometheus reader (``opentelemetry-exporter-prometheus``) turns each
scrape into one collection of the same instruments the OTLP push exports, named as Prometheus's
OTLP receiver names them (unit suffix ``_milliseconds``, ``_total`` on counters), without the
``otel_scope_*`` labels the push does not give either. ``prometheus_client``'s HTTP server answers
in its own thread (the OpenMetrics text when the scraper asks for it, as Prometheus does, else the
classic text format), never on the event loop. With ``--workers N``, worker ``i`` listens on
``port + i``: each worker is its own target (its series are its own process's).
"""
from __future__ import annotations

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, start_http_server

from aisix.config.loader import ConfigError, parse_listen
from aisix.telemetry.histograms import reader_with_histograms


def prometheus_reader(histograms, scope_name: str):
    """``(reader, registry)``: a metric reader for the SDK and the registry the endpoint serves
    (its own, so none of ``prometheus_client``'s process and GC series)."""
    registry = CollectorRegistry()
    reader = reader_with_histograms(PrometheusMetricReader, histograms, scope_name)(
        scope_info_enabled=False, registry=registry)
    return reader, registry


def listen_address(listen: str, worker: int = 0) -> tuple[str, int]:
    """``host:port`` → the ``(host, port)`` worker ``worker`` listens on: ``port + worker``."""
    host, port = parse_listen(listen)
    return host, port + worker if port else 0


def serve_metrics(registry: CollectorRegistry, listen: str, worker: int = 0):
    """Serve ``registry`` on ``listen`` (worker ``i``: port + i) from a daemon thread; returns the
    server (``.server_port``, ``.shutdown()``). Raises :class:`ConfigError` when it can't listen."""
    host, port = listen_address(listen, worker)
    try:
        server, _thread = start_http_server(port, host, registry)
    except OSError as e:
        raise ConfigError(f"observability.metrics.prometheus.listen: cannot listen on {host}:{port}"
                          f"{f' (worker {worker})' if worker else ''}: {e.strerror}") from None
    return server
