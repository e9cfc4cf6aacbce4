# Used in-process by tests/support/services.py:trace_sink().
"""Minimal OTLP/gRPC trace receiver for tests (stand-in for Jaeger's :4317).

Uses grpcio + the generated service in the `opentelemetry-proto` package.
Every received span is kept in memory and (optionally) appended as one JSON
line to --out, so a test can assert on service.name, span names, attributes,
parent/child links.

  python otlp_grpc_trace_sink.py --port 4317 --out /tmp/spans.jsonl
  # or in-process:
  sink = TraceSink(); server = serve(sink, "127.0.0.1:4317"); ...; server.stop(0)
"""
from __future__ import annotations

import argparse
import json
import signal
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def _any(v: AnyValue):
    k = v.WhichOneof("value")
    if k is None:
        return None
    x = getattr(v, k)
    if k == "array_value":
        return [_any(i) for i in x.values]
    if k == "kvlist_value":
        return {i.key: _any(i.value) for i in x.values}
    if k == "bytes_value":
        return x.hex()
    return x


def _attrs(kvs):
    return {kv.key: _any(kv.value) for kv in kvs}


class TraceSink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out_path: str | None = None):
        self.spans: list[dict] = []
        self.requests = 0
        self.metadata: list[dict] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._out = open(out_path, "a", buffering=1) if out_path else None

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        md = dict(context.invocation_metadata())
        rows = []
        for rs in request.resource_spans:
            res = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    rows.append({
                        "service.name": res.get("service.name"),
                        "resource": res,
                        "scope": ss.scope.name,
                        "name": sp.name,
                        "kind": sp.kind,
                        "trace_id": sp.trace_id.hex(),
                        "span_id": sp.span_id.hex(),
                        "parent_span_id": sp.parent_span_id.hex(),
                        "start_ns": sp.start_time_unix_nano,
                        "end_ns": sp.end_time_unix_nano,
                        "attributes": _attrs(sp.attributes),
                        "status_code": sp.status.code,
                        "status_message": sp.status.message,
                        "events": [e.name for e in sp.events],
                        "event_times": {e.name: e.time_unix_nano for e in sp.events},
                    })
        with self._cond:
            self.requests += 1
            self.metadata.append(md)
            self.spans.extend(rows)
            if self._out:
                for r in rows:
                    self._out.write(json.dumps(r) + "\n")
            self._cond.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, n: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.spans) >= n, timeout)


def serve(sink: TraceSink, addr: str = "127.0.0.1:4317") -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"cannot bind {addr}")
    server.start()
    return server


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=4317)
    ap.add_argument("--out", default=None, help="append spans as JSON lines here")
    a = ap.parse_args()
    sink = TraceSink(a.out)
    server = serve(sink, f"{a.host}:{a.port}")
    print(f"OTLP gRPC trace sink on {a.host}:{a.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    print(f"received {sink.requests} export requests, {len(sink.spans)} spans", flush=True)


if __name__ == "__main__":
    main()
