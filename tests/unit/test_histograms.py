"""The batcher's own histograms (aisix.telemetry.histograms) give the points the SDK's
explicit-bucket Histogram gives for the same samples (buckets, count, sum, min, max), and the
exemplars its AlignedHistogramBucketExemplarReservoir keeps (the last sampled one per bucket since
each reader's previous collection); and the batcher does not wake while idle."""
from __future__ import annotations

import asyncio

from opentelemetry.sdk.metrics import MeterProvider, TraceBasedExemplarFilter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from aisix.config.loader import ObservabilityConfig
from aisix.telemetry import Telemetry
from aisix.telemetry.histograms import BucketHistogram, SampleBatch
from aisix.telemetry.otel import LATENCY_BUCKETS_MS

#: (label values, value in ms, exemplar trace id or None), in order
SAMPLES = [(("POST", "/v1/chat/completions", "200"), v, t) for v, t in
           ((0.4, 11), (1.25, None), (1.3, 12), (3.0, 13), (3.5, None), (700_000.0, 14), (5.0, 15))] + \
          [(("GET", "/v1/models", "200"), 2.0, None), (("GET", "/v1/models", "200"), 80.0, 16)]


def _sdk_points():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], exemplar_filter=TraceBasedExemplarFilter(), views=[
        View(instrument_name="h", aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS_MS))])
    h = provider.get_meter("aisix").create_histogram("h", unit="ms")
    for key, v, trace in SAMPLES:
        ctx = None if trace is None else set_span_in_context(NonRecordingSpan(
            SpanContext(trace, trace + 100, False, TraceFlags(TraceFlags.SAMPLED))))
        h.record(v, dict(zip(("method", "endpoint", "status_code"), key)), ctx)
    data = reader.get_metrics_data()
    provider.shutdown()
    return data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points


def _ours():
    h = BucketHistogram("h", "ms", "", LATENCY_BUCKETS_MS, ("method", "endpoint", "status_code"))
    batch = SampleBatch()
    for key, v, trace in SAMPLES:
        batch.add(h, key, v, None if trace is None else (trace, trace + 100, 1))
    batch.flush()
    return h


def test_points_match_the_sdks_histogram():
    sdk = {tuple(p.attributes.items()): p for p in _sdk_points()}
    ours = {tuple(p.attributes.items()): p for p in _ours().metric(2, reader=1).data.data_points}
    assert sdk.keys() == ours.keys() and len(ours) == 2
    for k, p in ours.items():
        s = sdk[k]
        assert (p.count, p.sum, p.min, p.max, list(p.bucket_counts), list(p.explicit_bounds)) == \
               (s.count, s.sum, s.min, s.max, list(s.bucket_counts), list(s.explicit_bounds)), k
        assert [(e.value, e.trace_id, e.span_id, e.filtered_attributes) for e in p.exemplars] == \
               [(e.value, e.trace_id, e.span_id, e.filtered_attributes) for e in s.exemplars], k
    # per bucket the last sampled: (…, 1.25] 0.4 (1.25 was not sampled); (1.25, 2.5] 1.3; (2.5, 5] 5.0, not
    # 3.0; (655360, +Inf) 700000
    assert [e.trace_id for e in ours[(("method", "POST"), ("endpoint", "/v1/chat/completions"),
                                      ("status_code", "200"))].exemplars] == [11, 12, 15, 14]


def test_each_reader_gets_the_exemplars_offered_since_its_own_last_collection():
    h = _ours()
    assert sum(len(p.exemplars) for p in h.metric(2, reader=1).data.data_points) == 5
    assert sum(len(p.exemplars) for p in h.metric(3, reader=1).data.data_points) == 0  # nothing new
    assert sum(len(p.exemplars) for p in h.metric(3, reader=2).data.data_points) == 5  # another reader: all
    h.add(("GET", "/v1/models", "200"), [90.0], exemplars=[(77, 78, 4)])
    points = {p.attributes["endpoint"]: p for p in h.metric(5, reader=1).data.data_points}
    assert [e.trace_id for e in points["/v1/models"].exemplars] == [77] and not points["/v1/chat/completions"].exemplars
    assert points["/v1/models"].count == 3  # counts stay cumulative


async def test_an_idle_batcher_does_not_wake_and_the_first_record_wakes_it():
    import time

    from aisix.telemetry import RequestRecord
    cfg = ObservabilityConfig.model_validate({"metrics": {"otlp_endpoint": "http://127.0.0.1:1/x"},
                                              "traces": {"otlp_endpoint": "http://127.0.0.1:1"}})
    tel = Telemetry(cfg, "idle-test", tick=0.01)
    wakes = []
    report = tel._report_dropped
    tel._report_dropped = lambda: (wakes.append(1), report())[1]
    tel.start()
    try:
        await asyncio.sleep(0.3)  # 30 ticks' worth of idle
        assert wakes == []
        tel.submit(RequestRecord("GET", "/v1/models", "/v1/models", time.time_ns(), time.perf_counter_ns()))
        for _ in range(200):  # bounded: at most 2 s
            if not tel.queue:
                break
            await asyncio.sleep(0.01)
        assert not tel.queue and wakes  # drained (drain is synchronous: the queue empties as it runs)
    finally:
        await tel.stop(timeout=1)


def test_sum_counter_points_match_the_sdks_counter():
    """The same adds through an SDK Counter and a SumCounter give the same cumulative monotonic
    points (values, ints staying ints; attributes)."""
    from opentelemetry.sdk.metrics.export import Sum

    from aisix.telemetry.histograms import SumCounter
    adds = [(("m1", "prompt"), 12), (("m1", "completion"), 30), (("m2", "prompt"), 0), (("m1", "prompt"), 5),
            (("m2", "cost"), 0.25), (("m2", "cost"), 0.5)]
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    c = provider.get_meter("aisix").create_counter("c")
    for key, v in adds:
        c.add(v, dict(zip(("model", "type"), key)))
    sdk = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics[0].data
    provider.shutdown()
    ours = SumCounter("c", "", ("model", "type"))
    ours.add_all({("m1", "prompt"): 12, ("m1", "completion"): 30, ("m2", "prompt"): 0, ("m2", "cost"): 0.25})
    ours.add_all({("m1", "prompt"): 5, ("m2", "cost"): 0.5})
    data = ours.metric(1).data
    assert isinstance(data, Sum) and data.is_monotonic and data.aggregation_temporality == sdk.aggregation_temporality
    as_map = lambda pts: {tuple(p.attributes.items()): (p.value, type(p.value)) for p in pts}  # noqa: E731
    assert as_map(data.data_points) == as_map(sdk.data_points)
    assert as_map(data.data_points)[(("model", "m1"), ("type", "prompt"))] == (17, int)
