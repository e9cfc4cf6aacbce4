"""The bounded hand-off from the request path to OpenTelemetry, and the task that drains it.

The request path calls :meth:`Telemetry.submit` (an append to a deque, O(1), never blocks);
a full queue drops the record and counts it in ``aisix_telemetry_dropped_total{reason="queue_full"}``;
spans the trace exporter could not take or deliver are counted there too (``span_queue_full``,
``span_export_failed``). The batcher
task wakes every ``tick`` seconds, turns records into metric measurements and spans (built after
the fact with explicit start and end times), and leaves the wire to the SDK's exporter threads.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

from aisix.config.loader import ConfigError, ObservabilityConfig
from aisix.telemetry.access_log import AccessLog, access_line
from aisix.telemetry.histograms import BucketHistogram
from aisix.telemetry.pricing import Prices
from aisix.telemetry.records import RequestRecord

log = logging.getLogger("aisix.telemetry")

_NS_PER_MS = 1_000_000
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


#: ``gen_ai.provider.name`` values of the GenAI semantic conventions' registry for our providers.
GEN_AI_PROVIDER = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini", "deepseek": "deepseek"}

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
        self.sample_bound = round(cfg.traces.sample_ratio * (1 << 64)) if cfg.enabled else 1 << 64
        self.max_queue = cfg.queue_size
        self.exemplars = cfg.enabled and cfg.metrics.exemplars
        self.queue: deque[RequestRecord] = deque()
        self.dropped = 0
        self._dropped_reported: Counter = Counter()
        self.ratelimit_store_errors = 0
        self._store_errors_reported = 0
        self.tick = tick
        self._task: asyncio.Task | None = None
        self.meter_provider = self.tracer_provider = None
        self.access_log: AccessLog | None = None
        self.metrics_server = None  # the scrape endpoint's HTTP server, when configured
        if not self.enabled:
            return
        from aisix.telemetry.otel import TOKEN_BUCKETS_MS, setup
        self.inter_token_latency = BucketHistogram(
            "aisix_llm_inter_token_latency", "ms", "streams: the gap between consecutive content events as the "
            "gateway relayed them, one sample per event after the first", TOKEN_BUCKETS_MS)
        self.time_per_output_token = BucketHistogram(
            "aisix_llm_time_per_output_token", "ms", "successful streams: (upstream end - first token) / "
            "(completion tokens - 1), one sample per stream", TOKEN_BUCKETS_MS)
        histograms = (self.inter_token_latency, self.time_per_output_token)
        readers, registry = (), None
        if cfg.metrics.prometheus is not None:
            from aisix.telemetry.scrape import prometheus_reader
            reader, registry = prometheus_reader(histograms, "aisix")
            readers = (reader,)
        self.meter_provider, self.tracer_provider, self._spans, self._scope = setup(
            cfg, service_instance_id, histograms, readers)
        self._resource = self.tracer_provider.resource
        self.prices = Prices(cfg.price_table)
        self._instruments(self.meter_provider.get_meter("aisix"))
        if cfg.access_log is not None:
            try:
                self.access_log = AccessLog(cfg.access_log.path)
            except OSError as e:
                raise ConfigError(f"observability.access_log.path: cannot open {cfg.access_log.path!r}: "
                                  f"{e.strerror}") from None
            self.dropped_count.add(0, {"reason": "access_log_full"})
        if registry is not None:
            from aisix.telemetry.scrape import serve_metrics
            self.metrics_server = serve_metrics(registry, cfg.metrics.prometheus.listen, worker)

    def count_ratelimit_store_error(self) -> None:
        """One more ``aisix_ratelimit_store_errors_total`` (the request path: an int increment)."""
        self.ratelimit_store_errors += 1

    def _instruments(self, meter) -> None:
        """The counters and histograms OpenTelemetry aggregates (names and units: the class doc)."""
        self.request_count = meter.create_counter("aisix_request_count", description="HTTP requests processed")
        self.token_count = meter.create_counter("aisix_token_count", description="tokens used, by type")
        self.deployment_token_count = meter.create_counter(
            "aisix_deployment_token_count", description="tokens used, by the alias and deployment of the attempt "
            "that produced them, and type")
        self.request_latency = meter.create_histogram(
            "aisix_request_latency", unit="ms", description="request received to response body fully sent")
        self.llm_latency = meter.create_histogram(
            "aisix_llm_latency", unit="ms", description="upstream call to response received")
        self.first_token_latency = meter.create_histogram(
            "aisix_llm_first_token_latency", unit="ms", description="streams: request start to first token")
        self.admin_request_count = meter.create_counter(
            "aisix_admin_request_count", description="Admin API requests processed (not in aisix_request_count)")
        self.upstream_error_count = meter.create_counter(
            "aisix_upstream_error_count", description="failed upstream calls, by model and what the upstream "
            "answered (upstream_status: its HTTP status, 200 for an error in a stream, none when it did not answer)")
        self.upstream_request_count = meter.create_counter(
            "aisix_upstream_request_count", description="upstream attempts, by model alias, deployment and what the "
            "attempt got (status_code: the upstream's HTTP status, or connect_error / timeout)")
        self.upstream_latency = meter.create_histogram(
            "aisix_upstream_latency", unit="ms", description="one upstream attempt: call to its end (streams: the "
            "last byte; a failure: when it failed)")
        self.cost_count = meter.create_counter(
            "aisix_cost_usd", description="USD the upstreams charge for the tokens they report, by model alias "
            "(models with a known price only: their `pricing`, else genai-prices' table)")
        self.fallback_count = meter.create_counter(
            "aisix_fallback_count", description="requests that moved on to a fallback model, by the model asked "
            "for and the fallback")
        self.dropped_count = meter.create_counter(
            "aisix_telemetry_dropped", description="telemetry lost, by reason: queue_full (records, the queue "
            "was full), span_queue_full / span_export_failed (spans the trace exporter could not take / deliver)")
        for reason in ("queue_full", "span_queue_full", "span_export_failed"):
            self.dropped_count.add(0, {"reason": reason})  # the series exist (at 0) before anything is dropped
        self.store_error_count = meter.create_counter(
            "aisix_ratelimit_store_errors",
            description="requests whose rate limits the shared store could not count; failed releases and renewals")
        self.store_error_count.add(0)

    # -- the request path ------------------------------------------------------
    def submit(self, rec: RequestRecord) -> None:
        """Hand a finished record over. O(1); drops (and counts) when the queue is full."""
        if not self.enabled:
            return
        if len(self.queue) >= self.max_queue:
            self.dropped += 1
            return
        self.queue.append(rec)

    # -- the batcher -----------------------------------------------------------
    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="aisix-telemetry-batcher")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                while self.queue:
                    self.drain(limit=1024)
                    await asyncio.sleep(0)  # let requests run between slices
                self._report_dropped()  # spans fail to export later, with no record in the queue
            except Exception:  # noqa: BLE001 - the batcher must outlive a bad record
                log.exception("telemetry batcher failed on a record")

    def drain(self, limit: int | None = None) -> int:
        """Turn up to ``limit`` queued records into measurements and spans. Returns how many.

        Counters are summed per label set first and added once per set; each latency is one
        histogram sample; each sampled request is one span, handed straight to the span processor.
        """
        n = 0
        q = self.queue
        requests: Counter = Counter()
        tokens: Counter = Counter()  # (model asked, type) and (model, deployment, type) of the attempt
        upstream_errors: Counter = Counter()
        attempts: Counter = Counter()
        fallbacks: Counter = Counter()
        costs: Counter = Counter()
        lines = [] if self.access_log is not None else None
        while q and (limit is None or n < limit):
            r = q.popleft()
            if r.total_tokens is not None and r.target is not None and r.model is not None:
                r.cost_usd = self._cost(r)
                if r.cost_usd is not None:
                    costs[r.model] += r.cost_usd
            self._record(r, requests, tokens, upstream_errors, attempts, fallbacks)
            if lines is not None:
                lines.append(access_line(r))
            n += 1
        if lines:
            self.access_log.write(lines)
        for (admin, method, endpoint, status), count in requests.items():
            counter = self.admin_request_count if admin else self.request_count
            counter.add(count, {"method": method, "endpoint": endpoint, "status_code": status})
        for labels, count in tokens.items():
            if len(labels) == 2:
                self.token_count.add(count, {"model": labels[0], "type": labels[1]})
            else:
                self.deployment_token_count.add(count, {"model": labels[0], "deployment": labels[1], "type": labels[2]})
        for (model, upstream_status), count in upstream_errors.items():
            self.upstream_error_count.add(count, {"model": model, "upstream_status": upstream_status})
        for (model, deployment, status), count in attempts.items():
            self.upstream_request_count.add(count, {"model": model, "deployment": deployment, "status_code": status})
        for (model, fallback), count in fallbacks.items():
            self.fallback_count.add(count, {"model": model, "fallback": fallback})
        for model, usd in costs.items():
            self.cost_count.add(usd, {"model": model})
        self._report_dropped()
        if self.ratelimit_store_errors != self._store_errors_reported:
            self.store_error_count.add(self.ratelimit_store_errors - self._store_errors_reported)
            self._store_errors_reported = self.ratelimit_store_errors
        return n

    def _report_dropped(self) -> None:
        spans = self._spans
        counts = [("queue_full", self.dropped), ("span_queue_full", spans.queue_full),
                  ("span_export_failed", spans.failed)]
        if self.access_log is not None:
            counts.append(("access_log_full", self.access_log.dropped))
        for reason, total in counts:
            if total != self._dropped_reported[reason]:
                self.dropped_count.add(total - self._dropped_reported[reason], {"reason": reason})
                self._dropped_reported[reason] = total

    def _record(self, r: RequestRecord, requests: Counter, tokens: Counter, upstream_errors: Counter,
                attempts: Counter, fallbacks: Counter) -> None:
        status = str(r.status)
        requests[(r.admin, r.method, r.endpoint, status)] += 1
        if r.admin:  # the control plane: its own counter and its span, none of the proxy's series
            if r.trace_flags & 1:
                self._span(r)
            return
        ctx = self._exemplar(r)
        self.request_latency.record((r.end_ns - r.start_ns) / _NS_PER_MS,
                                    {"method": r.method, "endpoint": r.endpoint, "status_code": status}, ctx)
        model = r.model
        if model is not None:
            m_attrs = {"model": model}
            if r.llm_start_ns:
                self.llm_latency.record(((r.llm_end_ns or r.end_ns) - r.llm_start_ns) / _NS_PER_MS, m_attrs, ctx)
            if r.first_token_ns and r.stream:
                self.first_token_latency.record((r.first_token_ns - r.start_ns) / _NS_PER_MS, m_attrs, ctx)
                self._token_times(r, m_attrs)
            for e in r.upstream_errors:
                upstream_errors[e] += 1
            for a in r.attempts:
                attempts[(a.model, a.deployment, a.status)] += 1
                self.upstream_latency.record((a.end_ns - a.start_ns) / _NS_PER_MS,
                                             {"model": a.model, "deployment": a.deployment})
            for fb in r.fallbacks:
                fallbacks[(model, fb)] += 1
            if r.total_tokens is not None:
                self._tokens(r, tokens)
        if r.trace_flags & 1:  # sampled (W3C trace-flags); a new trace is always sampled
            self._span(r)

    @staticmethod
    def _tokens(r: RequestRecord, tokens: Counter) -> None:
        """The reported usage under the alias asked for, and under the attempt that produced it: the
        last (the earlier ones failed before their first byte, and a stream under way is never
        retried, so only the last one can have an answer)."""
        model = r.model
        tokens[(model, "prompt")] += r.prompt_tokens
        tokens[(model, "completion")] += r.completion_tokens
        tokens[(model, "total")] += r.total_tokens
        if r.attempts:
            a = r.attempts[-1]
            tokens[(a.model, a.deployment, "prompt")] += r.prompt_tokens
            tokens[(a.model, a.deployment, "completion")] += r.completion_tokens
            tokens[(a.model, a.deployment, "total")] += r.total_tokens

    def _exemplar(self, r: RequestRecord):
        """The context that makes a latency sample of a sampled request an exemplar (its trace and
        span id: the span the gateway exports for it), else None (no exemplar)."""
        if not (self.exemplars and r.trace_flags & 1 and r.trace_id):
            return None
        return set_span_in_context(NonRecordingSpan(SpanContext(r.trace_id, r.span_id, False, _SAMPLED)))

    def _cost(self, r: RequestRecord) -> float | None:
        """USD for the tokens the upstream reported (an estimate is never priced), at the price of
        the deployment that answered; None when its price is unknown."""
        price = self.prices.price(r.target, r.start_wall_ns)
        if price is None:
            return None
        return price.cost(r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.cache_write_tokens)

    def _token_times(self, r: RequestRecord, m_attrs: dict) -> None:
        """A stream's inter-token gaps (every one: a stall shows in the tail, where a per-stream
        mean would hide it) and its time per output token (GenAI semantic conventions'
        ``gen_ai.server.time_per_output_token``: successful responses only)."""
        self.inter_token_latency.add(m_attrs, r.gaps_ns, 1 / _NS_PER_MS, r.zero_gaps)
        tokens = r.completion_tokens
        if r.status == 200 and tokens is not None and tokens > 1:
            end = r.llm_end_ns or r.end_ns
            self.time_per_output_token.add(m_attrs, ((end - r.first_token_ns) / (tokens - 1),), 1 / _NS_PER_MS)

    def _span(self, r: RequestRecord) -> None:
        """One SERVER span, built after the fact with the ids the hot path chose (and sent upstream)."""
        wall = r.start_wall_ns - r.start_ns  # perf_counter ns → epoch ns
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
                _usage_attributes(r, attrs)
                if r.usage_estimated:
                    attrs["aisix.usage.estimated"] = True
            if r.finish_reasons:
                attrs["gen_ai.response.finish_reasons"] = list(r.finish_reasons)
            if r.upstream_status is not None:
                attrs["aisix.upstream.status_code"] = r.upstream_status
            if r.cost_usd is not None:
                attrs["aisix.cost_usd"] = r.cost_usd
        status = Status(StatusCode.UNSET)
        if r.status >= 500:  # server errors only: a 4xx is the client's (OTel HTTP semantic conventions)
            status = Status(StatusCode.ERROR, r.error or None)
            attrs["error.type"] = str(r.status)
        events = (Event("gen_ai.first_token", timestamp=r.first_token_ns + wall),) if r.first_token_ns else ()
        server = SpanContext(r.trace_id, r.span_id, is_remote=False, trace_flags=flags)
        self._spans.offer(ReadableSpan(
            f"{r.method} {r.endpoint}", server, parent, self._resource, attrs, events, kind=SpanKind.SERVER,
            status=status, start_time=r.start_wall_ns, end_time=r.end_ns + wall, instrumentation_scope=self._scope))
        for a in r.attempts:
            self._attempt_span(r, a, server, flags, wall)

    def _attempt_span(self, r: RequestRecord, a, server: SpanContext, flags: TraceFlags, wall: int) -> None:
        """One CLIENT span per upstream attempt, child of the request's SERVER span, named
        ``{operation} {upstream model}`` with the GenAI semantic conventions
        (https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/); the successful attempt
        carries the response model and usage."""
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
                _usage_attributes(r, attrs)
        else:
            attrs["error.type"] = a.status
            if a.status.isdigit():
                attrs["http.response.status_code"] = int(a.status)
            status = Status(StatusCode.ERROR, a.error)
        self._spans.offer(ReadableSpan(
            f"{r.operation} {a.upstream_model}", SpanContext(r.trace_id, a.span_id, is_remote=False, trace_flags=flags),
            server, self._resource, attrs, (), kind=SpanKind.CLIENT, status=status,
            start_time=a.start_ns + wall, end_time=a.end_ns + wall, instrumentation_scope=self._scope))

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


def _usage_attributes(r: RequestRecord, attrs: dict) -> None:
    """The usage on a span, in the GenAI semantic conventions' names
    (https://opentelemetry.io/docs/specs/semconv/registry/attributes/gen-ai/): ``input_tokens`` (every
    prompt token, cached and cache-written ones included, as the conventions ask),
    ``output_tokens``, and the part of the input read from the provider's prompt cache
    (``gen_ai.usage.cache_read.input_tokens``) and written to it
    (``gen_ai.usage.cache_creation.input_tokens``), each when the upstream reported some."""
    attrs["gen_ai.usage.input_tokens"] = r.prompt_tokens
    attrs["gen_ai.usage.output_tokens"] = r.completion_tokens
    if r.cached_tokens:
        attrs["gen_ai.usage.cache_read.input_tokens"] = r.cached_tokens
    if r.cache_write_tokens:
        attrs["gen_ai.usage.cache_creation.input_tokens"] = r.cache_write_tokens
