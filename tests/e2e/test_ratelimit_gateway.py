"""Rate limits through the whole gateway: case C11, slow streams, 1,000 disconnects, token limits
with streamed usage, live changes.

The gateway runs in the test's process (``start_gateway`` + ``Server``, the same code ``python -m
aisix serve`` runs) so that the test can read the limiter's counters and give it a clock that
starts just after a minute boundary (no window edge falls inside a test unless the test moves the
clock). The upstream is the harness's scripted OpenAI-compatible server on loopback; metrics go
to the session's real Prometheus.
"""
from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
import pytest

from aisix.config.loader import Config
from aisix.hooks.ratelimit import RateLimitHook
from aisix.server.lifecycle import Server, start_gateway
from tests.support.harness import (
    ROLE,
    STOP,
    TXT,
    USAGE,
    GatewayMetrics,
    Script,
    ScriptedUpstream,
    ev,
    gateway_config,
    post_raw,
)

CHAT = "/v1/chat/completions"
REQ = "aisix_request_count_total"
DONE = b"data: [DONE]\n\n"
T0 = 1_799_972_400.0  # a minute boundary, 20 minutes after a UTC midnight


class FakeClock:
    """Wall-clock seconds that start at ``T0 + 1`` and run at real speed; ``jump`` moves them on."""

    def __init__(self):
        self.m0 = time.monotonic()
        self.offset = T0 + 1

    def __call__(self) -> float:
        return self.offset + time.monotonic() - self.m0

    def jump(self, seconds: float) -> None:
        self.offset += seconds


class RunningGateway:
    def __init__(self, gateway, server, records, clock, metrics):
        self.gateway, self.server, self.records, self.clock, self.metrics = gateway, server, records, clock, metrics
        self.url = f"http://{gateway.config.server.proxy.listen}{CHAT}"
        self.hook = next(h for h in gateway.pipeline.hooks if isinstance(h, RateLimitHook))
        self.hook.clock = clock

    def key_counters(self, secret="sk-test"):
        return self.hook.usage_of_key(self.key_id(secret))

    def key_id(self, secret="sk-test") -> str:
        return self.gateway.holder.current.key_for(secret).id

    def statuses(self) -> list[int]:
        return [r.status for r in self.records if r.endpoint == CHAT]


@pytest.fixture
def upstream():
    up = ScriptedUpstream().start()
    yield up
    up.stop()


@pytest.fixture
async def start(tmp_path, upstream, prometheus):
    """``await start(apikeys=[...], models=[...])`` → a :class:`RunningGateway` (stopped at the end)."""
    running = []

    async def _start(apikeys, models=None):
        doc = gateway_config(upstream.base_url, prom_otlp=prometheus.otlp_url, apikeys=apikeys, data_dir=tmp_path)
        if models is not None:
            doc["models"] = [{"model": "openai/up-1", "provider_config": {"api_key": "sk-upstream",
                                                                          "api_base": upstream.base_url}, **m}
                             for m in models]
        gw = await start_gateway(Config.model_validate(doc))
        records = []
        submit = gw.telemetry.submit
        gw.telemetry.submit = lambda rec: (records.append(rec), submit(rec))
        server = Server(gw)
        await server.start()
        port = int(gw.config.server.proxy.listen.rsplit(":", 1)[1])
        metrics = GatewayMetrics(prometheus, f"{os.uname().nodename}:{port}")  # the service.instance.id
        g = RunningGateway(gw, server, records, FakeClock(), metrics)
        running.append(g)
        return g

    yield _start
    for g in running:
        await g.server.stop()


def chat(content="hi", **extra) -> dict:
    """The cases' client body (``stream: true``), keyed for the scripted upstream by ``content``."""
    return {"model": "m1", "stream": True, "messages": [{"role": "user", "content": content}], **extra}


def stream_script(*events: str, gap: float = 0.02) -> Script:
    """The upstream sends each event ``gap`` seconds after the one before, then ``[DONE]``."""
    return Script(writes=[(0 if i == 0 else gap, ev(e)) for i, e in enumerate(events)] + [(gap, DONE)])


async def until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def error_of(resp) -> dict:
    assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
    return json.loads(resp.body)["error"]


# -- C11 -------------------------------------------------------------------------------------------

async def test_c11_concurrency_slot_held_for_the_whole_stream_and_given_back(start, upstream):
    g = await start(apikeys=[{"key": "sk-test", "allowed_models": ["m1"],
                              "rate_limit": {"concurrency": 1, "tpm": 100}}])
    # A: streams for 3 s, USAGE(40,30) at its end
    upstream.scripts["hi"] = Script(writes=[
        (0, ev(ROLE)), *[(0.5, ev(TXT(c))) for c in "abcde"], (0.5, ev(STOP)), (0.02, ev(USAGE(40, 30))),
        (0.02, DONE)])
    t0 = time.monotonic()
    a_task = asyncio.create_task(post_raw(g.url, chat()))

    async def at(t):
        await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))

    await at(0.5)
    b = await post_raw(g.url, chat())
    await at(3.5)
    a = await a_task
    a_ended = a.reads[-1][0] - t0
    upstream.scripts["hi"] = stream_script(ROLE, TXT("ok"), STOP, USAGE(6, 4))
    c = await post_raw(g.url, chat())
    upstream.scripts["hi"] = Script(status=500, headers={"Content-Type": "application/json"},
                                    body=b'{"error":{"message":"boom","type":"server_error","code":null}}')
    d = await post_raw(g.url, chat())
    upstream.scripts["hi"] = stream_script(ROLE, TXT("ok"), STOP, USAGE(6, 4))
    e = await post_raw(g.url, chat())

    assert a.status == 200 and a.body.endswith(DONE) and 2.9 < a_ended < 3.5
    assert a.headers["x-ratelimit-limit-concurrent"] == "1"
    assert a.headers["x-ratelimit-remaining-concurrent"] == "0"
    assert a.headers["x-ratelimit-remaining-tokens"] == "100"
    # B: rejected while A streams
    assert b.status == 429
    err = error_of(b)
    assert err["type"] == "rate_limit_error" and err["code"] == "concurrency_limit_exceeded"
    assert f"API key `{g.key_id()}`" in err["message"] and "concurrency" in err["message"]
    assert "sk-test" not in err["message"]
    assert b.headers["x-ratelimit-remaining-concurrent"] == "0"
    assert b.headers["Retry-After"] == "1"
    # C: admitted, and shows the 70 tokens A was charged
    assert c.status == 200 and c.body.endswith(DONE)
    assert c.headers["x-ratelimit-remaining-tokens"] == "30"
    assert c.headers["x-ratelimit-limit-tokens"] == "100"
    # D: the upstream's 500 passes through with the limiter's headers; it costs no tokens
    assert d.status == 500 and error_of(d)["message"] == "boom"
    assert d.headers["x-ratelimit-remaining-tokens"] == "20"
    # E: admitted: D gave its slot back
    assert e.status == 200 and e.body.endswith(DONE)
    assert e.headers["x-ratelimit-remaining-concurrent"] == "0"
    assert e.headers["x-ratelimit-remaining-tokens"] == "20"

    await until(lambda: len(g.statuses()) == 5, what="five records")
    counters = g.key_counters()
    assert (counters.in_flight, counters.req_minute, counters.tok_minute) == (0, 4, 70 + 10 + 10)
    assert sorted(g.statuses()) == [200, 200, 200, 429, 500]
    # the gateway shares this loop: wait for Prometheus from a thread
    await asyncio.to_thread(g.metrics.wait_value, REQ, 1, endpoint=CHAT, status_code="429")
    await asyncio.to_thread(g.metrics.wait_value, REQ, 3, endpoint=CHAT, status_code="200")


# -- concurrency -------------------------------------------------------------------------------------

async def test_concurrency_with_slow_streams_on_key_and_model(start, upstream):
    g = await start(apikeys=[{"key": "sk-test", "allowed_models": ["m1", "m2"], "rate_limit": {"concurrency": 3}}],
                    models=[{"name": "m1", "rate_limit": {"concurrency": 2}}, {"name": "m2"}])
    upstream.scripts["slow"] = stream_script(ROLE, *[TXT("x")] * 10, STOP, USAGE(1, 10), gap=0.1)
    upstream.scripts["fast"] = stream_script(ROLE, TXT("ok"), STOP, USAGE(1, 1))

    async def first_event(session, model, content="slow"):
        """Open a stream and wait for its headers and first event; returns (response, task finishing it)."""
        resp = await session.post(g.url, json={**chat(content), "model": model},
                                  headers={"Authorization": "Bearer sk-test"})
        if resp.status == 200:
            await resp.content.readuntil(b"\n\n")
        return resp, asyncio.create_task(resp.read())

    async with aiohttp.ClientSession() as s:
        m1a, ta = await first_event(s, "m1")
        m1b, tb = await first_event(s, "m1")
        m1c, _ = await first_event(s, "m1")   # the model's 2 slots are taken
        m2a, tc = await first_event(s, "m2")  # the key's third slot
        m2b, _ = await first_event(s, "m2")   # the key is full
        heads = [(r.status, r.headers.get("x-ratelimit-limit-concurrent"),
                  r.headers.get("x-ratelimit-remaining-concurrent")) for r in (m1a, m1b, m1c, m2a, m2b)]
        # m1: the stricter of key (3) and model (2); m2: the key's only
        assert heads == [(200, "2", "1"), (200, "2", "0"), (429, "2", "0"), (200, "3", "0"), (429, "3", "0")]
        m1c_err, m2b_err = json.loads(await m1c.read())["error"], json.loads(await m2b.read())["error"]
        assert "model `m1`" in m1c_err["message"] and m1c_err["code"] == "concurrency_limit_exceeded"
        assert f"API key `{g.key_id()}`" in m2b_err["message"] and m2b_err["code"] == "concurrency_limit_exceeded"
        assert g.key_counters().in_flight == 3 and g.hook.usage_of_model("m1").in_flight == 2
        bodies = await asyncio.gather(ta, tb, tc)
        assert all(b.endswith(DONE) for b in bodies)
    await until(lambda: g.key_counters().in_flight == 0, what="the key's slots back")
    assert g.hook.usage_of_model("m1").in_flight == 0
    after = await post_raw(g.url, chat("fast"))
    assert (after.status, after.headers["x-ratelimit-limit-concurrent"],
            after.headers["x-ratelimit-remaining-concurrent"]) == (200, "2", "1")


async def test_thousand_client_disconnects_give_every_slot_back(start, upstream):
    limit = 50
    g = await start(apikeys=[{"key": "sk-test", "allowed_models": ["m1"], "rate_limit": {"concurrency": limit}}],
                    models=[{"name": "m1", "rate_limit": {"concurrency": limit}}])
    # mid-stream: one token, then the upstream keeps the stream open; before any byte: it says nothing
    upstream.scripts["mid"] = Script(writes=[(0, ev(ROLE)), (0, ev(TXT("x")))], end="hold")
    upstream.scripts["silent"] = Script(head_delay=3600, body=b"{}")
    hdrs = {"Authorization": "Bearer sk-test"}
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def mid_stream():
            resp = await s.post(g.url, json=chat("mid"), headers=hdrs)
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-ratelimit-limit-concurrent"] == str(limit)
            await resp.content.readuntil(b"\n\n")
            return resp

        async def silent():
            async with s.post(g.url, json=chat("silent"), headers=hdrs) as resp:
                raise AssertionError(f"got a response: {resp.status}")

        for batch in range(20):
            if batch % 2 == 0:  # 50 clients that read the first event, then close
                resps = await asyncio.gather(*(mid_stream() for _ in range(limit)))
                assert g.key_counters().in_flight == limit
                if batch == 0:  # full: one more is turned away
                    extra = await post_raw(g.url, chat("mid"))
                    assert extra.status == 429 and error_of(extra)["code"] == "concurrency_limit_exceeded"
                for r in resps:
                    r.close()
            else:  # 50 clients that close while waiting for the first byte
                tasks = [asyncio.create_task(silent()) for _ in range(limit)]
                await until(lambda: g.key_counters().in_flight == limit, what="50 silent in flight")
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            await until(lambda: g.key_counters().in_flight == 0, what=f"slots back after batch {batch}")
            assert g.hook.usage_of_model("m1").in_flight == 0

    upstream.scripts["fast"] = stream_script(ROLE, TXT("ok"), STOP, USAGE(1, 1))
    after = await post_raw(g.url, chat("fast"))
    assert after.status == 200 and after.headers["x-ratelimit-remaining-concurrent"] == str(limit - 1)
    await until(lambda: g.statuses().count(499) == 1000, what="1,000 records with status 499")
    assert g.statuses().count(200) == 1 and g.statuses().count(429) == 1
    await until(lambda: sum(1 for x in upstream.seen if x.closed_by_peer) >= 1000, what="upstream closes")


# -- tokens -----------------------------------------------------------------------------------------

async def test_token_limits_with_streamed_usage_and_the_window_edge(start, upstream):
    g = await start(apikeys=[{"key": "sk-test", "allowed_models": ["m1"], "rate_limit": {"tpm": 100, "tpd": 1000}}],
                    models=[{"name": "m1", "rate_limit": {"tpm": 500}}])
    upstream.scripts["a"] = stream_script(ROLE, TXT("a"), STOP, USAGE(40, 30))
    upstream.scripts["b"] = stream_script(ROLE, TXT("b"), STOP, USAGE(20, 20))
    upstream.scripts["n"] = stream_script(ROLE, TXT("n"), TXT("o"), TXT("u"), STOP)  # no usage chunk

    a = await post_raw(g.url, chat("a"))  # the client did not ask for usage: charged all the same
    assert a.headers["x-ratelimit-remaining-tokens"] == "100" and b'"usage"' not in a.body
    b = await post_raw(g.url, chat("b", stream_options={"include_usage": True}))
    assert b.headers["x-ratelimit-remaining-tokens"] == "30" and b'"usage"' in b.body
    assert g.key_counters().tok_minute == 110 and g.hook.usage_of_model("m1").tok_minute == 110

    refused = await post_raw(g.url, chat("a"))
    err = error_of(refused)
    assert refused.status == 429 and err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
    assert "tokens per minute (tpm): limit 100, used 110" in err["message"]
    left = 60 - (g.clock() - T0) % 60
    assert int(refused.headers["Retry-After"]) in (int(left), int(left) + 1)
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert refused.headers["x-ratelimit-reset-tokens"] == refused.headers["Retry-After"] + "s"

    g.clock.jump(60)  # the next minute window: tpm is full again, tpd still counts the 110
    n = await post_raw(g.url, chat("n"))
    assert n.status == 200 and n.headers["x-ratelimit-remaining-tokens"] == "100"
    assert n.headers["x-ratelimit-reset-tokens"] == "59s"
    await until(lambda: g.key_counters().in_flight == 0, what="n finished")
    estimate = g.key_counters().tok_minute
    assert estimate >= 3  # a stream without usage is charged the gateway's own count (3 content chunks or more)
    assert g.key_counters().tok_day == 110 + estimate
    after = await post_raw(g.url, chat("a"))
    assert after.headers["x-ratelimit-remaining-tokens"] == str(100 - estimate)


# -- live configuration -------------------------------------------------------------------------------

async def test_limits_change_live_and_deletion_drops_counts(start, upstream):
    g = await start(apikeys=[{"key": "sk-test", "allowed_models": ["m1"], "rate_limit": {"rpm": 2}}])
    upstream.scripts["hi"] = stream_script(ROLE, TXT("ok"), STOP, USAGE(1, 1))
    store = g.gateway.store
    assert [(await post_raw(g.url, chat())).status for _ in range(3)] == [200, 200, 429]

    rid = g.key_id()
    await store.put("apikeys", rid, {"key": "sk-test", "allowed_models": ["m1"], "rate_limit": {"rpm": 3}})
    r = await post_raw(g.url, chat())  # the new limit applies at once; the 2 already used still count
    assert (r.status, r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"]) \
        == (200, "3", "0")
    assert (await post_raw(g.url, chat())).status == 429

    await store.delete("apikeys", rid)
    assert g.hook.usage_of_key(rid) is None
    assert (await post_raw(g.url, chat())).status == 401
    await store.put("apikeys", "key-2", {"key": "sk-test", "allowed_models": ["m1"], "rate_limit": {"rpm": 3}})
    r = await post_raw(g.url, chat())
    assert (r.status, r.headers["x-ratelimit-remaining-requests"]) == (200, "2")
