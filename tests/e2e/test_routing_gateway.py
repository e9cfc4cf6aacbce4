"""Routing (issue 11) through real gateway processes on loopback with scripted upstreams: load
balancing, retries before the first byte only, cooldown, fallbacks, the per-attempt series and
spans. The Router itself, sans IO: :mod:`tests.unit.test_router`."""
from __future__ import annotations

import asyncio
import time

import openai
import pytest

from aisix.errors import upstream_unreachable
from aisix.proxy.routing import Router, failure_kind, retryable
from tests.support.harness import (
    ROLE,
    STOP,
    TXT,
    GatewayMetrics,
    GatewayProcess,
    ScriptedUpstream,
    ev,
    gateway_config,
    post_raw,
)
from tests.support.services import HOST, free_port
from tests.unit.test_router import DONE, JSON, failure, group


# -- real gateways ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ups():
    ups = [ScriptedUpstream().start() for _ in range(3)]
    yield ups
    for up in ups:
        up.stop()


def dep(i: str, base: str, **kw) -> dict:
    return {"id": i, "model": "openai/up-1", "provider_config": {"api_key": "sk-up", "api_base": base,
                                                                  "connect_timeout_ms": 2000}, **kw}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, ups, prometheus, sink):
    a, b, c = ups
    dead = f"http://{HOST}:{free_port()}/v1"
    models = [
        {"name": "half-down", "deployments": [dep("up", a.base_url), dep("down", dead)]},
        {"name": "capped", "deployments": [dep("one", a.base_url, rate_limit={"rpm": 1}),
                                           dep("two", b.base_url, rate_limit={"rpm": 1})]},
        {"name": "mix", "deployments": [
            {"id": "an", "model": "anthropic/claude-x", "provider_config": {"api_key": "sk-ant", "api_base": dead}},
            dep("oa", a.base_url)], "routing": {"strategy": "round_robin", "allowed_fails": 1000}},
        {"name": "pair2", "deployments": [dep("a", a.base_url), dep("b", b.base_url)],
         "routing": {"strategy": "round_robin"}},
        {"name": "alternate", "deployments": [dep("down", dead), dep("up", a.base_url)],
         "routing": {"strategy": "round_robin", "allowed_fails": 1000}},
        {"name": "pair", "deployments": [dep("a", a.base_url), dep("b", b.base_url)],
         "routing": {"strategy": "round_robin"}, "fallbacks": ["backup"]},
        {"name": "backup", "model": "openai/up-2", "provider_config": {"api_key": "sk-up", "api_base": c.base_url}},
        {"name": "tok", "deployments": [dep("x", a.base_url), dep("y", b.base_url)],
         "routing": {"strategy": "round_robin", "allowed_fails": 1000}, "fallbacks": ["tok-fb"]},
        {"name": "tok-fb", "model": "openai/up-2", "provider_config": {"api_key": "sk-up", "api_base": c.base_url}},
        {"name": "lim", "model": "openai/up-1", "provider_config": {"api_key": "sk-up", "api_base": dead},
         "fallbacks": ["lim-b", "lim-c"]},
        {"name": "lim2", "model": "openai/up-1", "provider_config": {"api_key": "sk-up", "api_base": dead},
         "fallbacks": ["lim-b"]},
        {"name": "lim-b", "model": "openai/up-2", "provider_config": {"api_key": "sk-up", "api_base": c.base_url},
         "rate_limit": {"rpm": 1}},
        {"name": "lim-c", "model": "openai/up-1", "provider_config": {"api_key": "sk-up", "api_base": b.base_url}},
    ]
    cfg = gateway_config(a.base_url, prom_otlp=prometheus.otlp_url, traces=sink.endpoint, models=models,
                         apikeys=[{"key": "sk-test", "allowed_models": ["half-down", "pair", "pair2", "alternate", "capped", "mix",
                                                                   "tok"]},
                                 {"key": "sk-lim", "allowed_models": ["lim", "lim2"], "rate_limit": {"rpm": 100}}])
    with GatewayProcess(tmp_path_factory.mktemp("gw"), cfg) as g:
        yield g


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0)


def seen(up, key: str) -> int:
    return sum(1 for s in up.seen if s.body["messages"][-1]["content"] == key)


def test_every_request_succeeds_with_one_deployment_of_two_down(gw, ups, prometheus):
    a = ups[0]
    a.script("hd", status=200, headers=JSON, body=b'{"id":"c","object":"chat.completion","model":"up-1","choices":'
             b'[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
             b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
    m = GatewayMetrics(prometheus, gw.instance)
    ok, attempts = 0, 0
    for _ in range(20):
        r = client(gw).chat.completions.with_raw_response.create(model="half-down",
                                                                  messages=[{"role": "user", "content": "hd"}])
        ok += r.parse().choices[0].message.content == "ok"
        attempts += int(r.headers["x-aisix-attempts"])
        assert r.headers["x-aisix-deployment"] == "half-down/up"
    assert ok == 20 and seen(a, "hd") == 20
    down = attempts - 20  # every attempt beyond the first of each request went to the dead one
    m.wait_value("aisix_upstream_request_count_total", 20, model="half-down", deployment="up", status_code="200")
    m.wait_value("aisix_upstream_request_count_total", down, model="half-down", deployment="down",
                 status_code="connect_error")
    m.wait_value("aisix_request_count_total", 20, endpoint="/v1/chat/completions", status_code="200")


def test_429_with_retry_after_cools_the_deployment_down(gw, ups):
    a, b, _ = ups
    a.script("cool", status=429, headers={**JSON, "Retry-After": "2"},
             body=b'{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}')
    b.script("cool", writes=[(0, ev(ROLE)), (0, ev(TXT("b"))), (0, ev(STOP)), (0, DONE)])
    for _ in range(8):
        got = asyncio.run(post_raw(gw.url + "/v1/chat/completions", {
            "model": "pair", "stream": True, "messages": [{"role": "user", "content": "cool"}]}))
        assert got.status == 200 and got.headers["x-aisix-deployment"] == "pair/b"
    asked = [s.started for s in a.seen if s.body["messages"][-1]["content"] == "cool"]
    assert asked  # round robin reached it once, and it answered 429 with Retry-After: 2
    assert all(later - earlier >= 1.9 for earlier, later in zip(asked, asked[1:]))  # then none for 2 s
    assert seen(b, "cool") == 8


def test_all_deployments_failing_falls_back(gw, ups, prometheus):
    a, b, c = ups
    boom = b'{"error":{"message":"boom","type":"server_error"}}'
    a.script("fb", status=500, headers=JSON, body=boom)
    b.script("fb", status=500, headers=JSON, body=boom)
    c.script("fb", writes=[(0, ev(ROLE)), (0, ev(TXT("from backup"))), (0, ev(STOP)), (0, DONE)])
    m = GatewayMetrics(prometheus, gw.instance)
    before = m.value("aisix_fallback_count_total", model="pair", fallback="backup")
    na, nb = seen(a, "fb"), seen(b, "fb")
    r = client(gw).chat.completions.with_raw_response.create(model="pair", stream=True,
                                                              messages=[{"role": "user", "content": "fb"}])
    text = "".join(ch.choices[0].delta.content or "" for ch in r.parse())
    assert text == "from backup"
    assert r.headers["x-aisix-deployment"] == "backup/default" and r.headers["x-aisix-attempts"] == "4"
    assert (seen(a, "fb") - na, seen(b, "fb") - nb) in ((2, 1), (1, 2))  # 1 + 2 retries, round robin
    assert c.last("fb").body["model"] == "up-2"
    m.wait_value("aisix_fallback_count_total", before + 1, model="pair", fallback="backup")
    # the client's request is counted once, with the status it got; the model label stays the alias asked for
    m.wait_value("aisix_upstream_request_count_total", 1, model="backup", deployment="default", status_code="200")


def test_a_stream_cut_after_its_first_chunk_is_not_retried(gw, ups):
    a, b, _ = ups
    for up in (a, b):
        up.script("cut", writes=[(0, ev(ROLE)), (0, ev(TXT("once")))], end="reset")
    na, nb = seen(a, "cut"), seen(b, "cut")
    got = []
    with pytest.raises(openai.APIError):
        for c in client(gw).chat.completions.create(model="pair", stream=True,
                                                    messages=[{"role": "user", "content": "cut"}]):
            got.append(c.choices[0].delta.content or "")
    assert "".join(got) == "once"
    assert seen(a, "cut") - na + seen(b, "cut") - nb == 1


def test_a_400_is_not_retried(gw, ups):
    a, b, _ = ups
    for up in (a, b):
        up.script("bad", status=400, headers=JSON,
                  body=b'{"error":{"message":"bad","type":"invalid_request_error","param":"messages","code":null}}')
    na, nb = seen(a, "bad"), seen(b, "bad")
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).chat.completions.create(model="pair", messages=[{"role": "user", "content": "bad"}])
    assert e.value.param == "messages" and e.value.response.headers["x-aisix-attempts"] == "1"
    assert seen(a, "bad") - na + seen(b, "bad") - nb == 1


def test_one_client_span_per_attempt_and_the_upstream_sees_its_own(gw, ups, sink):
    a = ups[0]
    a.script("spans", status=200, headers=JSON, body=b'{"id":"c","object":"chat.completion","model":"up-1",'
             b'"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
             b'"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}')
    for _ in range(2):  # round robin: one of two requests starts at the dead deployment
        r = client(gw).chat.completions.with_raw_response.create(model="alternate",
                                                                  messages=[{"role": "user", "content": "spans"}])
        if r.headers["x-aisix-attempts"] != "1":
            break
    n = int(r.headers["x-aisix-attempts"])
    assert n == 2
    trace_id, server_id = r.headers["x-aisix-request-id"].split("-")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len([s for s in sink.spans if s["trace_id"] == trace_id]) < n + 1:
        time.sleep(0.05)
    mine = [s for s in sink.spans if s["trace_id"] == trace_id]
    server = [s for s in mine if s["kind"] == 2]
    clients = sorted((s for s in mine if s["kind"] == 3), key=lambda s: s["start_ns"])
    assert len(server) == 1 and server[0]["span_id"] == server_id and len(clients) == n
    assert all(c["parent_span_id"] == server_id and c["name"] == "chat up-1" for c in clients)
    for c in clients[:-1]:  # the failed ones: the dead deployment
        assert c["attributes"]["aisix.deployment"] == "down" and c["attributes"]["error.type"] == "connect_error"
        assert c["status_code"] == 2  # ERROR
    ok = clients[-1]
    assert ok["attributes"]["aisix.deployment"] == "up" and ok["attributes"]["http.response.status_code"] == 200
    assert ok["attributes"]["gen_ai.usage.output_tokens"] == 1 and "error.type" not in ok["attributes"]
    assert a.last("spans").headers["traceparent"] == f"00-{trace_id}-{ok['span_id']}-01"


def test_admin_health_lists_each_deployment_and_its_cooldown(gw, ups):
    import json
    import urllib.request
    a, b, _ = ups
    a.script("health", status=429, headers={**JSON, "Retry-After": "30"},
             body=b'{"error":{"message":"slow","type":"requests","code":"rate_limit_exceeded"}}')
    b.script("health", writes=[(0, ev(ROLE)), (0, ev(TXT("b"))), (0, ev(STOP)), (0, DONE)])
    for _ in range(2):  # round robin: one of the two reaches a, which cools down for 30 s
        asyncio.run(post_raw(gw.url + "/v1/chat/completions", {
            "model": "pair2", "stream": True, "messages": [{"role": "user", "content": "health"}]}))
    req = urllib.request.Request(gw.admin_url + "/health/models", headers={"Authorization": "Bearer admin-test-key"})
    with urllib.request.urlopen(req, timeout=5) as r:
        doc = json.loads(r.read())
    rows = {(x["model"], x["deployment"]): x for x in doc["list"]}
    assert set(rows) >= {("pair2", "a"), ("pair2", "b"), ("pair", "a"), ("half-down", "up"), ("half-down", "down"), ("backup", "default")}
    assert rows[("pair2", "a")]["state"] == "cooling_down" and 25_000 < rows[("pair2", "a")]["cooldown_remaining_ms"] <= 30_000
    assert rows[("pair2", "b")]["state"] == "healthy" and rows[("pair2", "b")]["in_flight"] == 0
    assert rows[("pair2", "b")]["ewma_first_byte_ms"] > 0 and rows[("pair2", "a")]["upstream"] == "openai/up-1"
    unauth = urllib.request.Request(gw.admin_url + "/health/models")
    try:
        urllib.request.urlopen(unauth, timeout=5)
        raise AssertionError("no key, yet 200")
    except urllib.error.HTTPError as e:
        assert e.code == 401


def test_every_deployment_at_its_rate_limit_is_a_429_and_each_served_its_share(gw, ups):
    a, b, _ = ups
    for up in (a, b):
        up.script("capped", writes=[(0, ev(ROLE)), (0, ev(TXT("x"))), (0, ev(STOP)), (0, DONE)])
    if time.time() % 60 > 50:  # the windows are clock-aligned minutes: start in a fresh one
        time.sleep(61 - time.time() % 60)
    got = [asyncio.run(post_raw(gw.url + "/v1/chat/completions", {
        "model": "capped", "stream": True, "messages": [{"role": "user", "content": "capped"}]})) for _ in range(3)]
    assert [g.status for g in got] == [200, 200, 429]
    assert {g.headers["x-aisix-deployment"] for g in got[:2]} == {"capped/one", "capped/two"}
    import json
    err = json.loads(got[2].body)["error"]
    assert err["code"] == "deployment_capacity_exceeded" and 0 < int(got[2].headers["Retry-After"]) <= 60
    assert (seen(a, "capped"), seen(b, "capped")) == (1, 1)


@pytest.fixture(scope="module")
def gw_split(tmp_path_factory, ups, prometheus):
    a, b, c = ups
    models = [{"name": "split", "deployments": [dep("heavy", a.base_url, weight=3), dep("light", b.base_url)]},
              {"name": "busy", "deployments": [dep("a", a.base_url), dep("c", c.base_url)],
               "routing": {"strategy": "least_busy"}}]
    cfg = gateway_config(a.base_url, prom_otlp=prometheus.otlp_url, models=models,
                         apikeys=[{"key": "sk-test", "allowed_models": ["split", "busy"]}])
    with GatewayProcess(tmp_path_factory.mktemp("gw-split"), cfg) as g:
        yield g


def test_weights_hold_over_a_thousand_requests_and_attempts_counted_are_attempts_seen(gw_split, ups, prometheus):
    a, b, _ = ups
    body = (b'{"id":"c","object":"chat.completion","model":"up-1","choices":[{"index":0,"message":'
            b'{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}')
    for up in (a, b):
        up.script("split", status=200, headers=JSON, body=body)

    async def run():
        import aiohttp
        async with aiohttp.ClientSession() as s:
            async def one():
                async with s.post(gw_split.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-test"},
                                  json={"model": "split", "messages": [{"role": "user", "content": "split"}]}) as r:
                    assert r.status == 200
                    return r.headers["x-aisix-deployment"]
            out = []
            for _ in range(10):  # 1 000 requests, 100 at a time
                out += await asyncio.gather(*(one() for _ in range(100)))
            return out
    picks = asyncio.run(run())
    heavy, light = seen(a, "split"), seen(b, "split")
    assert heavy + light == 1000 and picks.count("split/heavy") == heavy
    assert abs(heavy / 1000 - 0.75) < 0.05, heavy
    m = GatewayMetrics(prometheus, gw_split.instance)
    m.wait_value("aisix_upstream_request_count_total", heavy, model="split", deployment="heavy", status_code="200")
    m.wait_value("aisix_upstream_request_count_total", light, model="split", deployment="light", status_code="200")


def test_least_busy_sends_a_new_request_to_the_idle_deployment(gw_split, ups):
    a, _, c = ups
    slow = [(0, ev(ROLE))] + [(0.2, ev(TXT("."))) for _ in range(10)] + [(0, ev(STOP)), (0, DONE)]
    a.script("busy", writes=slow)
    c.script("busy", writes=slow)

    async def run():
        first = asyncio.create_task(post_raw(gw_split.url + "/v1/chat/completions", {
            "model": "busy", "stream": True, "messages": [{"role": "user", "content": "busy"}]}))
        await asyncio.sleep(0.5)  # the first stream is under way on one deployment
        second = await post_raw(gw_split.url + "/v1/chat/completions", {
            "model": "busy", "stream": True, "messages": [{"role": "user", "content": "busy"}]})
        return await first, second
    first, second = asyncio.run(run())
    assert first.status == second.status == 200
    assert first.headers["x-aisix-deployment"] != second.headers["x-aisix-deployment"]


def test_failures_say_what_happened():
    from aisix.errors import upstream_malformed, upstream_stream_broken
    from aisix.proxy.handlers import attempt_status
    assert attempt_status(upstream_unreachable("refused")) == "connect_error"
    assert attempt_status(failure(504, None)) == "timeout"
    assert attempt_status(upstream_malformed("not JSON")) == "malformed_response"
    assert attempt_status(upstream_stream_broken("cut")) == "stream_broken"
    assert attempt_status(failure(503, 503)) == "503"
    assert failure_kind(upstream_malformed("x")) == 502 and retryable(upstream_stream_broken("x"), group())


def test_garbage_retry_hints_are_ignored_and_huge_ones_capped():
    from aisix.proxy.routing import MAX_HINT_COOLDOWN_S, retry_after_s
    assert [retry_after_s(failure(429, 429, {"retry-after-ms": v})) for v in ("inf", "nan", "-5", "x")] == [None] * 4
    assert retry_after_s(failure(429, 429, {"Retry-After": "1e400"})) is None  # float('1e400') is inf
    m, r = group(), Router()
    r.failed(m.targets[0], failure(429, 429, {"Retry-After": "1e308"}), 100.0)
    assert r.state(m.targets[0]).cooldown_until == 100.0 + MAX_HINT_COOLDOWN_S
    row = r.health([m], 100.0)[0]
    assert isinstance(row["cooldown_remaining_ms"], int) and row["cooldown_remaining_ms"] == 600_000
    r.prune([])  # the model was deleted: its deployments' state goes with it
    assert r.state(m.targets[0]).cooldown_until == 0


def test_a_deployment_that_cannot_express_the_request_is_skipped(gw, ups):
    a = ups[0]
    a.script("mix", status=200, headers=JSON, body=b'{"id":"c","object":"chat.completion","model":"up-1","choices":'
             b'[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"},'
             b'{"index":1,"message":{"role":"assistant","content":"ok2"},"finish_reason":"stop"}]}')
    for _ in range(2):  # round robin: one of the two starts at the anthropic deployment, which can't do n=2
        r = client(gw).chat.completions.with_raw_response.create(
            model="mix", n=2, messages=[{"role": "user", "content": "mix"}])
        assert r.headers["x-aisix-deployment"] == "mix/oa" and r.headers["x-aisix-attempts"] == "1"
        assert [c.message.content for c in r.parse().choices] == ["ok", "ok2"]


def test_a_stream_broken_after_its_200_counts_against_the_deployment(gw, ups, prometheus):
    a = ups[0]
    a.script("brk", writes=[(0, ev(ROLE)), (0, ev(TXT("once")))], end="reset")
    m = GatewayMetrics(prometheus, gw.instance)
    before = m.value("aisix_upstream_request_count_total", model="half-down", deployment="up",
                     status_code="stream_broken")
    got = asyncio.run(post_raw(gw.url + "/v1/chat/completions", {
        "model": "half-down", "stream": True, "messages": [{"role": "user", "content": "brk"}]}))
    assert got.status == 200 and b'"upstream_stream_broken"' in got.body
    m.wait_value("aisix_upstream_request_count_total", before + 1, model="half-down", deployment="up",
                 status_code="stream_broken")


def test_an_attempt_cut_by_the_client_is_measured(gw, ups, prometheus):
    a, b, _ = ups
    for up in (a, b):
        up.script("gone", head_delay=2.0, writes=[(0, ev(ROLE)), (0, ev(STOP)), (0, DONE)])
    m = GatewayMetrics(prometheus, gw.instance)
    before = sum(m.value("aisix_upstream_request_count_total", model="pair2", deployment=d, status_code="client_closed")
                 for d in ("a", "b"))

    async def cut():
        import aiohttp
        async with aiohttp.ClientSession() as s:
            try:
                async with s.post(gw.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-test"},
                                  json={"model": "pair2", "stream": True, "messages": [{"role": "user", "content": "gone"}]},
                                  timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                    await r.read()
            except asyncio.TimeoutError:
                pass
    asyncio.run(cut())
    m.wait_value("aisix_upstream_request_count_total", before + 1, model="pair2", status_code="client_closed")


def admin_call(gw, method: str, path: str, body: dict | None = None) -> dict:
    import json
    import urllib.request
    req = urllib.request.Request(gw.admin_url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer admin-test-key", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_a_fallback_deleted_later_is_skipped_and_logged_once(gw, ups):
    c = ups[2]
    c.script("orphan", writes=[(0, ev(ROLE)), (0, ev(TXT("from b"))), (0, ev(STOP)), (0, DONE)])
    dead = f"http://{HOST}:{free_port()}/v1"
    b = admin_call(gw, "POST", "/models", {"name": "orphan-b", "model": "openai/up-2",
                                           "provider_config": {"api_key": "sk-up", "api_base": c.base_url}})
    admin_call(gw, "POST", "/models", {"name": "orphan", "model": "openai/up-1", "fallbacks": ["orphan-b"],
                                       "provider_config": {"api_key": "sk-up", "api_base": dead}})
    key = admin_call(gw, "POST", "/apikeys", {"allowed_models": ["orphan"]})["key"]
    req = {"model": "orphan", "stream": True, "messages": [{"role": "user", "content": "orphan"}]}
    got = asyncio.run(post_raw(gw.url + "/v1/chat/completions", req, key))
    assert got.status == 200 and got.headers["x-aisix-deployment"] == "orphan-b/default"
    admin_call(gw, "DELETE", f"/models/{b['id']}")
    for _ in range(2):  # the one upstream left is down: its own error, no crash
        got = asyncio.run(post_raw(gw.url + "/v1/chat/completions", req, key))
        assert got.status == 502 and b'"upstream_unreachable"' in got.body
        assert got.headers["x-aisix-deployment"] == "orphan/default"
    assert gw.output().count("model orphan: fallback orphan-b is not configured") == 1


def usage_body(prompt: int, completion: int) -> bytes:
    return (b'{"id":"c","object":"chat.completion","model":"up-1","choices":[{"index":0,"message":{"role":"assistant",'
            b'"content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":%d,"completion_tokens":%d,'
            b'"total_tokens":%d}}' % (prompt, completion, prompt + completion))


def test_tokens_are_exported_per_deployment_under_the_alias_that_answered(gw, ups, prometheus):
    a, b, c = ups
    a.script("tok", status=200, headers=JSON, body=usage_body(3, 2))
    b.script("tok", status=200, headers=JSON, body=usage_body(4, 1))
    boom = b'{"error":{"message":"boom","type":"server_error"}}'
    for up in (a, b):
        up.script("tok-fb", status=500, headers=JSON, body=boom)
    c.script("tok-fb", status=200, headers=JSON, body=usage_body(7, 4))
    went = []
    for key in ("tok", "tok", "tok-fb"):  # round robin: one on x, one on y; then every deployment fails
        r = client(gw).chat.completions.with_raw_response.create(model="tok", messages=[{"role": "user", "content": key}])
        went.append(r.headers["x-aisix-deployment"])
    assert sorted(went[:2]) == ["tok/x", "tok/y"] and went[2] == "tok-fb/default"
    m = GatewayMetrics(prometheus, gw.instance)
    name = "aisix_deployment_token_count_total"
    for deployment, (p, co) in (("x", (3, 2)), ("y", (4, 1))):
        for kind, n in (("prompt", p), ("completion", co), ("total", p + co)):
            m.wait_value(name, n, model="tok", deployment=deployment, type=kind)
    for kind, n in (("prompt", 7), ("completion", 4), ("total", 11)):
        m.wait_value(name, n, model="tok-fb", deployment="default", type=kind)
    # the seed series: every token under the alias the client asked for, none under the fallback
    for kind, n in (("prompt", 3 + 4 + 7), ("completion", 2 + 1 + 4), ("total", 5 + 5 + 11)):
        m.wait_value("aisix_token_count_total", n, model="tok", type=kind)
    assert m.value("aisix_token_count_total", model="tok-fb") == 0
    # the failed attempts of the third request produced nothing: no tokens on x or y beyond the first two
    assert m.value(name, model="tok", type="total") == 10


def test_a_fallback_over_its_own_rate_limit_is_skipped_and_the_key_counted_once(gw, ups, prometheus):
    _, b, c = ups
    for up in (b, c):
        up.script("lim", writes=[(0, ev(ROLE)), (0, ev(TXT("x"))), (0, ev(STOP)), (0, DONE)])
    if time.time() % 60 > 50:  # the windows are clock-aligned minutes: start in a fresh one
        time.sleep(61 - time.time() % 60)
    m = GatewayMetrics(prometheus, gw.instance)
    got = [asyncio.run(post_raw(gw.url + "/v1/chat/completions", {
        "model": model, "stream": True, "messages": [{"role": "user", "content": "lim"}]}, "sk-lim"))
        for model in ("lim", "lim", "lim2")]
    assert [g.status for g in got] == [200, 200, 429]
    # the first takes lim-b's one request of the minute; the second finds it full and goes on to lim-c
    assert [g.headers["x-aisix-deployment"] for g in got[:2]] == ["lim-b/default", "lim-c/default"]
    assert [seen(c, "lim"), seen(b, "lim")] == [1, 1]
    import json
    err = json.loads(got[2].body)["error"]  # lim2 has no other fallback: lim-b's 429 is the answer
    assert err["code"] == "rate_limit_exceeded" and "model `lim-b`" in err["message"] and "(rpm)" in err["message"]
    assert 0 < int(got[2].headers["Retry-After"]) <= 60
    # the key's limit counted each request once (for the alias asked), not once per model entered
    assert [g.headers["x-ratelimit-remaining-requests"] for g in got[:2]] == ["99", "98"]
    m.wait_value("aisix_fallback_count_total", 1, model="lim", fallback="lim-b")
    m.wait_value("aisix_fallback_count_total", 1, model="lim", fallback="lim-c")
    m.wait_value("aisix_upstream_request_count_total", 1, model="lim2", deployment="default", status_code="connect_error")
    assert m.value("aisix_fallback_count_total", model="lim2") == 0  # (same record) lim-b was skipped, never tried
