"""The bounded hand-off from the request path to OpenTelemetry, and the task that drains it.

The request path calls :meth:`Telemetry.submit` (an append to a deque, O(1), never blocks);
a full queue drops the record and counts it in ``aisix_telemetry_dropped_total{reason="queue_full"}``;
spans the trace exporter could not take or deliver are counted there too (``span_queue_full``,
``span_export_failed``). The batcher task sleeps while the queue is empty; the first record
submitted wakes it, it waits ``tick`` seconds for more, then turns the records into metric
measurements (counters summed and latency samples bucketed per label set: :mod:`.histograms`) and
encoded spans (:mod:`.otlp_spans`, built after the fact with explicit start and end times), and
leaves the wire to the SDK's exporters, on their own threads.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque

from aisix.config.loader import ConfigError, ObservabilityConfig
from aisix.telemetry.access_log import AccessLog, access_line
from aisix.telemetry.histograms import BucketHistogram, SampleBatch, SumCounter
from aisix.telemetry.otlp_spans import SpanEncoder
from aisix.telemetry.pricing import Prices
from aisix.telemetry.records import RequestRecord

log = logging.getLogger("aisix.telemetry")

_NS_PER_MS = 1_000_000
_MS_PER_NS = 1 / _NS_PER_MS
_HTTP_LABELS = ("method", "endpoint", "status_code")
#: Records per slice of a drain (~8 µs each): the event loop is held at most ~0.5 ms at a time
_SLICE = 64

class _Counts:
    """One drain's counter increments, summed per label set (label values tuple → amount)."""

    __slots__ = ("requests", "admin_requests", "tokens", "deployment_tokens", "upstream_errors", "attempts",
                 "fallbacks", "costs")

    def __init__(self) -> None:
        self.requests, self.admin_requests = Counter(), Counter()
        self.tokens, self.deployment_tokens, self.upstream_errors = Counter(), Counter(), Counter()
        self.attempts, self.fallbacks, self.costs = Counter(), Counter(), Counter()


class Telemetry:
    """Owns the queue, the batcher task and the OpenTelemetry providers.

    Metrics (names as Prometheus shows them after the OTLP receiver adds suffixes):
    ``aisix_request_count_total{method,endpoint,status_code}``,
    ``aisix_request_latency_milliseconds{method,endpoint,status_code}`` (request received →
    body fully sent), ``aisix_llm_latency_milliseconds{model}`` (upstream call → response
    received), ``aisix_llm_first_token_latency_milliseconds{model}`` (streams only: request start
    → first token), ``aisix_llm_inter_token_latency_milliseconds{model}`` (streams only: the gap
    between consecutive content events as relayed, one sample per event after the first),
    ``aisix_llm_time_per_output_token_milliseconds{model}`` (successful streams of at least two
    completion tokens: (upstream end − first token) / (completion tokens − 1), one sample per
    stream), ``aisix_token_count_total{model,type}`` (type = prompt|completion|total; model = the
    alias the client asked for), ``aisix_deployment_token_count_total{model,deployment,type}`` (the
    same tokens by the attempt that produced them: model = the alias that attempt went to, a fallback's
    when one answered, deployment = its id),
    ``aisix_cost_usd_total{model}`` (USD, from the reported usage and the deployment's price; only
    models whose price is known), ``aisix_telemetry_dropped_total{reason}`` (``queue_full``: records, the queue was full;
    ``span_queue_full``: spans, the span processor's queue was full; ``span_export_failed``: spans
    the trace exporter failed to deliver; ``access_log_full``: access log lines the writer could not
    take or write), ``aisix_ratelimit_store_errors_total`` (requests whose
    rate limits the shared store could not count, and its failed releases and renewals; see
    :mod:`aisix.hooks.ratelimit_redis`).
    """

    def __init__(self, cfg: ObservabilityConfig, service_instance_id: str, tick: float = 0.05, worker: int = 0):
        self.enabled = cfg.enabled
        #: new traces whose id's low 64 bits are under this are sampled (trace-id ratio)
        tracing = cfg.enabled and cfg.traces.otlp_endpoint is not None
        if not cfg.enabled:
            self.sample_bound = 1 << 64
        else:  # no trace exporter: new traces are not sampled (nothing records them)
            self.sample_bound = round(cfg.traces.sample_ratio * (1 << 64)) if tracing else 0
        self.max_queue = cfg.queue_size
        self.exemplars = tracing and cfg.metrics.exemplars  # (an exemplar names a trace that was exported)
        self.queue: deque[RequestRecord] = deque()
        self.dropped = 0
        self._dropped_reported: Counter = Counter()
        self.ratelimit_store_errors = 0
        self._store_errors_reported = 0
        self.tick = tick
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.meter_provider = self.tracer_provider = None
        self.access_log: AccessLog | None = None
        self.metrics_server = None  # the scrape endpoint's HTTP server, when configured
        if not self.enabled:
            return
        from aisix.telemetry.otel import setup
        aggregates = self._make_histograms() + self._make_counters()  # summed by the batcher, read by the readers
        readers, registry = (), None
        if cfg.metrics.prometheus is not None:
            from aisix.telemetry.scrape import prometheus_reader
            reader, registry = prometheus_reader(aggregates, "aisix")
            readers = (reader,)
        self.meter_provider, self.tracer_provider, self._spans = setup(cfg, service_instance_id, aggregates, readers)
        self._encoder = SpanEncoder()
        meter = self.meter_provider.get_meter("aisix")
        self.prices = Prices(cfg.price_table)
        self.dropped_count = meter.create_counter(
            "aisix_telemetry_dropped", description="telemetry lost, by reason: queue_full (records, the queue "
            "was full), span_queue_full / span_export_failed (spans the trace exporter could not take / deliver)")
        self.store_error_count = meter.create_counter(
            "aisix_ratelimit_store_errors",
            description="requests whose rate limits the shared store could not count; failed releases and renewals")
        self.store_error_count.add(0)
        if cfg.access_log is not None:
            try:
                self.access_log = AccessLog(cfg.access_log.path)
            except OSError as e:
                raise ConfigError(f"observability.access_log.path: cannot open {cfg.access_log.path!r}: "
                                  f"{e.strerror}") from None
        for reason, _ in self._drop_totals():
            self.dropped_count.add(0, {"reason": reason})  # the series exist (at 0) before anything is dropped
        if registry is not None:
            from aisix.telemetry.scrape import serve_metrics
            self.metrics_server = serve_metrics(registry, cfg.metrics.prometheus.listen, worker)

    def _make_histograms(self) -> tuple[BucketHistogram, ...]:
        """The latency histograms (ms), aggregated by the batcher (:mod:`.histograms`)."""
        from aisix.telemetry.otel import LATENCY_BUCKETS_MS, TOKEN_BUCKETS_MS
        self.request_latency = BucketHistogram(
            "aisix_request_latency", "ms", "request received to response body fully sent", LATENCY_BUCKETS_MS,
            _HTTP_LABELS)
        self.llm_latency = BucketHistogram(
            "aisix_llm_latency", "ms", "upstream call to response received", LATENCY_BUCKETS_MS)
        self.first_token_latency = BucketHistogram(
            "aisix_llm_first_token_latency", "ms", "streams: request start to first token", LATENCY_BUCKETS_MS)
        self.upstream_latency = BucketHistogram(
            "aisix_upstream_latency", "ms", "one upstream attempt: call to its end (streams: the last byte; a "
            "failure: when it failed)", LATENCY_BUCKETS_MS, ("model", "deployment"))
        self.inter_token_latency = BucketHistogram(
            "aisix_llm_inter_token_latency", "ms", "streams: the gap between consecutive content events as the "
            "gateway relayed them, one sample per event after the first", TOKEN_BUCKETS_MS)
        self.time_per_output_token = BucketHistogram(
            "aisix_llm_time_per_output_token", "ms", "successful streams: (upstream end - first token) / "
            "(completion tokens - 1), one sample per stream", TOKEN_BUCKETS_MS)
        return (self.request_latency, self.llm_latency, self.first_token_latency, self.upstream_latency,
                self.inter_token_latency, self.time_per_output_token)

    def _make_counters(self) -> tuple[SumCounter, ...]:
        """The counters the batcher sums per drain (:class:`SumCounter`)."""
        self.request_count = SumCounter("aisix_request_count", "HTTP requests processed", _HTTP_LABELS)
        self.token_count = SumCounter("aisix_token_count", "tokens used, by type", ("model", "type"))
        self.deployment_token_count = SumCounter(
            "aisix_deployment_token_count", "tokens used, by the alias and deployment of the attempt that produced "
            "them, and type", ("model", "deployment", "type"))
        self.admin_request_count = SumCounter(
            "aisix_admin_request_count", "Admin API requests processed (not in aisix_request_count)", _HTTP_LABELS)
        self.upstream_error_count = SumCounter(
            "aisix_upstream_error_count", "failed upstream calls, by model and what the upstream answered "
            "(upstream_status: its HTTP status, 200 for an error in a stream, none when it did not answer)",
            ("model", "upstream_status"))
        self.upstream_request_count = SumCounter(
            "aisix_upstream_request_count", "upstream attempts, by model alias, deployment and what the attempt got "
            "(status_code: the upstream's HTTP status, or connect_error / timeout)", ("model", "deployment", "status_code"))
        self.cost_count = SumCounter(
            "aisix_cost_usd", "USD the upstreams charge for the tokens they report, by model alias (models with a "
            "known price only: their `pricing`, else genai-prices' table)", ("model",))
        self.fallback_count = SumCounter(
            "aisix_fallback_count", "requests that moved on to a fallback model, by the model asked for and the "
            "fallback", ("model", "fallback"))
        return (self.request_count, self.token_count, self.deployment_token_count, self.admin_request_count,
                self.upstream_error_count,
                self.upstream_request_count, self.cost_count, self.fallback_count)

    def count_ratelimit_store_error(self) -> None:
        """One more ``aisix_ratelimit_store_errors_total`` (the request path: an int increment)."""
        self.ratelimit_store_errors += 1

    # -- the request path ------------------------------------------------------
    def submit(self, rec: RequestRecord) -> None:
        """Hand a finished record over. O(1); drops (and counts) when the queue is full."""
        if not self.enabled:
            return
        q = self.queue
        if not q:
            self._wake.set()  # the batcher sleeps while the queue is empty
        elif len(q) >= self.max_queue:
            self.dropped += 1
            return
        q.append(rec)

    # -- the batcher -----------------------------------------------------------
    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="aisix-telemetry-batcher")

    async def _run(self) -> None:
        while True:
            if not self.queue:
                # idle: sleep until a record comes; wake each second only while spans or access
                # lines are still on their way (their failures are counted after the fact)
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), None if self._settled() else 1.0)
                except asyncio.TimeoutError:
                    pass
            await asyncio.sleep(self.tick)
            try:
                while self.queue:
                    self.drain(limit=_SLICE)
                    await asyncio.sleep(0)  # let requests run between slices
                self._report_dropped()  # spans fail to export later, with no record in the queue
            except Exception:  # noqa: BLE001 - the batcher must outlive a bad record
                log.exception("telemetry batcher failed on a record")

    def _settled(self) -> bool:
        """Nothing in flight whose loss would still be counted: every span offered was exported (or
        failed), every access line written (or failed)."""
        return (self._spans is None or self._spans.settled()) and (self.access_log is None or self.access_log.pending == 0)

    def drain(self, limit: int | None = None) -> int:
        """Turn up to ``limit`` queued records into measurements and spans. Returns how many.

        Counters are summed per label set first and added once per set; latency samples are
        grouped per histogram and label set and bucketed once per group (:class:`SampleBatch`);
        each sampled request's spans are encoded and handed to the span shipper.
        """
        n = 0
        q = self.queue
        counts = _Counts()
        samples = SampleBatch()
        lines = [] if self.access_log is not None else None
        spans = self._spans
        while q and (limit is None or n < limit):
            r = q.popleft()
            if r.total_tokens is not None and r.target is not None and r.model is not None:
                r.cost_usd = self._cost(r)
                if r.cost_usd is not None:
                    counts.costs[(r.model,)] += r.cost_usd
            self._record(r, counts, samples)
            if r.trace_flags & 1 and spans is not None:  # sampled (W3C trace-flags); traces exported
                spans.offer(self._encoder.encode(r))
            if lines is not None:
                lines.append(access_line(r))
            n += 1
        if lines:
            self.access_log.write(lines)
        samples.flush()
        self._add_counts(counts)
        self._report_dropped()
        if self.ratelimit_store_errors != self._store_errors_reported:
            self.store_error_count.add(self.ratelimit_store_errors - self._store_errors_reported)
            self._store_errors_reported = self.ratelimit_store_errors
        return n

    def _add_counts(self, c: "_Counts") -> None:
        self.request_count.add_all(c.requests)
        self.admin_request_count.add_all(c.admin_requests)
        self.token_count.add_all(c.tokens)
        self.deployment_token_count.add_all(c.deployment_tokens)
        self.upstream_error_count.add_all(c.upstream_errors)
        self.upstream_request_count.add_all(c.attempts)
        self.fallback_count.add_all(c.fallbacks)
        self.cost_count.add_all(c.costs)

    def _drop_totals(self) -> list[tuple[str, int]]:
        """``(reason, total so far)`` of every loss this process can have (spans only with a trace
        exporter, access lines only with an access log)."""
        spans = self._spans
        counts = [("queue_full", self.dropped)]
        if spans is not None:
            counts += [("span_queue_full", spans.queue_full), ("span_export_failed", spans.failed)]
        if self.access_log is not None:
            counts.append(("access_log_full", self.access_log.dropped))
        return counts

    def _report_dropped(self) -> None:
        for reason, total in self._drop_totals():
            if total != self._dropped_reported[reason]:
                self.dropped_count.add(total - self._dropped_reported[reason], {"reason": reason})
                self._dropped_reported[reason] = total

    def _record(self, r: RequestRecord, c: "_Counts", samples: SampleBatch) -> None:
        status = str(r.status)
        if r.admin:  # the control plane: its own counter and its span, none of the proxy's series
            c.admin_requests[(r.method, r.endpoint, status)] += 1
            return
        c.requests[(r.method, r.endpoint, status)] += 1
        # an exemplar: the trace and span the gateway exports for a sampled request
        ex = ((r.trace_id, r.span_id, r.start_wall_ns + (r.end_ns - r.start_ns))
              if self.exemplars and r.trace_flags & 1 and r.trace_id else None)
        samples.add(self.request_latency, (r.method, r.endpoint, status), (r.end_ns - r.start_ns) * _MS_PER_NS, ex)
        model = r.model
        if model is not None:
            key = (model,)
            if r.llm_start_ns:
                samples.add(self.llm_latency, key, ((r.llm_end_ns or r.end_ns) - r.llm_start_ns) * _MS_PER_NS, ex)
            if r.first_token_ns and r.stream:
                samples.add(self.first_token_latency, key, (r.first_token_ns - r.start_ns) * _MS_PER_NS, ex)
                self._token_times(r, key)
            for e in r.upstream_errors:
                c.upstream_errors[e] += 1
            for a in r.attempts:
                c.attempts[(a.model, a.deployment, a.status)] += 1
                samples.add(self.upstream_latency, (a.model, a.deployment), (a.end_ns - a.start_ns) * _MS_PER_NS)
            for fb in r.fallbacks:
                c.fallbacks[(model, fb)] += 1
            if r.total_tokens is not None:
                _tokens(r, c)

    def _cost(self, r: RequestRecord) -> float | None:
        """USD for the tokens the upstream reported (an estimate is never priced), at the price of
        the deployment that answered; None when its price is unknown."""
        price = self.prices.price(r.target, r.start_wall_ns)
        if price is None:
            return None
        return price.cost(r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.cache_write_tokens)

    def _token_times(self, r: RequestRecord, key: tuple) -> None:
        """A stream's inter-token gaps (every one: a stall shows in the tail, where a per-stream
        mean would hide it) and its time per output token (GenAI semantic conventions'
        ``gen_ai.server.time_per_output_token``: successful responses only)."""
        self.inter_token_latency.add(key, r.gaps_ns, _MS_PER_NS, r.zero_gaps)
        tokens = r.completion_tokens
        if r.status == 200 and tokens is not None and tokens > 1:
            end = r.llm_end_ns or r.end_ns
            self.time_per_output_token.add(key, ((end - r.first_token_ns) / (tokens - 1),), _MS_PER_NS)

    async def stop(self, timeout: float = 5.0) -> None:
        """Drain every queued record, then flush and shut down both exporters (bounded by ``timeout`` s)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if not self.enabled:
            return
        self.drain()
        loop = asyncio.get_running_loop()
        if self.access_log is not None:
            await loop.run_in_executor(None, self.access_log.close, timeout / 2)
        if self.metrics_server is not None:  # no scrape after the final flush: it would see nothing new
            await loop.run_in_executor(None, self.metrics_server.shutdown)
            self.metrics_server.server_close()

        # Metrics first (a hung trace collector must not hold them back), each in a daemon thread
        # with a deadline: the process never waits on an exporter longer than ``timeout`` s.
        deadline = time.monotonic() + timeout
        for name, shutdown in (("metrics", lambda: self.meter_provider.shutdown(timeout_millis=timeout * 1000)),
                               ("traces", self.tracer_provider.shutdown)):
            done = threading.Event()

            def run(fn=shutdown, ev=done):
                try:
                    fn()
                finally:
                    ev.set()

            threading.Thread(target=run, name=f"aisix-{name}-shutdown", daemon=True).start()
            left = max(0.1, deadline - time.monotonic())
            if not await asyncio.get_running_loop().run_in_executor(None, done.wait, left):
                log.warning("telemetry: the %s exporter did not flush within %.1f s; giving up", name, timeout)


def _tokens(r: RequestRecord, c: _Counts) -> None:
    """The reported usage under the alias asked for, and under the attempt that produced it: the
    last (the earlier ones failed before their first byte, and a stream under way is never
    retried, so only the last one can have an answer)."""
    model = r.model
    c.tokens[(model, "prompt")] += r.prompt_tokens
    c.tokens[(model, "completion")] += r.completion_tokens
    c.tokens[(model, "total")] += r.total_tokens
    if r.attempts:
        a = r.attempts[-1]
        c.deployment_tokens[(a.model, a.deployment, "prompt")] += r.prompt_tokens
        c.deployment_tokens[(a.model, a.deployment, "completion")] += r.completion_tokens
        c.deployment_tokens[(a.model, a.deployment, "total")] += r.total_tokens
