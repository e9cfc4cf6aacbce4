"""The SSE and HTTP corners other gateways got wrong (issue 9, items 10-12, 14 and 16): media types
compared case-insensitively, a leading byte order mark, nothing after ``[DONE]`` whatever the read
boundaries, strict servers that refuse ``stream_options``, and CORS for browser clients. Scripted
upstream on loopback, the official openai client, a real Prometheus and OTLP/gRPC receiver."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest

from aisix.sse import SSEParser
from tests.support.harness import ROLE, STOP, TXT, USAGE, GatewayMetrics, GatewayProcess, ev, gateway_config, post_raw

CHAT = "/v1/chat/completions"
DONE = b"data: [DONE]\n\n"
ORIGIN = "https://app.example.com"


def model(name: str, base: str, **pc) -> dict:
    return {"name": name, "model": "openai/up-1", "provider_config": {"api_key": "sk-upstream", "api_base": base, **pc}}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream, prometheus, sink):
    models = [model("m1", upstream.base_url), model("m-never", upstream.base_url, stream_usage="never"),
              model("m-always", upstream.base_url, stream_usage="always")]
    cfg = gateway_config(upstream.base_url, prom_otlp=prometheus.otlp_url, traces=sink.endpoint, models=models,
                         apikeys=[{"key": "sk-test", "allowed_models": ["m1", "m-never", "m-always"]}])
    cfg["server"]["proxy"]["cors"] = {"allow_origins": [ORIGIN]}
    with GatewayProcess(tmp_path_factory.mktemp("gw"), cfg) as g:
        yield g


def chat(key: str, stream: bool = True, model: str = "m1", **kw) -> dict:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": key}], **kw}


def texts(body: bytes) -> str:
    out = []
    for e in SSEParser().feed(body):
        if e.data and e.data != b"[DONE]":
            for ch in json.loads(e.data).get("choices", []):
                out.append(ch["delta"].get("content") or "")
    return "".join(out)


def span_of(sink, trace_key: str, timeout: float = 10) -> dict:
    """The server span of the request whose x-request-id is ``trace_key`` (trace id - span id)."""
    trace_id, span_id = trace_key.split("-")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in sink.spans:
            if s["trace_id"] == trace_id and s["span_id"] == span_id:
                return s
        time.sleep(0.05)
    raise AssertionError(f"no span {trace_key}")


def test_media_type_is_case_insensitive(gw, upstream):
    upstream.script("ctype", headers={"Content-Type": "Text/Event-Stream; Charset=UTF-8"},
                    writes=[(0, ev(ROLE)), (0, ev(TXT("ok"))), (0, ev(STOP)), (0, DONE)])
    got = asyncio.run(post_raw(gw.url + CHAT, chat("ctype")))
    assert got.status == 200 and texts(got.body) == "ok" and got.body.endswith(DONE)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "bom-split-across-reads"])
def test_leading_byte_order_mark_is_stripped_and_the_first_event_kept(gw, upstream, sink, split):
    key = f"bom-{split}"
    first = b"\xef\xbb\xbf" + ev(TXT("first"))
    writes = [(0, first[:2]), (0.05, first[2:])] if split else [(0, first)]
    upstream.script(key, writes=writes + [(1.0, ev(TXT(" second"))), (0, ev(STOP)), (0, DONE)])
    got = asyncio.run(post_raw(gw.url + CHAT, chat(key)))
    assert got.status == 200
    assert got.body.startswith(b"data: ") and texts(got.body) == "first second"
    span = span_of(sink, got.headers["x-request-id"])
    # stamped on the first event: well before the second one was even written (1 s later)
    assert span["event_times"]["gen_ai.first_token"] - span["start_ns"] < 1_000_000_000


def test_nothing_after_done_is_relayed_or_measured_in_the_same_read(gw, upstream, prometheus):
    m = GatewayMetrics(prometheus, gw.instance)
    before = m.value("aisix_token_count_total", model="m1", type="prompt")
    one_read = (ev(ROLE) + ev(TXT("a")) + ev(STOP) + ev(USAGE(3, 1)) + DONE
                + ev(TXT("after")) + ev(USAGE(100, 100)) + DONE)
    upstream.script("after-done", writes=[(0, one_read)])
    got = asyncio.run(post_raw(gw.url + CHAT, chat("after-done", stream_options={"include_usage": True})))
    assert got.status == 200
    assert got.body == ev(ROLE) + ev(TXT("a")) + ev(STOP) + ev(USAGE(3, 1)) + DONE
    m.wait_value("aisix_token_count_total", before + 3, model="m1", type="prompt")
    time.sleep(1.0)  # a few more exports: the 100 after [DONE] never come
    assert m.value("aisix_token_count_total", model="m1", type="prompt") == before + 3


def test_strict_server_refusing_stream_options_auto_retries_once_and_remembers(gw, upstream, sink):
    upstream.script("strict", refuse_field="stream_options",
                    writes=[(0, ev(ROLE)), (0, ev(TXT("a"))), (0, ev(TXT("b"))), (0, ev(STOP)), (0, DONE)])
    n0 = len(upstream.seen)
    got = asyncio.run(post_raw(gw.url + CHAT, chat("strict")))
    assert got.status == 200 and texts(got.body) == "ab"
    sent = [s.body for s in upstream.seen[n0:]]
    assert [("stream_options" in b) for b in sent] == [True, False]  # asked, refused, asked again without
    span = span_of(sink, got.headers["x-request-id"])
    assert span["attributes"]["aisix.usage.estimated"] is True
    assert span["attributes"]["gen_ai.usage.output_tokens"] == 2  # the gateway's count of content events
    n1 = len(upstream.seen)
    assert texts(asyncio.run(post_raw(gw.url + CHAT, chat("strict"))).body) == "ab"
    assert [("stream_options" in s.body) for s in upstream.seen[n1:]] == [False]  # remembered for the model
    # the client's own stream_options are not sent either, once the upstream is known to refuse them
    n2 = len(upstream.seen)
    assert asyncio.run(post_raw(gw.url + CHAT, chat("strict", stream_options={"include_usage": True}))).status == 200
    assert [("stream_options" in s.body) for s in upstream.seen[n2:]] == [False]


def test_stream_usage_never_and_always(gw, upstream):
    upstream.script("strict", refuse_field="stream_options",
                    writes=[(0, ev(ROLE)), (0, ev(TXT("a"))), (0, ev(STOP)), (0, DONE)])
    n0 = len(upstream.seen)
    assert asyncio.run(post_raw(gw.url + CHAT, chat("strict", model="m-never"))).status == 200
    assert [("stream_options" in s.body) for s in upstream.seen[n0:]] == [False]
    client = openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0)
    n1 = len(upstream.seen)
    with pytest.raises(openai.BadRequestError) as e:  # always: the refusal goes to the client, no retry
        list(client.chat.completions.create(model="m-always", messages=[{"role": "user", "content": "strict"}],
                                            stream=True))
    assert "stream_options" in e.value.message
    assert len(upstream.seen) - n1 == 1


def test_stream_usage_never_sends_not_even_the_clients_stream_options(gw, upstream, sink):
    upstream.script("never-own", refuse_field="stream_options",
                    writes=[(0, ev(ROLE)), (0, ev(TXT("a"))), (0, ev(TXT("b"))), (0, ev(STOP)), (0, DONE)])
    got = asyncio.run(post_raw(gw.url + CHAT, chat("never-own", model="m-never",
                                                   stream_options={"include_usage": True})))
    assert got.status == 200 and texts(got.body) == "ab"  # a stream, from the one call the upstream saw
    sent = [s.body for s in upstream.seen if s.body["messages"][-1]["content"] == "never-own"]
    assert len(sent) == 1 and "stream_options" not in sent[0] and sent[0]["stream"] is True
    span = span_of(sink, got.headers["x-request-id"])
    assert span["attributes"]["aisix.usage.estimated"] is True  # no usage from the upstream: the estimate
    assert span["attributes"]["gen_ai.usage.output_tokens"] == 2


async def _preflight(url: str, origin: str, headers: str = "authorization, content-type"):
    async with aiohttp.ClientSession() as s:
        async with s.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": headers}) as r:
            return r.status, r.headers.copy()


def test_cors_preflight_and_headers_on_answers_streams_and_errors(gw, upstream):
    upstream.script("cors", writes=[(0, ev(ROLE)), (0, ev(TXT("hi"))), (0, ev(STOP)), (0, DONE)])
    status, h = asyncio.run(_preflight(gw.url + CHAT, ORIGIN))
    assert status == 200
    assert h["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in h["Access-Control-Allow-Methods"]
    assert {"authorization", "content-type"} <= {x.strip().lower() for x in h["Access-Control-Allow-Headers"].split(",")}
    assert h["Access-Control-Max-Age"] == "600"
    for body, key, want in ((chat("cors"), "sk-test", 200), (chat("cors"), "sk-wrong", 401)):
        got = asyncio.run(post_raw(gw.url + CHAT, body, key, headers={"Origin": ORIGIN}))
        assert got.status == want and got.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "x-request-id" in got.headers["Access-Control-Expose-Headers"].lower() or \
            got.headers["Access-Control-Expose-Headers"] == "*"
    status, h = asyncio.run(_preflight(gw.url + CHAT, "https://evil.example"))
    assert status == 403 and "Access-Control-Allow-Origin" not in h
    got = asyncio.run(post_raw(gw.url + CHAT, chat("cors"), headers={"Origin": "https://evil.example"}))
    assert got.status == 200 and "Access-Control-Allow-Origin" not in got.headers


async def _get(url: str, headers: dict) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers=headers) as r:
            return r.status, r.headers.copy(), await r.json(content_type=None)


def test_cors_headers_on_errors_of_no_route_and_of_auth(gw):
    for path, key, want, code in (("/v1/no-such-route", "sk-test", 404, "not_found"),
                                  (CHAT, "sk-test", 405, "method_not_allowed"),  # GET on a POST route
                                  ("/v1/models", "sk-wrong", 401, "invalid_api_key")):
        status, h, body = asyncio.run(_get(gw.url + path, {"Origin": ORIGIN, "Authorization": f"Bearer {key}"}))
        assert (status, body["error"]["code"]) == (want, code)
        assert h["Access-Control-Allow-Origin"] == ORIGIN, path  # a browser script may read the error
        assert "x-request-id" in h["Access-Control-Expose-Headers"].lower().split(",")
        status, h, _ = asyncio.run(_get(gw.url + path, {"Origin": "https://evil.example",
                                                        "Authorization": f"Bearer {key}"}))
        assert status == want and "Access-Control-Allow-Origin" not in h


def test_cors_is_off_by_default(tmp_path, upstream):
    with GatewayProcess(tmp_path, gateway_config(upstream.base_url)) as g:
        status, h = asyncio.run(_preflight(g.url + CHAT, ORIGIN))
        assert status == 405 and "Access-Control-Allow-Origin" not in h
        got = asyncio.run(post_raw(g.url + CHAT, chat("cors"), headers={"Origin": ORIGIN}))
        assert "Access-Control-Allow-Origin" not in got.headers
