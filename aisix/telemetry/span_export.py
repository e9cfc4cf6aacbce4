"""Shipping encoded spans (:mod:`.otlp_spans`) through the SDK's OTLP/gRPC trace exporter.

The batcher encodes each sampled record's spans on the event loop and hands the bytes to
:class:`SpanShipper`; its thread batches them into one ``ExportTraceServiceRequest`` and calls the
SDK's ``OTLPSpanExporter`` (its channel, headers, compression, timeout, retries and backoff: the
SDK still does the wire), whose stub here sends the bytes as they are instead of serializing a
message. The thread holds the GIL only to join bytes (no Python objects per span or attribute)
and sleeps while there is nothing to send (no idle wake-ups).
"""
from __future__ import annotations

import logging
import threading
from collections import deque

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import SpanExportResult

from aisix.telemetry.otlp_spans import export_request

log = logging.getLogger("aisix.telemetry")

_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class EncodedSpans:
    """One export's worth of spans: ``payload`` (a serialized ``ExportTraceServiceRequest``) and
    ``count`` (how many spans it holds)."""

    __slots__ = ("payload", "count")

    def __init__(self, payload: bytes, count: int):
        self.payload, self.count = payload, count


class _BytesStub:
    """The trace service's ``Export`` on ``channel``, sending requests already serialized."""

    def __init__(self, channel):
        self.Export = channel.unary_unary(_EXPORT_METHOD, request_serializer=None,
                                          response_deserializer=ExportTraceServiceResponse.FromString)


class BytesSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/gRPC span exporter, exporting :class:`EncodedSpans` (already-serialized
    requests) instead of ``ReadableSpan`` s. Same constructor arguments; ``export`` returns a
    ``SpanExportResult``. Relies on the SDK's ``_initialize_channel_and_stub`` / ``_translate_data``
    / ``_count_data`` hooks (opentelemetry-exporter-otlp-proto-grpc 1.x)."""

    def _initialize_channel_and_stub(self):
        super()._initialize_channel_and_stub()
        self._client = _BytesStub(self._channel)

    def _translate_data(self, data: EncodedSpans) -> bytes:
        return data.payload

    def _count_data(self, data: EncodedSpans) -> int:
        return data.count


#: Spans waiting for the exporter at most (the SDK BatchSpanProcessor's default queue size).
SPAN_QUEUE_SIZE = 2048
#: Spans per export at most (the BatchSpanProcessor's default batch).
SPAN_BATCH = 512


class SpanShipper(SpanProcessor):
    """Batches encoded spans to a :class:`BytesSpanExporter` from its own daemon thread, so that no
    span is lost uncounted.

    :meth:`offer` (the event loop) queues a record's spans unless ``queue_size`` are waiting:
    those are dropped and counted in ``queue_full``. The thread sends a batch when ``batch`` spans
    wait, or ``delay_s`` seconds after the first of a batch came; each span of an export that
    failed counts in ``failed``. ``offered`` / ``taken``: spans queued / handed to the exporter.
    All counts only grow; the batcher reports them in ``aisix_telemetry_dropped_total``.
    Registered on the SDK's ``TracerProvider`` as a span processor, so that its ``shutdown()``
    flushes what is queued, then shuts the exporter down.
    """

    def __init__(self, exporter: BytesSpanExporter, prefix: tuple[bytes, bytes], queue_size: int = SPAN_QUEUE_SIZE,
                 batch: int = SPAN_BATCH, delay_s: float = 1.0):
        self.exporter, self.prefix = exporter, prefix
        self.queue_size, self.batch, self.delay_s = queue_size, batch, delay_s
        self.offered = self.taken = self.failed = self.queue_full = 0
        self.done = 0  # spans whose export ended (delivered or failed)
        self._queue: deque[bytes] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="aisix-span-export", daemon=True)
        self._thread.start()

    def offer(self, spans: list[bytes]) -> None:
        """Queue ``spans`` (encoded ``ScopeSpans.spans`` fields), or drop and count those that
        would overflow the queue. Wakes the thread only when the queue was empty or a batch is full."""
        q = self._queue
        waiting = self.offered - self.taken
        room = self.queue_size - waiting
        if room < len(spans):
            self.queue_full += len(spans) - max(room, 0)
            spans = spans[:max(room, 0)]
        if not spans:
            return
        q.extend(spans)
        self.offered += len(spans)
        if waiting == 0 or waiting < self.batch <= waiting + len(spans):
            with self._cond:
                self._cond.notify()

    def _run(self) -> None:
        q = self._queue
        while True:
            with self._cond:
                while not q and not self._closing:
                    self._cond.wait()  # idle: sleeps until the first span comes
                if len(q) < self.batch and not self._closing:
                    self._cond.wait(self.delay_s)
                closing = self._closing
            while q:
                self._export([q.popleft() for _ in range(min(self.batch, len(q)))])
                if not closing and len(q) < self.batch:
                    break
            if closing and not q:
                return

    def _export(self, spans: list[bytes]) -> None:
        self.taken += len(spans)
        try:
            ok = self.exporter.export(EncodedSpans(export_request(self.prefix, spans), len(spans)))
        except Exception:  # noqa: BLE001 - counted; the thread must go on
            log.debug("span export failed", exc_info=True)
            ok = None
        if ok is not SpanExportResult.SUCCESS:
            self.failed += len(spans)
        self.done += len(spans)

    def settled(self) -> bool:
        """Every span offered has been exported or has failed (none queued, none in flight)."""
        return self.done == self.offered

    def on_start(self, span, parent_context=None) -> None:  # noqa: D102 - SpanProcessor: no SDK spans here
        pass

    def on_end(self, span) -> None:  # noqa: D102
        pass

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Send what is queued (bounded by ``timeout_s``), then shut the exporter down."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:  # noqa: D102
        return True
