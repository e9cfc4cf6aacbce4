"""Histograms and counters the batcher aggregates itself, instead of one SDK ``Histogram.record``
per sample and an SDK ``Counter.add`` per label set and drain (:class:`SumCounter`).

An SDK ``Histogram.record`` costs ~4 µs (attribute hashing, a Measurement, locks, the exemplar
reservoir); a request has three to four latency samples and a stream one per token for
``aisix_llm_inter_token_latency``, so the batcher groups each drain's samples per histogram and
label set (:class:`SampleBatch`) and counts them into buckets itself (a bisect and an increment per
sample); the metric readers add the result to each collection as OpenTelemetry explicit-bucket
histogram points (cumulative, like every aisix series), which the SDK's exporters then put on the
wire like any other (https://opentelemetry.io/docs/specs/otel/metrics/data-model/#histogram).
Exemplars follow the SDK's ``AlignedHistogramBucketExemplarReservoir``: per point and bucket, the
last sampled measurement offered since that reader's previous collection
(https://opentelemetry.io/docs/specs/otel/metrics/sdk/#alignedhistogrambucketexemplarreservoir).
"""
from __future__ import annotations

import threading
import time
from bisect import bisect_left
from dataclasses import replace

from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    Sum,
)


class BucketHistogram:
    """One cumulative explicit-bucket histogram, one point per label set.

    ``labels``: the attribute names, in the order of the label values :meth:`add` is given.
    ``bounds``: the bucket edges (in the metric's ``unit``); a value ``v`` lands in the first bucket
    whose edge is ``>= v`` (edges inclusive, as OpenTelemetry defines them), past the last edge in
    the overflow bucket. :meth:`add` runs on the batcher (the event loop); :meth:`metric` on a metric
    reader's thread; a lock keeps the two apart.
    """

    def __init__(self, name: str, unit: str, description: str, bounds: tuple[float, ...],
                 labels: tuple[str, ...] = ("model",)):
        self.name, self.unit, self.description, self.labels = name, unit, description, labels
        self.bounds = tuple(bounds)  # as given: an int edge shows as le="5" on /metrics, as the OTLP push gives
        self.start_ns = time.time_ns()
        #: label values → [bucket counts, count, sum, min, max, exemplars: {bucket: (seq, value, (trace, span, ns))}]
        self._points: dict[tuple, list] = {}
        self._seq = 0  # exemplars offered so far
        self._seen: dict[int, int] = {}  # reader id → _seq at its last collection
        self._lock = threading.Lock()

    def add(self, key: tuple, values, scale: float = 1.0, zeros: int = 0, exemplars=None) -> None:
        """Count each of ``values`` (multiplied by ``scale``: e.g. ns → ms) and ``zeros`` samples of 0
        under the label values ``key``. ``exemplars``: None, or one item per value: None or
        ``(trace_id, span_id, time_unix_nano)`` of the sampled request it measured."""
        n = len(values) + zeros
        if not n:
            return
        bounds = self.bounds
        with self._lock:
            p = self._points.get(key)
            if p is None:
                p = self._points[key] = [[0] * (len(bounds) + 1), 0, 0.0, float("inf"), float("-inf"), {}]
            counts = p[0]
            total, lo, hi = 0.0, p[3], p[4]
            for i, v in enumerate(values):
                v *= scale
                b = bisect_left(bounds, v)
                counts[b] += 1
                total += v
                lo = v if v < lo else lo
                hi = v if v > hi else hi
                if exemplars is not None and exemplars[i] is not None:
                    self._seq += 1
                    p[5][b] = (self._seq, v, exemplars[i])
            if zeros:
                counts[bisect_left(bounds, 0.0)] += zeros
                lo, hi = min(lo, 0.0), max(hi, 0.0)
            p[1] += n
            p[2] += total
            p[3], p[4] = lo, hi

    def metric(self, now_ns: int, reader: int = 0) -> Metric | None:
        """The histogram as an SDK :class:`Metric` at ``now_ns`` (epoch ns), for the metric reader
        ``reader`` (an id: each reader gets the exemplars offered since its own last collection);
        None before any sample."""
        with self._lock:
            since = self._seen.get(reader, 0)
            self._seen[reader] = self._seq
            points = [HistogramDataPoint(attributes=dict(zip(self.labels, key)), start_time_unix_nano=self.start_ns,
                                         time_unix_nano=now_ns, count=p[1], sum=p[2], bucket_counts=list(p[0]),
                                         explicit_bounds=self.bounds, min=p[3], max=p[4],
                                         exemplars=[Exemplar({}, v, t, span, trace)
                                                    for b, (seq, v, (trace, span, t)) in sorted(p[5].items())
                                                    if seq > since])
                      for key, p in self._points.items()]
        if not points:
            return None
        return Metric(self.name, self.description, self.unit,
                      Histogram(points, AggregationTemporality.CUMULATIVE))


class SumCounter:
    """One cumulative monotonic sum (an OpenTelemetry ``Counter``'s data), one point per label
    set, summed by the batcher: :meth:`add_all` once per drain instead of an SDK ``Counter.add``
    (~10 µs each) per label set. ``labels``: the attribute names, in the order of each key's
    values. Amounts are ints or floats ≥ 0 (ints stay ints). Thread-safe as :class:`BucketHistogram`."""

    def __init__(self, name: str, description: str, labels: tuple[str, ...], unit: str = ""):
        self.name, self.unit, self.description, self.labels = name, unit, description, labels
        self.start_ns = time.time_ns()
        self._values: dict[tuple, int | float] = {}
        self._lock = threading.Lock()

    def add_all(self, amounts: dict) -> None:
        """Add each ``key → amount`` of ``amounts`` (keys: label values tuples)."""
        if not amounts:
            return
        with self._lock:
            values = self._values
            for key, amount in amounts.items():
                values[key] = values.get(key, 0) + amount

    def metric(self, now_ns: int, reader: int = 0) -> Metric | None:
        """The sum as an SDK :class:`Metric` at ``now_ns`` (epoch ns); None before any add."""
        with self._lock:
            points = [NumberDataPoint(attributes=dict(zip(self.labels, key)), start_time_unix_nano=self.start_ns,
                                      time_unix_nano=now_ns, value=v) for key, v in self._values.items()]
        if not points:
            return None
        return Metric(self.name, self.description, self.unit,
                      Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=True))


class SampleBatch:
    """One drain's histogram samples, grouped per histogram and label values, then added to each
    histogram once per group (:meth:`flush`)."""

    def __init__(self) -> None:
        self._groups: dict[tuple, tuple[list, list]] = {}

    def add(self, histogram: BucketHistogram, key: tuple, value: float, exemplar=None) -> None:
        """One sample ``value`` of ``histogram`` under label values ``key``; ``exemplar``: None or
        ``(trace_id, span_id, time_unix_nano)``."""
        g = self._groups.get((histogram, key))
        if g is None:
            g = self._groups[(histogram, key)] = ([], [])
        g[0].append(value)
        g[1].append(exemplar)

    def flush(self) -> None:
        """Add every group to its histogram; the batch is empty after."""
        for (histogram, key), (values, exemplars) in self._groups.items():
            histogram.add(key, values, exemplars=exemplars if any(exemplars) else None)
        self._groups.clear()


def with_histograms(data: MetricsData | None, histograms, scope_name: str, reader: int = 0) -> MetricsData | None:
    """``data`` (one collection of the SDK's, by the metric reader ``reader``, an id) with the
    ``histograms``' metrics added to the scope named ``scope_name`` (which the SDK's instruments
    already fill)."""
    if data is None:
        return None
    now = time.time_ns()
    extra = [m for h in histograms if (m := h.metric(now, reader)) is not None]
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
            super()._receive_metrics(with_histograms(metrics_data, histograms, scope_name, id(self)),
                                     timeout_millis, **kwargs)

    Reader.__name__ = f"{reader_class.__name__}WithHistograms"
    return Reader
