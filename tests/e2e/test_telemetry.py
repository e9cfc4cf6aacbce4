"""Telemetry end to end: exact counts in a real Prometheus, spans in a real OTLP/gRPC receiver,
long latencies in finite buckets, dead exporters, and the flush on SIGTERM."""
from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import pytest

from aisix.config.loader import ObservabilityConfig
from aisix.telemetry import RequestRecord, Telemetry
from aisix.telemetry.otel import LATENCY_BUCKETS_MS
from tests.support import services
from tests.support.harness import (
    ROLE,
    STOP,
    TXT,
    USAGE,
    GatewayMetrics,
    GatewayProcess,
    ScriptedUpstream,
    ev,
    gateway_config,
    post_raw,
)

CHAT = "/v1/chat/completions"


@pytest.fixture
def upstream():
    up = ScriptedUpstream().start()
    stream = [(0, ev(ROLE)), (0.01, ev(TXT("a"))), (0.01, ev(TXT("b"))), (0.01, ev(STOP)),
              (0, ev(USAGE(10, 5))), (0, b"data: [DONE]\n\n")]
    up.script("stream", writes=stream)
    up.script("slow", writes=[(0, ev(ROLE))] + [(0.1, ev(TXT("x"))) for _ in range(20)] + [
        (0.05, ev(STOP)), (0, ev(USAGE(2, 20))), (0, b"data: [DONE]\n\n")])
    up.script("gaps", writes=[(0, ev(ROLE) + ev(TXT("a"))), (0.35, ev(TXT("b"))), (0.6, ev(TXT("c")) + ev(TXT("d"))),
                              (0, ev(STOP)), (0, ev(USAGE(6, 4))), (0, b"data: [DONE]\n\n")])
    whole = {"id": "c1", "object": "chat.completion", "created": 1, "model": "up-1",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
    up.script("whole", headers={"Content-Type": "application/json", "x-request-id": "req_123"},
              body=json.dumps(whole).encode())
    yield up
    up.stop()


def two_models(upstream_base):
    pc = {"api_key": "sk-up", "api_base": upstream_base}
    pricing = {"input_per_million": 1.0, "output_per_million": 2.0}  # so the dashboard's spend panels have data
    return dict(models=[{"name": "m1", "model": "openai/up-1", "provider_config": pc, "pricing": pricing},
                        {"name": "m2", "model": "openai/up-2", "provider_config": pc}],
                apikeys=[{"key": "sk-test", "allowed_models": ["m1"]}])


def chat(key: str, stream: bool, model: str = "m1") -> dict:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": key}]}


async def _request(session, url, body, key="sk-test"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.post(url, json=body, headers=headers) as r:
        await r.read()
        return r.status


async def test_exact_counts_in_prometheus_after_known_requests(tmp_path, upstream):
    """N requests of known shape → the counters and histogram counts are exact, the tokens equal the
    upstream's usage, and every PromQL expression of the dashboard returns data."""
    with services.prometheus_server(tmp_path / "prom") as prom:
        cfg = gateway_config(upstream.base_url, prom_otlp=prom.otlp_url, export_interval_ms=500,
                             **two_models(upstream.base_url))
        gw = GatewayProcess(tmp_path / "gw", cfg).start()
        try:
            url = gw.url + CHAT
            async with aiohttp.ClientSession() as s:
                ok_stream = await asyncio.gather(*(_request(s, url, chat("stream", True)) for _ in range(5)))
                ok_whole = await asyncio.gather(*(_request(s, url, chat("whole", False)) for _ in range(4)))
                no_key = [await _request(s, url, chat("whole", False), key=None) for _ in range(3)]
                bad_key = [await _request(s, url, chat("whole", False), key="sk-nope") for _ in range(2)]
                unknown = [await _request(s, url, chat("whole", False, model="gpt-nope")) for _ in range(3)]
                forbidden = [await _request(s, url, chat("whole", False, model="m2")) for _ in range(2)]
                async with s.get(gw.url + "/v1/models", headers={"Authorization": "Bearer sk-test"}) as r:
                    models_status = r.status
            disconnects = [await post_raw(url, chat("slow", True), max_events=3) for _ in range(2)]
            assert ok_stream == [200] * 5 and ok_whole == [200] * 4
            assert no_key == [401] * 3 and bad_key == [401] * 2
            assert unknown == [400] * 3 and forbidden == [403] * 2 and models_status == 200
            assert all(d.closed_at for d in disconnects)
            n = 5 + 4 + 3 + 2 + 3 + 2 + 1 + 2 + 1  # + the harness's one readiness probe (401)
            time.sleep(1.5)  # two more exports, so rate() over the dashboard has two points
        finally:
            assert gw.stop() == 0
        m = GatewayMetrics(prom, gw.instance)
        m.wait_value("aisix_request_count_total", n)
        expect = {("POST", CHAT, "200"): 9, ("POST", CHAT, "401"): 5, ("POST", CHAT, "400"): 3,
                  ("POST", CHAT, "403"): 2, ("POST", CHAT, "499"): 2, ("GET", "/v1/models", "200"): 1,
                  ("GET", "/v1/models", "401"): 1}
        for (method, endpoint, status), count in expect.items():
            assert m.value("aisix_request_count_total", method=method, endpoint=endpoint,
                           status_code=status) == count, (method, endpoint, status)
            assert m.value("aisix_request_latency_milliseconds_count", method=method, endpoint=endpoint,
                           status_code=status) == count
        assert m.value("aisix_request_latency_milliseconds_count") == n
        # tokens: 5 streams × (10, 5) + 4 whole × (7, 3); the disconnected streams never got usage
        assert m.value("aisix_token_count_total", model="m1", type="prompt") == 5 * 10 + 4 * 7
        assert m.value("aisix_token_count_total", model="m1", type="completion") == 5 * 5 + 4 * 3
        assert m.value("aisix_token_count_total", model="m1", type="total") == 5 * 15 + 4 * 10
        assert m.value("aisix_llm_latency_milliseconds_count", model="m1") == 5 + 4 + 2
        assert m.value("aisix_llm_first_token_latency_milliseconds_count", model="m1") == 5 + 2
        assert m.value("aisix_cost_usd_total", model="m1") == pytest.approx(
            (5 * 10 + 4 * 7) * 1.0 / 1e6 + (5 * 5 + 4 * 3) * 2.0 / 1e6)
        series = prom.query('{__name__=~"aisix_.*"}')
        assert {s["metric"].get("model") for s in series} - {None} == {"m1"}
        assert {s["metric"]["job"] for s in series} == {"aisix"}
        dashboard = json.loads((services.ROOT / "grafana/dashboards/aisix.json").read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        assert len(exprs) >= 14
        for expr in exprs:
            if "aisix_fallback_count_total" in expr:
                continue  # this traffic has no fallback (tests/e2e/test_dashboard.py and test_routing_gateway.py cover it)
            assert prom.query(expr), f"no data for {expr}"


async def test_one_span_per_request_with_parent_and_traceparent_upstream(tmp_path, upstream, trace_sink):
    cfg = gateway_config(upstream.base_url, traces=trace_sink.endpoint)
    incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    incoming_parent = "00f067aa0ba902b7"
    with GatewayProcess(tmp_path, cfg) as gw:
        got = await post_raw(gw.url + CHAT, chat("stream", True),
                             headers={"traceparent": f"00-{incoming_trace}-{incoming_parent}-01"})
        assert got.status == 200
        whole = await post_raw(gw.url + CHAT, chat("whole", False))
        assert whole.status == 200 and whole.headers["x-request-id"] == "req_123"
        unauth = await post_raw(gw.url + CHAT, chat("whole", False), key="sk-nope")
        assert unauth.status == 401
    assert trace_sink.wait_for(6)
    time.sleep(0.5)
    probe = [s for s in trace_sink.spans if s["name"] == "GET /v1/models"]  # the harness's readiness probe
    clients = [s for s in trace_sink.spans if s["kind"] == 3]  # CLIENT: one per upstream attempt
    spans = [s for s in trace_sink.spans if s not in probe and s not in clients]
    assert len(probe) == 1 and len(spans) == 3 and len(clients) == 2, trace_sink.spans
    assert {s["service.name"] for s in spans} == {"aisix"}
    assert all(s["name"] == "POST /v1/chat/completions" and s["kind"] == 2 for s in spans)  # SERVER
    by_status = {s["attributes"]["http.response.status_code"]: s for s in spans}
    streamed = [s for s in spans if s["trace_id"] == incoming_trace]
    assert len(streamed) == 1
    sp = streamed[0]
    assert sp["parent_span_id"] == incoming_parent
    a = sp["attributes"]
    assert a["http.request.method"] == "POST" and a["url.path"] == CHAT and a["http.route"] == CHAT
    assert a["http.response.status_code"] == 200
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "up-1"
    assert a["gen_ai.provider.name"] == "openai" and a["gen_ai.response.model"] == "up-1"
    assert a["gen_ai.usage.input_tokens"] == 10 and a["gen_ai.usage.output_tokens"] == 5
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert "gen_ai.first_token" in sp["events"]
    assert not any("sk-up" in json.dumps(s) for s in spans), "the provider secret leaked into a span"
    # the upstream saw the attempt's CLIENT span as its parent, itself a child of the SERVER span
    tp = upstream.last("stream").headers["traceparent"]
    att = next(c for c in clients if c["trace_id"] == incoming_trace)
    assert tp == f"00-{incoming_trace}-{att['span_id']}-01" and att["parent_span_id"] == sp["span_id"]
    ca = att["attributes"]
    assert att["name"] == "chat up-1" and ca["gen_ai.operation.name"] == "chat" and ca["gen_ai.provider.name"] == "openai"
    assert ca["gen_ai.request.model"] == "up-1" and ca["server.address"] == "127.0.0.1"
    assert ca["gen_ai.usage.input_tokens"] == 10 and ca["gen_ai.usage.output_tokens"] == 5
    assert ca["aisix.deployment"] == "default" and att["start_ns"] >= sp["start_ns"] and att["end_ns"] <= sp["end_ns"]
    tp2 = upstream.last("whole").headers["traceparent"]
    whole_att = [c for c in clients if c["span_id"] == tp2.split("-")[2]]
    assert len(whole_att) == 1
    whole_span = [s for s in spans if s["span_id"] == whole_att[0]["parent_span_id"]]
    assert len(whole_span) == 1 and whole_span[0]["parent_span_id"] == ""
    assert 401 in by_status and "gen_ai.operation.name" not in by_status[401]["attributes"]


async def test_requests_succeed_with_dead_otlp_endpoints_and_failure_logged_once(tmp_path, upstream):
    cfg = gateway_config(upstream.base_url, export_interval_ms=200)  # both endpoints: nothing listens
    with GatewayProcess(tmp_path, cfg) as gw:
        async with aiohttp.ClientSession() as s:
            statuses = []
            for _ in range(4):
                statuses += await asyncio.gather(*(_request(s, gw.url + CHAT, chat("stream", True)) for _ in range(50)))
                await asyncio.sleep(0.5)
        assert statuses == [200] * 200
    log = gw.output()
    assert log.count("telemetry export failing") <= 2, log  # once per exporter, not per request
    assert "telemetry export failing" in log


async def test_sigterm_lets_streams_finish_then_flushes(tmp_path, upstream, trace_sink):
    """A stream in flight at SIGTERM completes; new connections are refused; its measurements
    reach Prometheus and the trace receiver although the export interval never came round."""
    with services.prometheus_server(tmp_path / "prom") as prom:
        cfg = gateway_config(upstream.base_url, prom_otlp=prom.otlp_url, traces=trace_sink.endpoint,
                             export_interval_ms=600_000)
        gw = GatewayProcess(tmp_path / "gw", cfg).start()
        try:
            task = asyncio.create_task(post_raw(gw.url + CHAT, chat("slow", True)))
            await asyncio.sleep(0.5)
            gw.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            with pytest.raises(aiohttp.ClientConnectionError):
                await post_raw(gw.url + CHAT, chat("stream", True))
            got = await task
            assert got.status == 200 and got.body.endswith(b"data: [DONE]\n\n")
            assert got.body.count(b'"x"') == 20
            assert gw.proc.wait(20) == 0
        finally:
            gw.kill()
        m = GatewayMetrics(prom, gw.instance)
        m.wait_value("aisix_request_count_total", 1, timeout=5, status_code="200")
        assert m.value("aisix_token_count_total", type="completion") == 20
    assert trace_sink.wait_for(1)


async def test_c09_long_latencies_land_in_finite_buckets(prometheus):
    """C09 with a clock the test controls: a record whose first token came at 45 s and end at 70 s."""
    assert LATENCY_BUCKETS_MS[0] <= 1.5 and LATENCY_BUCKETS_MS[-1] >= 600_000
    cfg = ObservabilityConfig.model_validate({"metrics": {"otlp_endpoint": prometheus.otlp_url},
                                              "traces": {"otlp_endpoint": f"http://127.0.0.1:{services.free_port()}"}})
    instance = f"c09-{time.time_ns()}"
    tel = Telemetry(cfg, instance)
    tel.start()
    now_wall, now = time.time_ns(), time.perf_counter_ns()
    rec = RequestRecord("POST", CHAT, CHAT, now_wall - 70 * 10**9, now - 70 * 10**9)
    rec.model, rec.stream, rec.status = "m1", True, 200
    rec.llm_start_ns = rec.start_ns + 1_000_000
    rec.first_token_ns = rec.start_ns + 45 * 10**9
    rec.llm_end_ns = rec.end_ns = now
    tel.submit(rec)
    await tel.stop()
    m = GatewayMetrics(prometheus, instance)
    for name, sample_ms in (("aisix_request_latency_milliseconds", 70_000), ("aisix_llm_latency_milliseconds", 69_999),
                            ("aisix_llm_first_token_latency_milliseconds", 45_000)):
        m.wait_value(name + "_count", 1)
        buckets = {float(s["metric"]["le"]): float(s["value"][1])
                   for s in prometheus.query(m.sel(name + "_bucket"))}
        finite = sorted(le for le in buckets if le != float("inf"))
        assert finite[-1] >= 600_000
        first_holding = min(le for le in finite if buckets[le] == 1)
        assert first_holding == min(le for le in finite if le >= sample_ms), (name, first_holding)


def test_telemetry_queue_full_drops_and_counts():
    cfg = ObservabilityConfig.model_validate({"queue_size": 3, "metrics": {"otlp_endpoint": "http://127.0.0.1:1/x"},
                                              "traces": {"otlp_endpoint": "http://127.0.0.1:1"}})
    tel = Telemetry(cfg, "drop-test")
    for _ in range(5):
        tel.submit(RequestRecord("GET", "/v1/models", "/v1/models", time.time_ns(), time.perf_counter_ns()))
    assert len(tel.queue) == 3 and tel.dropped == 2
    assert tel.drain() == 3
    tel.meter_provider.shutdown(timeout_millis=100)
    tel.tracer_provider.shutdown()


def test_spans_the_span_processor_cannot_queue_are_counted_not_lost_silently():
    """The SDK's BatchSpanProcessor drops spans silently when its queue is full (a slow or hung
    receiver). The gateway never offers it more than its queue holds: what is left over is
    dropped before it and counted (``span_queue_full``); what it exports and fails, ``span_export_failed``."""
    import socket

    from aisix.telemetry.otel import SPAN_QUEUE_SIZE
    hung = socket.socket()  # a receiver that accepts and never answers: each export waits its timeout
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    cfg = ObservabilityConfig.model_validate({
        "metrics": {"otlp_endpoint": "http://127.0.0.1:1/x"},
        "traces": {"otlp_endpoint": f"http://127.0.0.1:{hung.getsockname()[1]}", "export_timeout_ms": 500}})
    tel = Telemetry(cfg, "span-drop-test")
    n = SPAN_QUEUE_SIZE + 1000
    try:
        for i in range(n):
            rec = RequestRecord("GET", "/v1/models", "/v1/models", time.time_ns(), time.perf_counter_ns())
            rec.trace_id, rec.span_id, rec.trace_flags, rec.end_ns = i + 1, i + 1, 1, rec.start_ns + 1000
            tel.submit(rec)
        assert tel.drain() == n
        spans = tel._spans
        assert spans.offered + spans.queue_full == n
        assert spans.queue_full >= n - SPAN_QUEUE_SIZE - spans.taken > 0
        assert spans.offered - spans.taken <= SPAN_QUEUE_SIZE  # the SDK's queue never overflowed
        deadline = time.monotonic() + 10
        while spans.failed == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spans.failed > 0  # the first batch timed out
    finally:
        tel.meter_provider.shutdown(timeout_millis=100)
        tel.tracer_provider.shutdown()
        hung.close()


async def test_trace_sampling_ratio_zero_keeps_sampled_parents_only(tmp_path, upstream, trace_sink):
    """``sample_ratio: 0``: new traces are not recorded (the upstream sees flags 00), but a request
    whose incoming traceparent is sampled still gets its span (parent-based)."""
    cfg = gateway_config(upstream.base_url, traces=trace_sink.endpoint)
    cfg["observability"]["traces"]["sample_ratio"] = 0.0
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with GatewayProcess(tmp_path, cfg) as gw:
        for _ in range(5):
            assert (await post_raw(gw.url + CHAT, chat("whole", False))).status == 200
        assert upstream.last("whole").headers["traceparent"].endswith("-00")
        assert (await post_raw(gw.url + CHAT, chat("stream", True), headers={"traceparent": parent})).status == 200
        assert upstream.last("stream").headers["traceparent"].endswith("-01")
    assert trace_sink.wait_for(1)
    time.sleep(0.5)
    assert [s["trace_id"] for s in trace_sink.spans if s["kind"] == 2] == ["4bf92f3577b34da6a3ce929d0e0e4736"]
    assert {s["trace_id"] for s in trace_sink.spans} == {"4bf92f3577b34da6a3ce929d0e0e4736"}  # its CLIENT span too


def buckets(prom, m: GatewayMetrics, name: str) -> dict[float, float]:
    """``le`` → cumulative count of one histogram of one gateway."""
    return {float(s["metric"]["le"]): float(s["value"][1]) for s in prom.query(m.sel(name + "_bucket"))}


async def test_inter_token_latency_and_time_per_output_token_from_known_gaps(prometheus, tmp_path, upstream):
    """A stream whose content events come 0 / 350 / 600 ms apart (c and d in one write) gives
    three inter-token samples, one in each of the buckets (…, 1], (300, 400], (500, 750]; its time
    per output token, (end − first token) / (4 − 1) ≈ 317 ms, lands in (300, 400]. A
    non-streamed request adds neither."""
    from aisix.telemetry.otel import TOKEN_BUCKETS_MS
    cfg = gateway_config(upstream.base_url, prom_otlp=prometheus.otlp_url, export_interval_ms=300)
    with GatewayProcess(tmp_path, cfg) as gw:
        got = await post_raw(gw.url + CHAT, chat("gaps", True))
        assert got.status == 200 and got.body.endswith(b"data: [DONE]\n\n")
        assert (await post_raw(gw.url + CHAT, chat("whole", False))).status == 200
    m = GatewayMetrics(prometheus, gw.instance)
    m.wait_value("aisix_llm_inter_token_latency_milliseconds_count", 3, model="m1")
    m.wait_value("aisix_llm_time_per_output_token_milliseconds_count", 1, model="m1")
    itl = buckets(prometheus, m, "aisix_llm_inter_token_latency_milliseconds")
    assert sorted(le for le in itl if le != float("inf")) == [float(b) for b in TOKEN_BUCKETS_MS]
    assert (itl[1], itl[300], itl[400], itl[500], itl[750], itl[float("inf")]) == (1, 1, 2, 2, 3, 3), itl
    assert m.value("aisix_llm_inter_token_latency_milliseconds_sum") >= 950
    tpot = buckets(prometheus, m, "aisix_llm_time_per_output_token_milliseconds")
    assert (tpot[300], tpot[400]) == (0, 1), tpot


async def test_latency_samples_of_sampled_requests_carry_their_trace_as_exemplars(prometheus, tmp_path, upstream):
    """A sampled request's latencies (request, LLM, first token) reach Prometheus with its trace and
    span id as exemplars (the ids of the span the gateway exports); an unsampled one's never do."""
    cfg = gateway_config(upstream.base_url, prom_otlp=prometheus.otlp_url, export_interval_ms=300)
    sampled, unsampled = "4bf92f3577b34da6a3ce929d0e0e4736", "5bf92f3577b34da6a3ce929d0e0e4737"
    with GatewayProcess(tmp_path, cfg) as gw:
        got = await post_raw(gw.url + CHAT, chat("stream", True), headers={"traceparent": f"00-{sampled}-00f067aa0ba902b7-01"})
        assert got.status == 200
        span_id = got.headers["x-aisix-request-id"].split("-")[1]
        assert (await post_raw(gw.url + CHAT, chat("stream", True),
                               headers={"traceparent": f"00-{unsampled}-00f067aa0ba902b7-00"})).status == 200
    m = GatewayMetrics(prometheus, gw.instance)
    m.wait_value("aisix_request_latency_milliseconds_count", 2, endpoint=CHAT)
    for name, labels in (("aisix_request_latency_milliseconds", {"endpoint": CHAT}),
                         ("aisix_llm_latency_milliseconds", {}), ("aisix_llm_first_token_latency_milliseconds", {})):
        found = [(e["labels"], float(e["value"])) for s in prometheus.exemplars(m.sel(name + "_bucket", **labels))
                 for e in s["exemplars"]]
        assert [labels for labels, _ in found] == [{"trace_id": sampled, "span_id": span_id}], (name, found)
        assert found[0][1] > 0
