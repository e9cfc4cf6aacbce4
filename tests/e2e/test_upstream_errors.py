"""Upstream errors passed back whole (issue 9, items 2 and 4-9): ``param`` and the retry hints
survive, an error as a stream's first event keeps the status it stands for, a 200 error body
keeps its message, the provider refusing the *gateway's* key is told apart from the client's own
401 (in the body, the metric and the log), and no configured secret ever reaches a client, a log
line or a span, even when the upstream echoes it. Scripted upstream on loopback, the official
openai client, a real Prometheus and a real OTLP/gRPC receiver."""
from __future__ import annotations

import time

import openai
import pytest

from aisix.upstream import log as upstream_log
from tests.support.harness import ROLE, TXT, GatewayMetrics, GatewayProcess, ev, gateway_config, post_raw

CHAT = "/v1/chat/completions"
PROVIDER_KEY = "sk-upstream-Zq8vR2mN5pL1xT7w"
CLIENT_KEY = "sk-client-Hj3kL9pQ2wE8rT5y"
ADMIN_KEY = "admin-Mn4bV7cX1zA6sD9f"
JSON = {"Content-Type": "application/json"}


def err_body(message: str, etype: str = "invalid_request_error", param=None, code=None) -> bytes:
    import json
    return json.dumps({"error": {"message": message, "type": etype, "param": param, "code": code}}).encode()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream, prometheus, sink):
    cfg = gateway_config(upstream.base_url, prom_otlp=prometheus.otlp_url, traces=sink.endpoint,
                         apikeys=[{"key": CLIENT_KEY, "allowed_models": ["m1"]}])
    cfg["models"][0]["provider_config"]["api_key"] = PROVIDER_KEY
    cfg["deployment"]["admin"]["admin_key"] = [{"key": ADMIN_KEY}]
    with GatewayProcess(tmp_path_factory.mktemp("gw"), cfg, args=["--log-level", "info"]) as g:
        yield g


def client(gw, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=CLIENT_KEY, max_retries=retries)


def ask(gw, key: str, stream: bool = False, retries: int = 0):
    c = client(gw, retries).chat.completions.create(model="m1", messages=[{"role": "user", "content": key}],
                                                    stream=stream)
    return list(c) if stream else c


def seen(upstream, key: str) -> int:
    return sum(1 for s in upstream.seen if s.body["messages"][-1]["content"] == key)


@pytest.mark.parametrize("stream", [False, True])
def test_error_fields_pass_whole_param_included(gw, upstream, stream):
    key = f"param-{stream}"
    upstream.script(key, status=400, headers=JSON, body=err_body(
        "Invalid value for 'content'", param="messages[0].content", code="invalid_value"))
    with pytest.raises(openai.BadRequestError) as e:
        ask(gw, key, stream)
    assert (e.value.type, e.value.param, e.value.code) == ("invalid_request_error", "messages[0].content",
                                                           "invalid_value")
    assert e.value.body == {"message": "Invalid value for 'content'", "type": "invalid_request_error",
                            "param": "messages[0].content", "code": "invalid_value"}


def test_retry_hints_survive_a_429(gw, upstream):
    hints = {"retry-after": "2", "retry-after-ms": "1500", "x-ratelimit-limit-requests": "60",
             "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s",
             "x-ratelimit-limit-tokens": "150000", "x-ratelimit-remaining-tokens": "149000",
             "x-ratelimit-reset-tokens": "6m0s"}
    upstream.script("hints", status=429, headers={**JSON, **hints},
                    body=err_body("Rate limit reached", "requests", code="rate_limit_exceeded"))
    with pytest.raises(openai.RateLimitError) as e:
        ask(gw, "hints")
    got = e.value.response.headers
    assert {k: got.get(k) for k in hints} == hints


def test_a_429_with_no_attempt_left_comes_back_without_waiting_its_retry_after(gw, upstream):
    """Found by attacking a gateway: a one-deployment model slept out the upstream's Retry-After
    (here 1.5 s) before answering, though no retry followed. The 429 comes back at once (the
    bound, 1 s, is two thirds of the hint: no sleep happened), after one upstream call."""
    upstream.script("hint-no-retry", status=429, headers={**JSON, "retry-after-ms": "1500"},
                    body=err_body("Rate limit reached", "requests", code="rate_limit_exceeded"))
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        ask(gw, "hint-no-retry")
    assert time.monotonic() - t0 < 1.0 and seen(upstream, "hint-no-retry") == 1


@pytest.mark.parametrize("event,status,exc", [
    ({"message": "maximum context length is 8192 tokens", "type": "invalid_request_error",
      "param": "messages", "code": "context_length_exceeded"}, 400, openai.BadRequestError),
    ({"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}, 429, openai.RateLimitError),
    ({"message": "something odd", "type": "weird_error"}, 502, openai.InternalServerError),
], ids=["400", "429", "unknown-502"])
def test_first_event_error_keeps_its_status_and_is_not_retried_in_vain(gw, upstream, event, status, exc):
    import json
    key = f"first-{status}"
    upstream.script(key, writes=[(0, ev(json.dumps({"error": event})))])
    with pytest.raises(exc) as e:
        ask(gw, key, stream=True, retries=2 if status == 400 else 0)
    assert e.value.status_code == status
    assert e.value.response.headers["Content-Type"].startswith("application/json")
    assert e.value.body["message"] == event["message"] and e.value.body["code"] == event.get("code")
    assert seen(upstream, key) == 1  # a 400 is final: the openai client does not retry it


def test_a_200_whose_body_is_an_error_keeps_the_upstream_message(gw, upstream):
    upstream.script("ok-error", status=200, headers=JSON, body=b'{"error":{"message":"model is overloaded, '
                    b'try later","type":"server_error"}}')
    with pytest.raises(openai.APIStatusError) as e:
        ask(gw, "ok-error")
    assert e.value.status_code == 502
    assert "model is overloaded, try later" in e.value.body["message"]


def test_upstream_refusing_the_gateway_key_is_told_apart(gw, upstream, prometheus):
    m = GatewayMetrics(prometheus, gw.instance)
    upstream.script("bad-provider-key", status=401, headers={**JSON, "x-request-id": "req_up_401"},
                    body=err_body("Incorrect API key provided.", code="invalid_api_key"))
    with pytest.raises(openai.AuthenticationError) as e:
        ask(gw, "bad-provider-key")
    assert e.value.code == "upstream_auth_failed"
    assert "refused the gateway's credentials" in e.value.message and "not your API key" in e.value.message
    with pytest.raises(openai.AuthenticationError) as own:  # the gateway's own 401: the client's key
        openai.OpenAI(base_url=gw.base_url, api_key="sk-wrong", max_retries=0).chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "x"}])
    assert own.value.code == "invalid_api_key"
    m.wait_value("aisix_upstream_error_count_total", 1, model="m1", upstream_status="401")
    deadline = time.monotonic() + 5
    while "request_id=req_up_401" not in gw.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(ln for ln in gw.output().splitlines() if "request_id=req_up_401" in ln)
    assert "upstream call failed: model=m1 deployment=default provider=openai upstream_model=up-1 status=401 " \
           "code=upstream_auth_failed upstream_status=401" in line


def test_no_secret_reaches_client_log_or_span(gw, upstream, sink):
    """Upstreams that echo the key: a 401, a 503 and an error event mid-stream each carry the
    provider key, the client key and the admin key; none of them leaves the gateway whole."""
    import asyncio
    import json
    echo = f"Incorrect API key provided: {PROVIDER_KEY}; caller {CLIENT_KEY}; admin {ADMIN_KEY}"
    upstream.script("echo-401", status=401, headers=JSON, body=err_body(echo, code="invalid_api_key"))
    upstream.script("echo-503", status=503, headers=JSON, body=err_body(echo, "server_error"))
    upstream.script("echo-mid", writes=[(0, ev(ROLE)), (0, ev(TXT("hi"))),
                                        (0, ev(json.dumps({"error": {"message": echo, "type": "server_error"}})))])
    bodies, n0 = [], len(sink.spans)
    for key in ("echo-401", "echo-503"):
        for stream in (False, True):
            got = asyncio.run(post_raw(gw.url + CHAT, {"model": "m1", "stream": stream,
                                                       "messages": [{"role": "user", "content": key}]}, CLIENT_KEY))
            assert got.status in (401, 503)
            bodies.append(got.body.decode())
    mid = asyncio.run(post_raw(gw.url + CHAT, {"model": "m1", "stream": True,
                                               "messages": [{"role": "user", "content": "echo-mid"}]}, CLIENT_KEY))
    assert mid.status == 200 and b'"error"' in mid.body
    bodies.append(mid.body.decode())
    secrets = (PROVIDER_KEY, CLIENT_KEY, ADMIN_KEY)
    for b in bodies:
        assert "Incorrect API key provided: ****" in b  # the message survives, the key does not
        assert not any(s in b for s in secrets), b
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(1 for s in sink.spans[n0:] if s["attributes"].get(
            "aisix.upstream.status_code") is not None) < 5:
        time.sleep(0.1)
    spans = [s for s in sink.spans[n0:] if s["attributes"].get("aisix.upstream.status_code") is not None]
    assert len(spans) >= 5 and any("****" in s["status_message"] for s in spans), [(s["name"], s["status_message"], s["attributes"].get("http.response.status_code")) for s in spans]
    for s in sink.spans:
        text = json.dumps(s)
        assert not any(x in text for x in secrets), text
    log = gw.output()
    assert "Incorrect API key provided: ****" in log
    assert not any(x in log for x in secrets)


def test_failure_lines_are_rate_limited_per_model_and_status(caplog):
    upstream_log._last.clear()
    caplog.set_level("WARNING", logger="aisix.upstream")
    args = ("m", "openai", "up", 502, "upstream_unreachable", None, None, "refused")
    written = [upstream_log.upstream_failure(*args, now=100.0 + i) for i in range(12)]  # one a second for 12 s
    assert written == [True] + [False] * 9 + [True, False]
    assert upstream_log.upstream_failure("m", "openai", "up", 429, None, 429, None, "slow", now=101.0)  # other status
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "(9 more like it in the last 10 s)" in lines[1]
    assert "status=502" in lines[0] and "upstream_status=-" in lines[0] and "status=429" in lines[2]


def test_secrets_in_every_error_field_and_header_are_masked(gw, upstream):
    """Not just the message: an upstream echoing the key in ``type``, ``param``, ``code`` and its
    ``x-request-id`` / ``x-ratelimit-*`` headers (found by breaking it)."""
    import json
    body = json.dumps({"error": {"message": "bad", "type": f"t-{PROVIDER_KEY}", "param": f"p-{PROVIDER_KEY}",
                                 "code": f"c-{PROVIDER_KEY}"}}).encode()
    upstream.script("echo-fields", status=429, headers={**JSON, "x-request-id": f"rid-{PROVIDER_KEY}",
                                                        "x-ratelimit-foo": PROVIDER_KEY}, body=body)
    import asyncio
    got = asyncio.run(post_raw(gw.url + CHAT, {"model": "m1", "messages": [{"role": "user", "content": "echo-fields"}]},
                               CLIENT_KEY))
    assert got.status == 429
    text = got.body.decode() + json.dumps(dict(got.headers))
    assert PROVIDER_KEY not in text and "****" in text
    time.sleep(0.3)
    assert PROVIDER_KEY not in gw.output()


def test_an_auth_error_as_a_streams_first_event_is_the_upstreams_not_the_clients(gw, upstream):
    import json
    upstream.script("first-auth", writes=[(0, ev(json.dumps({"error": {
        "message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}})))])
    with pytest.raises(openai.AuthenticationError) as e:
        ask(gw, "first-auth", stream=True)
    assert e.value.code == "upstream_auth_failed" and "refused the gateway's credentials" in e.value.message


def test_an_upstream_echoing_its_key_in_a_success_never_shows_it(gw, upstream):
    """Found by attacking a gateway: an upstream that repeats the key it was sent inside an answer
    that is not an error (a chunk's content, a whole body, a Responses ``response.failed`` event
    relayed as it came) showed it to the client. Every byte relayed has the key masked."""
    import asyncio
    import json
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-1",
             "choices": [{"index": 0, "delta": {"content": f"you sent Bearer {PROVIDER_KEY}"}, "finish_reason": None}]}
    upstream.script("echo-in-stream", writes=[(0, ev(ROLE)), (0, ev(json.dumps(chunk))),
                                             (0, b'data: {"id":"c","object":"chat.completion.chunk","created":1,'
                                                 b'"model":"up-1","choices":[{"index":0,"delta":{},'
                                                 b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')])
    whole = {"id": "c", "object": "chat.completion", "created": 1, "model": "up-1", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": PROVIDER_KEY}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    upstream.script("echo-in-body", headers=JSON, body=json.dumps(whole).encode())
    failed = {"type": "response.failed", "sequence_number": 1, "response": {
        "id": "resp_1", "object": "response", "status": "failed", "model": "up-1", "output": [],
        "error": {"code": "server_error", "message": f"failed with Bearer {PROVIDER_KEY}"}}}
    upstream.script("echo-in-responses", writes=[(0, b"event: response.failed\ndata: " + json.dumps(failed).encode()
                                                  + b"\n\n")])
    mask = ("****" + PROVIDER_KEY[-4:]).encode()
    for key, stream in (("echo-in-stream", True), ("echo-in-body", False)):
        got = asyncio.run(post_raw(gw.url + CHAT, {"model": "m1", "stream": stream,
                                                   "messages": [{"role": "user", "content": key}]}, CLIENT_KEY))
        assert got.status == 200 and PROVIDER_KEY.encode() not in got.body and mask in got.body, got.body
    got = asyncio.run(post_raw(gw.url + "/v1/responses", {"model": "m1", "stream": True, "input": "echo-in-responses"},
                               CLIENT_KEY))
    assert PROVIDER_KEY.encode() not in got.body and mask in got.body, got.body



def test_an_event_that_is_not_json_is_a_502_not_a_clean_empty_answer(gw, upstream):
    """Found by attacking a gateway: ``data: {not json`` then ``[DONE]`` was relayed as a 200 (and,
    translated to /v1/messages, became an empty "successful" answer). Before anything was sent it
    is a 502 ``upstream_malformed_response``."""
    import asyncio
    upstream.script("garbage-event", writes=[(0, b"data: {not json\n\ndata: [DONE]\n\n")])
    got = asyncio.run(post_raw(gw.url + CHAT, {"model": "m1", "stream": True,
                                               "messages": [{"role": "user", "content": "garbage-event"}]}, CLIENT_KEY))
    assert got.status == 502 and b'"upstream_malformed_response"' in got.body, got.body
