"""Cases C01–C10: inputs other gateways got wrong (reconstructed from public bug reports).

One gateway process for the module (alias ``m1`` → a scripted upstream on loopback, key
``sk-test``), exporting metrics to the session's real Prometheus and traces to a real OTLP/gRPC
receiver. Each test asserts the client's bytes and the metric deltas its request caused.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from tests.support.harness import ROLE, STOP, TXT, USAGE, GatewayMetrics, GatewayProcess, ev, gateway_config, post_raw

CHAT = "/v1/chat/completions"
REQ = "aisix_request_count_total"
TOK = "aisix_token_count_total"
FT = "aisix_llm_first_token_latency_milliseconds"
LLM = "aisix_llm_latency_milliseconds"
LAT = "aisix_request_latency_milliseconds"


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream, prometheus, sink):
    cfg = gateway_config(upstream.base_url, prom_otlp=prometheus.otlp_url, traces=sink.endpoint,
                         stream_idle_timeout_ms=3000)
    with GatewayProcess(tmp_path_factory.mktemp("gw-cases"), cfg) as g:
        g.metrics = GatewayMetrics(prometheus, g.instance)
        yield g


def body(key: str, **extra) -> dict:
    return {"model": "m1", "stream": True, "messages": [{"role": "user", "content": key}], **extra}


class Delta:
    """Metric values before a request, to assert the change it caused."""

    def __init__(self, m: GatewayMetrics, *series: tuple):
        self.m = m
        self.before = {s: m.value(s[0], **dict(s[1:])) for s in series}

    def expect(self, name: str, n: float, **labels):
        key = (name, *sorted(labels.items()))
        return self.m.wait_value(name, self.before[key] + n, **labels)

    def unchanged(self, name: str, **labels):
        key = (name, *sorted(labels.items()))
        assert self.m.value(name, **labels) == self.before[key], f"{name}{labels} changed"


def S(name, **labels):
    return (name, *sorted(labels.items()))


COMMON = [S(REQ, endpoint=CHAT, status_code="200"), S(TOK, model="m1", type="prompt"),
          S(TOK, model="m1", type="completion"), S(TOK, model="m1", type="total"),
          S(FT + "_count", model="m1"), S(FT + "_sum", model="m1"), S(LLM + "_count", model="m1")]


def without_usage(raw: bytes, usage_event: bytes) -> bytes:
    assert raw.count(usage_event) == 1
    return raw.replace(usage_event, b"")


async def test_c01_split_events_byte_faithful(gw, upstream):
    w1 = ("data: " + ROLE + '\n\ndata: {"id":"c1","object":"chat.completion.chunk","created":1,'
          '"model":"up-1","choices":[{"index":0,"delta":{"con').encode()
    w2 = ('tent":"Hel"},"finish_reason":null}]}\n\n' + "data: " + TXT("lo") + "\n\ndata: " + STOP
          + "\n\ndata: " + USAGE(3, 2) + "\n").encode()
    w3 = b"\ndata: [DONE]\n\n"
    upstream.script("C01", writes=[(0, w1), (0.02, w2), (0.02, w3)])
    d = Delta(gw.metrics, *COMMON)
    got = await post_raw(gw.url + CHAT, body("C01"))
    assert got.status == 200
    assert got.body == without_usage(w1 + w2 + w3, ("data: " + USAGE(3, 2) + "\n\n").encode())
    d.expect(TOK, 3, model="m1", type="prompt")
    d.expect(TOK, 2, model="m1", type="completion")
    d.expect(TOK, 5, model="m1", type="total")
    d.expect(FT + "_count", 1, model="m1")
    d.expect(REQ, 1, endpoint=CHAT, status_code="200")
    assert "decode" not in gw.output().lower()


@pytest.mark.parametrize("eol", ["\r\n", "\r"], ids=["crlf", "cr"])
async def test_c02_crlf_split_across_reads(gw, upstream, eol):
    key = f"C02-{len(eol)}"
    lines = ["data: " + ROLE, "", "data: " + TXT("Hel"), ""]
    w1 = (eol.join(lines) + eol).encode()  # the first two events, ending with the last line end
    rest = ["data: " + TXT("lo"), "", "data: " + STOP, "", "data: " + USAGE(3, 2), "", "data: [DONE]", "", ""]
    if eol == "\r\n":
        w1 = w1[:-1]  # ends right after a \r ...
        w2 = ("\n" + eol.join(rest)).encode()  # ... and the \n starts the next read
    else:
        w2 = eol.join(rest).encode()
    upstream.script(key, writes=[(0, w1), (0.5, w2)])
    d = Delta(gw.metrics, *COMMON)
    got = await post_raw(gw.url + CHAT, body(key))
    seen = upstream.last(key)
    w2_sent = seen.write_times[1]
    first = [t for t, b in got.reads if b"Hel" in b]
    assert first and first[0] < w2_sent, "the first events must reach the client before W2 is sent"
    usage_ev = ("data: " + USAGE(3, 2) + eol + eol).encode()
    assert got.body == without_usage(w1 + w2, usage_ev)
    assert all(e for e in got.data_events()), "no empty event"
    d.expect(TOK, 3, model="m1", type="prompt")
    d.expect(TOK, 2, model="m1", type="completion")
    d.expect(FT + "_count", 1, model="m1")
    ft_ms = gw.metrics.value(FT + "_sum", model="m1") - d.before[S(FT + "_sum", model="m1")]
    assert ft_ms < 500


async def test_c03a_comments_are_not_tokens(gw, upstream):
    writes = [(0, b": PROCESSING\n\n"), (1.0, b": ping\n\n"), (1.0, ev(ROLE)), (0.02, ev(TXT("ok"))),
              (0.02, ev(STOP)), (0.02, ev(USAGE(4, 1))), (0.02, b"data: [DONE]\n\n")]
    upstream.script("C03A", writes=writes)
    d = Delta(gw.metrics, *COMMON)
    got = await post_raw(gw.url + CHAT, body("C03A"))
    assert got.body == without_usage(b"".join(w for _, w in writes), ev(USAGE(4, 1)))
    assert got.body.count(b"data:") == 4  # comments stayed comments
    d.expect(FT + "_count", 1, model="m1")
    ft_ms = gw.metrics.value(FT + "_sum", model="m1") - d.before[S(FT + "_sum", model="m1")]
    assert ft_ms >= 1950
    d.expect(TOK, 4, model="m1", type="prompt")
    d.expect(TOK, 1, model="m1", type="completion")


async def test_c03b_only_comments_then_close_is_not_a_success(gw, upstream):
    upstream.script("C03B", writes=[(0, b": ping\n\n"), (0.02, b": ping\n\n")])
    d = Delta(gw.metrics, *COMMON, S(REQ, endpoint=CHAT, status_code="502"))
    got = await post_raw(gw.url + CHAT, body("C03B"))
    if got.status == 200:  # bytes (the comments) went out first: the stream ends with an error event
        events = got.data_events()
        assert events and "error" in json.loads(events[-1])
        assert b"[DONE]" not in got.body
    else:
        assert got.status == 502 and "error" in json.loads(got.body)
    d.expect(REQ, 1, endpoint=CHAT, status_code="502")
    d.unchanged(REQ, endpoint=CHAT, status_code="200")
    d.unchanged(FT + "_count", model="m1")
    d.unchanged(TOK, model="m1", type="total")


@pytest.mark.parametrize("client_asks", [False, True], ids=["A-no-stream-options", "B-include-usage"])
async def test_c04_usage_chunk(gw, upstream, client_asks):
    key = f"C04-{client_asks}"
    writes = [(0, ev(ROLE)), (0.02, ev(TXT("a"))), (0.02, ev(TXT("b"))), (0.02, ev(STOP)),
              (0.02, ev(USAGE(12, 7))), (0.02, b"data: [DONE]\n\n")]
    upstream.script(key, writes=writes)
    extra = {"stream_options": {"include_usage": True}} if client_asks else {}
    d = Delta(gw.metrics, *COMMON)
    got = await post_raw(gw.url + CHAT, body(key, **extra))
    raw = upstream.last(key).raw
    assert raw.count(b'"stream_options"') == 1
    assert json.loads(raw)["stream_options"] == {"include_usage": True}
    full = b"".join(w for _, w in writes)
    if client_asks:
        assert got.body == full
    else:
        assert got.body == without_usage(full, ev(USAGE(12, 7)))
        assert all(json.loads(e).get("choices") for e in got.data_events() if e != b"[DONE]")
    d.expect(TOK, 12, model="m1", type="prompt")
    d.expect(TOK, 7, model="m1", type="completion")
    d.expect(TOK, 19, model="m1", type="total")


async def test_c05_upstream_error_after_200(gw, upstream, sink):
    err = b'data: {"error":{"message":"server overloaded","type":"server_error","code":"overloaded"}}\n\n'
    upstream.script("C05", writes=[(0, ev(ROLE)), (0.02, ev(TXT("Hel"))), (0.02, err)])
    d = Delta(gw.metrics, *COMMON, S(REQ, endpoint=CHAT, status_code="502"))
    got = await post_raw(gw.url + CHAT, body("C05"))
    events = got.data_events()
    assert b"Hel" in got.body
    last = json.loads(events[-1])
    assert set(last) == {"error"} and last["error"]["message"] == "server overloaded"
    assert {"message", "type", "code"} <= set(last["error"])
    assert b"[DONE]" not in got.body
    for e in events[:-1]:
        chunk = json.loads(e)
        for ch in chunk.get("choices", []):
            assert "overloaded" not in json.dumps(ch) and ch.get("finish_reason") != "stop"
    d.expect(REQ, 1, endpoint=CHAT, status_code="502")
    d.unchanged(REQ, endpoint=CHAT, status_code="200")
    d.expect(LLM + "_count", 1, model="m1")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        spans = [s for s in sink.spans if s["attributes"].get("http.response.status_code") == 502
                 and s["name"] == "POST /v1/chat/completions"]
        if spans:
            break
        time.sleep(0.1)
    assert spans and spans[-1]["status_code"] == 2  # STATUS_CODE_ERROR


@pytest.mark.parametrize("status,ctype,payload,retry", [
    (429, "application/json", b'{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}', "7"),
    (400, "application/json", b'{"error":{"message":"bad messages","type":"invalid_request_error","code":null}}', None),
    (401, "application/json", b'{"error":{"message":"Incorrect API key","type":"invalid_request_error","code":"invalid_api_key"}}', None),
    (503, "text/html", b"<html>busy</html>", None),
], ids=["429", "400", "401", "503-html"])
async def test_c06_plain_json_error_for_a_stream(gw, upstream, status, ctype, payload, retry):
    key = f"C06-{status}"
    headers = {"Content-Type": ctype, "x-request-id": f"req_{key}", **({"Retry-After": retry} if retry else {})}
    upstream.script(key, status=status, headers=headers, body=payload)
    d = Delta(gw.metrics, *COMMON, S(REQ, endpoint=CHAT, status_code=str(status)))
    got = await post_raw(gw.url + CHAT, body(key))
    assert got.status == status
    assert got.headers["Content-Type"].startswith("application/json")
    if retry:
        assert got.headers["Retry-After"] == retry
    assert got.headers["x-request-id"] == f"req_{key}"  # the upstream's request id passes back on errors too
    doc = json.loads(got.body)
    assert set(doc["error"]) >= {"message", "type", "code"}
    assert b"data:" not in got.body
    if status == 429:
        assert doc["error"]["message"] == "Rate limit reached"
    d.expect(REQ, 1, endpoint=CHAT, status_code=str(status))
    d.unchanged(FT + "_count", model="m1")
    d.unchanged(TOK, model="m1", type="total")


async def test_c07a_client_disconnects_mid_stream(gw, upstream, sink):
    writes = [(0, ev(ROLE))] + [(0.2, ev(TXT("x"))) for _ in range(50)] + [
        (0.2, ev(STOP)), (0, ev(USAGE(20, 50))), (0, b"data: [DONE]\n\n")]
    upstream.script("C07A", writes=writes)
    d = Delta(gw.metrics, *COMMON, S(REQ, endpoint=CHAT, status_code="499"), S(LAT + "_count", endpoint=CHAT))
    got = await post_raw(gw.url + CHAT, body("C07A"), max_events=3)
    seen = upstream.last("C07A")
    deadline = time.monotonic() + 3
    while seen.closed_by_peer is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert seen.closed_by_peer is not None, "the upstream connection was not closed"
    assert seen.closed_by_peer - got.closed_at < 1.0
    d.expect(REQ, 1, endpoint=CHAT, status_code="499")
    d.expect(LAT + "_count", 1, endpoint=CHAT)
    d.unchanged(REQ, endpoint=CHAT, status_code="200")
    assert sink.wait_for(1)
    deadline = time.monotonic() + 10
    while not any(s["attributes"].get("http.response.status_code") == 499 for s in sink.spans):
        assert time.monotonic() < deadline, "no span for the 499"
        await asyncio.sleep(0.1)


async def test_c07b_client_disconnects_before_first_byte(gw, upstream):
    upstream.script("C07B", head_delay=5.0, writes=[(0, ev(ROLE))])
    d = Delta(gw.metrics, *COMMON, S(REQ, endpoint=CHAT, status_code="499"))
    t0 = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(post_raw(gw.url + CHAT, body("C07B")), 1.0)
    closed = time.monotonic()
    seen = upstream.last("C07B")
    while seen.closed_by_peer is None and time.monotonic() < closed + 3:
        await asyncio.sleep(0.02)
    assert seen.closed_by_peer is not None and seen.closed_by_peer - closed < 1.0
    assert closed - t0 < 2
    d.expect(REQ, 1, endpoint=CHAT, status_code="499")
    d.unchanged(REQ, endpoint=CHAT, status_code="200")


async def test_c08a_no_done_at_clean_end(gw, upstream):
    writes = [(0, ev(ROLE)), (0.02, ev(TXT("a"))), (0.02, ev(STOP)), (0.02, ev(USAGE(6, 2)))]
    upstream.script("C08A", writes=writes)
    d = Delta(gw.metrics, *COMMON)
    got = await post_raw(gw.url + CHAT, body("C08A"))
    seen = upstream.last("C08A")
    assert got.body.endswith(b"data: [DONE]\n\n")
    assert got.reads[-1][0] - seen.finished < 0.2
    d.expect(TOK, 6, model="m1", type="prompt")
    d.expect(TOK, 2, model="m1", type="completion")
    d.expect(REQ, 1, endpoint=CHAT, status_code="200")


async def test_c08b_heartbeats_after_last_event_end_by_idle_timeout(gw, upstream):
    writes = [(0, ev(ROLE)), (0.02, ev(TXT("a"))), (0.02, ev(STOP)), (0.02, ev(USAGE(6, 2)))]
    writes += [(1.0, b": ping\n\n") for _ in range(30)]
    upstream.script("C08B", writes=writes, end="hold")
    d = Delta(gw.metrics, *COMMON)
    t0 = time.monotonic()
    got = await asyncio.wait_for(post_raw(gw.url + CHAT, body("C08B")), 15)
    # the module's stream_idle_timeout_ms is 3000: the stream ends 3-4 s after the last data event
    assert time.monotonic() - t0 < 6
    assert got.body.endswith(b"data: [DONE]\n\n")
    d.expect(REQ, 1, endpoint=CHAT, status_code="200")
    d.expect(TOK, 6, model="m1", type="prompt")
    time.sleep(1)
    d.expect(TOK, 8, model="m1", type="total")  # recorded exactly once


async def test_c10_label_values_stay_bounded(gw, upstream):
    import aiohttp
    upstream.script("C10", writes=[(0, ev(ROLE)), (0, ev(STOP)), (0, b"data: [DONE]\n\n")])
    async with aiohttp.ClientSession() as s:
        async def one(method, path, key="sk-test", model="m1"):
            async with s.request(method, gw.url + path, headers={"Authorization": f"Bearer {key}"},
                                 json={"model": model, "messages": [{"role": "user", "content": "C10"}]}) as r:
                await r.read()
                return r.status
        statuses = []
        for batch in range(10):
            statuses += await asyncio.gather(*(one("POST", CHAT, model=f"rand-{uuid.uuid4()}") for _ in range(50)))
            statuses += await asyncio.gather(*(one("POST", f"{CHAT}/{uuid.uuid4()}") for _ in range(25)))
            statuses += await asyncio.gather(*(one("GET", f"/x/{uuid.uuid4()}") for _ in range(25)))
        statuses += await asyncio.gather(*(one("POST", CHAT, key=f"sk-wrong-{uuid.uuid4()}") for _ in range(100)))
        assert await one("GET", CHAT) == 405  # a wrong method keeps its route's template
    assert statuses.count(400) == 500 and statuses.count(404) == 500 and statuses.count(401) == 100
    m = gw.metrics
    m.wait_value(REQ, 500, endpoint="unmatched", timeout=15)
    m.wait_value(REQ, 1, endpoint=CHAT, method="GET", status_code="405")
    series = m.prom.query(f'{{__name__=~"aisix_.*", instance="{m.instance}"}}')
    endpoints = {s["metric"].get("endpoint") for s in series} - {None}
    models = {s["metric"].get("model") for s in series} - {None}
    assert endpoints <= {CHAT, "/v1/embeddings", "/v1/models", "unmatched"}
    assert models <= {"m1"}
    assert len(series) < 400, len(series)
