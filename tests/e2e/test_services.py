"""The test services themselves: real processes, restartable etcd, trace sink."""
import json
import os
import urllib.request

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tests.support import services


def _kv(etcd, method, body):
    # etcd's JSON gateway (v3 API over HTTP), so this test needs no client library
    req = urllib.request.Request(f"{etcd.endpoint}/v3/kv/{method}", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def test_etcd_keeps_port_and_data_across_restart(etcd):
    key, value = "YWlzaXgva2V5", "dmFsdWU="  # base64 of aisix/key, value
    _kv(etcd, "put", {"key": key, "value": value})
    pid, endpoint = etcd.process.pid, etcd.endpoint
    etcd.stop()
    assert not etcd.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    etcd.start()
    assert etcd.running and etcd.process.pid != pid
    assert etcd.endpoint == endpoint == f"http://127.0.0.1:{etcd.port}"
    assert _kv(etcd, "range", {"key": key})["kvs"][0]["value"] == value


def test_prometheus_answers_and_rejects_bad_promql(prometheus):
    assert prometheus.otlp_url == prometheus.url + "/api/v1/otlp/v1/metrics"
    assert prometheus.query("vector(1)")[0]["value"][1] == "1"
    with pytest.raises(services.PromQLError, match="parse error"):
        prometheus.query("sum(rate(x[1m])")


def test_trace_sink_receives_spans(trace_sink):
    provider = TracerProvider(resource=Resource.create({"service.name": "aisix-test"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=trace_sink.endpoint, insecure=True)))
    with provider.get_tracer("t").start_as_current_span("parent"):
        with provider.get_tracer("t").start_as_current_span("child"):
            pass
    provider.shutdown()
    assert trace_sink.wait_for(2, timeout=10)
    spans = {s["name"]: s for s in trace_sink.spans}
    assert spans["child"]["parent_span_id"] == spans["parent"]["span_id"]
    assert spans["parent"]["service.name"] == "aisix-test"


def test_redis_keeps_its_port_across_a_restart_and_comes_back_empty(redis):
    assert redis.command("SET", "k", "v") == b"+OK\r\n"
    assert redis.command("GET", "k") == b"$1\r\nv\r\n"
    pid, url = redis.pid, redis.url
    redis.stop()
    assert redis.pid is None
    with pytest.raises(OSError):
        redis.command("PING")
    redis.start()
    assert redis.pid != pid and redis.url == url == f"redis://127.0.0.1:{redis.port}/0"
    assert redis.command("GET", "k") == b"$-1\r\n"  # no persistence: a restart comes back empty
