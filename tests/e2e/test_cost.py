"""Cost end to end: known tokens → a known ``aisix_cost_usd_total`` in a real Prometheus, on
the span and in the access log. The price lookups: :mod:`tests.unit.test_pricing`."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from aisix.config.resources import Model
from tests.support.harness import (
    ROLE,
    STOP,
    TXT,
    GatewayMetrics,
    GatewayProcess,
    ev,
    gateway_config,
    post_raw,
)
from tests.unit.test_pricing import CHAT

# -- end to end ------------------------------------------------------------------------------------
PRICING = {"input_per_million": 2.0, "output_per_million": 10.0, "cached_input_per_million": 0.5}


def _whole(prompt: int, cached: int, completion: int) -> bytes:
    return json.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "up-1",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion,
                                 "prompt_tokens_details": {"cached_tokens": cached}}}).encode()


async def test_known_tokens_give_a_known_cost_in_prometheus_on_the_span_and_in_the_log(
        prometheus, tmp_path, upstream, sink):
    upstream.script("cost-whole", headers={"Content-Type": "application/json"}, body=_whole(1000, 200, 500))
    usage = ('{"id":"c1","object":"chat.completion.chunk","created":1,"model":"up-1","choices":[],'
             '"usage":{"prompt_tokens":3000,"completion_tokens":100,"total_tokens":3100}}')
    upstream.script("cost-stream", writes=[(0, ev(ROLE) + ev(TXT("a")) + ev(STOP) + ev(usage) + b"data: [DONE]\n\n")])
    upstream.script("cost-none", writes=[(0, ev(ROLE) + ev(TXT("a")) + ev(STOP) + b"data: [DONE]\n\n")])
    pc = {"api_key": "sk-up", "api_base": upstream.base_url}
    cfg = gateway_config(upstream.base_url, prom_otlp=prometheus.otlp_url, traces=sink.endpoint,
                         models=[{"name": "priced", "model": "openai/up-1", "provider_config": pc, "pricing": PRICING},
                                 {"name": "unpriced", "model": "openai/up-1", "provider_config": pc}],
                         apikeys=[{"key": "sk-test", "allowed_models": ["priced", "unpriced"]}])
    cfg["observability"]["access_log"] = {"path": str(tmp_path / "access.log")}

    def chat(model, key, stream=False):
        return {"model": model, "stream": stream, "messages": [{"role": "user", "content": key}]}

    with GatewayProcess(tmp_path / "gw", cfg) as gw:
        for body in (chat("priced", "cost-whole"), chat("priced", "cost-whole"), chat("priced", "cost-stream", True),
                     chat("priced", "cost-none", True), chat("unpriced", "cost-whole")):
            assert (await post_raw(gw.url + CHAT, body)).status == 200
    whole = (800 * 2.0 + 200 * 0.5 + 500 * 10.0) / 1e6  # 0.0067
    stream = (3000 * 2.0 + 100 * 10.0) / 1e6  # 0.007
    m = GatewayMetrics(prometheus, gw.instance)
    m.wait_value("aisix_token_count_total", 2 * 1500 + 3100 + 1500, type="total")
    got = m.value("aisix_cost_usd_total", model="priced")
    assert got == pytest.approx(2 * whole + stream, rel=1e-9)
    assert prometheus.query(m.sel("aisix_cost_usd_total", model="unpriced")) == []  # unknown price: no series
    log = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    costs = [(d["model"], d["cost_usd"]) for d in log if d["route"] == CHAT]
    assert costs == [("priced", pytest.approx(whole)), ("priced", pytest.approx(whole)),
                     ("priced", pytest.approx(stream)), ("priced", None), ("unpriced", None)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        spans = [s for s in sink.spans if s["kind"] == 2 and s["attributes"].get("aisix.model") in ("priced", "unpriced")]
        if len(spans) >= 5:
            break
        await asyncio.sleep(0.1)
    span_costs = sorted(s["attributes"].get("aisix.cost_usd", -1) for s in spans)
    assert span_costs == pytest.approx(sorted([whole, whole, stream, -1, -1]))


def test_only_models_the_table_may_price_are_looked_up():
    from aisix.telemetry.pricing import in_table_scope

    def on(base):
        return Model(name="x", model="openai/gpt-4o-mini", provider_config={"api_base": base} if base else {})
    assert in_table_scope(on(None)) and in_table_scope(on("https://api.together.xyz/v1"))
    for local in ("http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://10.1.2.3/v1", "http://[::1]:9/v1",
                  "http://192.168.1.5/v1"):
        assert not in_table_scope(on(local)), local
    assert not in_table_scope(Model(name="x", model="mock/mock-1"))
    assert not in_table_scope(Model(name="x", model="openai/gpt-4o", pricing={"input_per_million": 1,
                                                                               "output_per_million": 1}))
