"""A cheap OTLP/gRPC trace sink: ``python -m bench.tracesink --port P``.

Accepts ``TraceService/Export`` without decoding (raw bytes in, the empty
``ExportTraceServiceResponse`` out), so that the gateway's trace exporter has a
live peer at almost no CPU cost. On SIGTERM it prints one JSON line:
``{"exports": N, "bytes": B}``.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from concurrent import futures

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.tracesink")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cpu", type=int, default=None)
    a = ap.parse_args(argv)
    from bench._util import pin
    if a.cpu is not None:
        pin(0, {a.cpu})
    import grpc
    counts = {"exports": 0, "bytes": 0}
    lock = threading.Lock()

    def export(request: bytes, context) -> bytes:
        with lock:
            counts["exports"] += 1
            counts["bytes"] += len(request)
        return b""

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Export": grpc.unary_unary_rpc_method_handler(export, request_deserializer=None, response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=(handler,))
    server.add_insecure_port(f"127.0.0.1:{a.port}")
    server.start()
    done = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: done.set())
    print(f"trace sink listening on 127.0.0.1:{a.port}", flush=True)
    done.wait()
    server.stop(0)
    sys.stdout.write(json.dumps(counts) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
