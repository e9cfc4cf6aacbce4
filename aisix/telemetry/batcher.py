"""The bounded hand-off from the request path to OpenTelemetry, and the task that drains it.

The request path calls :meth:`Telemetry.submit` (an append to a deque, O(1), never blocks);
a full queue drops the record and counts it in ``aisix_telemetry_dropped_total``. The batcher
task wakes every ``tick`` seconds, turns records into metric measurements and spans (built after
the fact with explicit start and end times), and leaves the wire to the SDK's exporter threads.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from ..config import ObservabilityConfig
from .records import RequestRecord

log = logging.getLogger("aisix.telemetry")

_NS_PER_MS = 1_000_000


class Telemetry:
    """Owns the queue, the batcher task and the OpenTelemetry providers.

    Metrics (names as Prometheus shows them after the OTLP receiver adds suffixes):
    ``aisix_request_count_total{method,endpoint,status_code}``,
    ``aisix_request_latency_milliseconds{method,endpoint,status_code}`` (request received →
    body fully sent), ``aisix_llm_latency_milliseconds{model}`` (upstream call → response
    received), ``aisix_llm_first_token_latency_milliseconds{model}`` (streams only: request start
    → first token), ``aisix_token_count_total{model,type}`` (type = prompt|completion|total),
    ``aisix_telemetry_dropped_total``.
    """

    def __init__(self, cfg: ObservabilityConfig, service_instance_id: str, tick: float = 0.05):
        self.enabled = cfg.enabled
        self.max_queue = cfg.queue_size
        self.queue: deque[RequestRecord] = deque()
        self.dropped = 0
        self._dropped_reported = 0
        self.processed = 0
        self.tick = tick
        self._task: asyncio.Task | None = None
        self.meter_provider = self.tracer_provider = None
        if not self.enabled:
            return
        from .otel import setup
        self.meter_provider, self.tracer_provider, self._ids = setup(cfg, service_instance_id)
        meter = self.meter_provider.get_meter("aisix")
        self.request_count = meter.create_counter("aisix_request_count", description="HTTP requests processed")
        self.token_count = meter.create_counter("aisix_token_count", description="tokens used, by type")
        self.request_latency = meter.create_histogram(
            "aisix_request_latency", unit="ms", description="request received to response body fully sent")
        self.llm_latency = meter.create_histogram(
            "aisix_llm_latency", unit="ms", description="upstream call to response received")
        self.first_token_latency = meter.create_histogram(
            "aisix_llm_first_token_latency", unit="ms", description="streams: request start to first token")
        self.dropped_count = meter.create_counter(
            "aisix_telemetry_dropped", description="telemetry records dropped because the queue was full")
        self.tracer = self.tracer_provider.get_tracer("aisix")

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
            except Exception:  # noqa: BLE001 - the batcher must outlive a bad record
                log.exception("telemetry batcher failed on a record")

    def drain(self, limit: int | None = None) -> int:
        """Turn up to ``limit`` queued records into measurements and spans. Returns how many."""
        n = 0
        q = self.queue
        while q and (limit is None or n < limit):
            self._record(q.popleft())
            n += 1
        if self.dropped != self._dropped_reported:
            self.dropped_count.add(self.dropped - self._dropped_reported)
            self._dropped_reported = self.dropped
        self.processed += n
        return n

    def _record(self, r: RequestRecord) -> None:
        http_attrs = {"method": r.method, "endpoint": r.endpoint, "status_code": str(r.status)}
        self.request_count.add(1, http_attrs)
        self.request_latency.record((r.end_ns - r.start_ns) / _NS_PER_MS, http_attrs)
        model = r.model
        if model is not None:
            m_attrs = {"model": model}
            if r.llm_start_ns:
                self.llm_latency.record(((r.llm_end_ns or r.end_ns) - r.llm_start_ns) / _NS_PER_MS, m_attrs)
            if r.first_token_ns and r.stream:
                self.first_token_latency.record((r.first_token_ns - r.start_ns) / _NS_PER_MS, m_attrs)
            if r.total_tokens is not None:
                self.token_count.add(r.prompt_tokens, {"model": model, "type": "prompt"})
                self.token_count.add(r.completion_tokens, {"model": model, "type": "completion"})
                self.token_count.add(r.total_tokens, {"model": model, "type": "total"})
        self._span(r)

    def _span(self, r: RequestRecord) -> None:
        wall = r.start_wall_ns - r.start_ns  # perf_counter ns → epoch ns
        parent = None
        if r.parent_span_id:
            parent = trace.set_span_in_context(NonRecordingSpan(SpanContext(
                r.trace_id, r.parent_span_id, is_remote=True, trace_flags=TraceFlags(r.trace_flags))))
        else:
            self._ids.next_trace_id = r.trace_id
        self._ids.next_span_id = r.span_id
        attrs = {"http.request.method": r.method, "url.path": r.path, "http.route": r.endpoint,
                 "http.response.status_code": r.status}
        if r.model is not None:
            attrs["gen_ai.operation.name"] = r.operation
            attrs["gen_ai.provider.name"] = r.provider or ""
            attrs["gen_ai.request.model"] = r.request_model or ""
            attrs["aisix.model"] = r.model
            attrs["aisix.stream"] = r.stream
            if r.response_model:
                attrs["gen_ai.response.model"] = r.response_model
            if r.total_tokens is not None:
                attrs["gen_ai.usage.input_tokens"] = r.prompt_tokens
                attrs["gen_ai.usage.output_tokens"] = r.completion_tokens
            if r.finish_reasons:
                attrs["gen_ai.response.finish_reasons"] = list(r.finish_reasons)
        span = self.tracer.start_span(f"{r.method} {r.endpoint}", context=parent, kind=SpanKind.SERVER,
                                      attributes=attrs, start_time=r.start_wall_ns)
        if r.first_token_ns:
            span.add_event("gen_ai.first_token", timestamp=r.first_token_ns + wall)
        if r.status >= 500 or r.error:
            span.set_status(Status(StatusCode.ERROR, r.error or None))
            span.set_attribute("error.type", str(r.status))
        span.end(end_time=r.end_ns + wall)

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

        def _shutdown():
            self.tracer_provider.shutdown()
            self.meter_provider.shutdown(timeout_millis=timeout * 1000)

        try:
            await asyncio.wait_for(asyncio.to_thread(_shutdown), timeout + 1)
        except asyncio.TimeoutError:
            log.warning("telemetry exporters did not flush within %.1f s", timeout)
