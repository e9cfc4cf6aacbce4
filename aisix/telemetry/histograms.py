"""Histograms the batcher aggregates itself, for samples too many to hand to the SDK one by one.

An SDK ``Histogram.record`` costs ~4 µs (attribute hashing, a Measurement, locks); a stream has a
sample per token for ``aisix_llm_inter_token_latency``, so the batcher counts those into buckets
itself (a bisect and an increment per sample) and the metric readers add the result to each
collection as an OpenTelemetry explicit-bucket histogram point (cumulative, like every aisix
series), which the SDK's exporters then put on the wire like any other
(https://opentelemetry.io/docs/specs/otel/metrics/data-model/#histogram).
"""
from __future__ import annotations

import threading
import time
from bisect import bisect_left
from dataclasses import replace

from opentelemetry.sdk.metrics.export import AggregationTemporality, Histogram, HistogramDataPoint, Metric, MetricsData


class BucketHistogram:
    """One cumulative explicit-bucket histogram, one point per attribute set.

    ``bounds``: the bucket edges (in the metric's ``unit``); a value ``v`` lands in the first bucket
    whose edge is ``>= v`` (edges inclusive, as OpenTelemetry defines them), past the last edge in
    the overflow bucket. :meth:`add` runs on the batcher (the event loop); :meth:`metric` on a metric
    reader's thread; a lock keeps the two apart.
    """

    def __init__(self, name: str, unit: str, description: str, bounds: tuple[float, ...]):
        self.name, self.unit, self.description = name, unit, description
        self.bounds = tuple(bounds)  # as given: an int edge shows as le="5" on /metrics, as the OTLP push gives
        self.start_ns = time.time_ns()
        self._points: dict[tuple, list] = {}  # attribute items → [bucket counts, count, sum, min, max]
        self._lock = threading.Lock()

    def add(self, attributes: dict, values, scale: float = 1.0, zeros: int = 0) -> None:
        """Count each of ``values`` (multiplied by ``scale``: e.g. ns → ms) and ``zeros`` samples of 0."""
        n = len(values) + zeros
        if not n:
            return
        key = tuple(attributes.items())
        bounds = self.bounds
        with self._lock:
            p = self._points.get(key)
            if p is None:
                p = self._points[key] = [[0] * (len(bounds) + 1), 0, 0.0, float("inf"), float("-inf")]
            counts = p[0]
            total, lo, hi = 0.0, p[3], p[4]
            for v in values:
                v *= scale
                counts[bisect_left(bounds, v)] += 1
                total += v
                lo = min(lo, v)
                hi = max(hi, v)
            if zeros:
                counts[bisect_left(bounds, 0.0)] += zeros
                lo, hi = min(lo, 0.0), max(hi, 0.0)
            p[1] += n
            p[2] += total
            p[3], p[4] = lo, hi

    def metric(self, now_ns: int) -> Metric | None:
        """The histogram as an SDK :class:`Metric` at ``now_ns`` (epoch ns); None before any sample."""
        with self._lock:
            points = [HistogramDataPoint(attributes=dict(key), start_time_unix_nano=self.start_ns,
                                         time_unix_nano=now_ns, count=p[1], sum=p[2], bucket_counts=list(p[0]),
                                         explicit_bounds=self.bounds, min=p[3], max=p[4])
                      for key, p in self._points.items()]
        if not points:
            return None
        return Metric(self.name, self.description, self.unit,
                      Histogram(points, AggregationTemporality.CUMULATIVE))


def with_histograms(data: MetricsData | None, histograms, scope_name: str) -> MetricsData | None:
    """``data`` (one collection of the SDK's) with the ``histograms``' metrics added to the scope
    named ``scope_name`` (which the SDK's instruments already fill)."""
    if data is None:
        return None
    now = time.time_ns()
    extra = [m for h in histograms if (m := h.metric(now)) is not None]
    if not extra:
        return data
    resources = []
    for rm in data.resource_metrics:
        scopes = [replace(sm, metrics=[*sm.metrics, *extra]) if sm.scope.name == scope_name else sm
                  for sm in rm.scope_metrics]
        resources.append(replace(rm, scope_metrics=scopes))
    return replace(data, resource_metrics=resources)


def reader_with_histograms(reader_class, histograms, scope_name: str):
    """A subclass of the SDK metric reader ``reader_class`` whose every collection also carries
    ``histograms`` (``_receive_metrics`` is the SDK's documented hook for reader subclasses)."""

    class Reader(reader_class):
        def _receive_metrics(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> None:
            super()._receive_metrics(with_histograms(metrics_data, histograms, scope_name), timeout_millis, **kwargs)

    Reader.__name__ = f"{reader_class.__name__}WithHistograms"
    return Reader
