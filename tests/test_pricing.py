"""Cost: a deployment's own ``pricing`` or genai-prices' table, checked against the table's own
calculator; unknown → none; and end to end, known tokens → a known ``aisix_cost_usd_total`` in a
real Prometheus, on the span and in the access log."""
from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price
from genai_prices.types import ModelPrice

from aisix.config.resources import Model
from aisix.telemetry.pricing import Prices, from_table
from tests.harness import (
    ROLE,
    STOP,
    TXT,
    GatewayMetrics,
    GatewayProcess,
    ev,
    gateway_config,
    post_raw,
)

CHAT = "/v1/chat/completions"


def _ns(dt: datetime) -> int:
    return int(dt.timestamp() * 1e9)


NOON = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
NIGHT = datetime(2026, 6, 1, 20, 0, tzinfo=UTC)


@pytest.mark.parametrize("model, table_provider, when, prompt, cached, written, completion", [
    ("openai/gpt-4o-mini", "openai", NOON, 12_000, 2_000, 0, 700),
    ("anthropic/claude-sonnet-4-5", "anthropic", NOON, 9_000, 3_000, 1_000, 2_000),
    ("anthropic/claude-sonnet-4-5", "anthropic", NOON, 250_000, 0, 0, 1_000),  # past its 200k tier
    ("gemini/gemini-2.5-pro", "google", NOON, 300_000, 10_000, 0, 5_000),  # past its 200k tier
    ("gemini/gemini-2.5-flash", "google", NOON, 1_000, 0, 0, 40_000),
    ("deepseek/deepseek-chat", "deepseek", NOON, 5_000, 1_000, 0, 900),
    ("deepseek/deepseek-chat", "deepseek", NIGHT, 5_000, 1_000, 0, 900),  # off-peak hours
])
def test_table_prices_equal_the_tables_own_calculator(model, table_provider, when, prompt, cached, written,
                                                      completion):
    target = Model(name="x", model=model)
    price = Prices().price(target, _ns(when))
    assert price is not None
    ours = price.cost(prompt, completion, cached, written)
    theirs = calc_price(Usage(input_tokens=prompt, cache_read_tokens=cached, cache_write_tokens=written,
                              output_tokens=completion), target.model_id, provider_id=table_provider,
                        genai_request_timestamp=when).total_price
    assert theirs > 0 and ours == pytest.approx(float(theirs), rel=1e-12)


def test_deepseek_off_peak_is_cheaper():
    target = Model(name="x", model="deepseek/deepseek-chat")
    prices = Prices()
    assert prices.price(target, _ns(NIGHT)).cost(1000, 1000) < prices.price(target, _ns(NOON)).cost(1000, 1000)


def test_unknown_prices_are_none_never_a_guess():
    prices = Prices()
    for target in (Model(name="x", model="openai/up-1", provider_config={"api_base": "http://127.0.0.1:9/v1"}),
                   Model(name="x", model="openai/gpt-4o-mini", provider_config={"api_base": "http://127.0.0.1:9/v1"}),
                   Model(name="x", model="openai/no-such-model-xyz"),
                   Model(name="x", model="mock/mock-1")):
        assert prices.price(target, _ns(NOON)) is None, target.model
    assert Prices(use_table=False).price(Model(name="x", model="openai/gpt-4o-mini"), _ns(NOON)) is None
    reasoning_apart = ModelPrice(input_mtok=Decimal(1), output_mtok=Decimal(2), output_reasoning_mtok=Decimal(5))
    assert from_table(reasoning_apart) is None


def test_own_pricing_wins_and_a_deployments_wins_over_its_models():
    m = Model.model_validate({"name": "x", "pricing": {"input_per_million": 2, "output_per_million": 10},
                              "deployments": [
                                  {"id": "a", "model": "openai/gpt-4o-mini"},
                                  {"id": "b", "model": "openai/gpt-4o-mini",
                                   "pricing": {"input_per_million": 1, "output_per_million": 1,
                                               "cached_input_per_million": 0.5}}]})
    a, b = m.targets
    prices = Prices()
    assert prices.price(a, _ns(NOON)).cost(1_000_000, 1_000_000, 500_000) == 12  # cached at the input rate
    assert prices.price(b, _ns(NOON)).cost(1_000_000, 1_000_000, 500_000) == 0.5 + 0.25 + 1


def test_pricing_is_validated():
    from pydantic import ValidationError
    for bad in ({"input_per_million": -1, "output_per_million": 1}, {"input_per_million": 1},
                {"input_per_million": float("nan"), "output_per_million": 1}):
        with pytest.raises(ValidationError):
            Model.model_validate({"name": "x", "model": "openai/gpt-4o", "pricing": bad})


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
