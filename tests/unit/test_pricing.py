"""aisix.telemetry.pricing: a deployment's own ``pricing`` or genai-prices' table, checked
against the table's own calculator; unknown → none, never a guess. End to end:
:mod:`tests.e2e.test_cost`."""
from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price
from genai_prices.types import ModelPrice

from aisix.config.resources import Model
from aisix.telemetry.pricing import Prices, from_table

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
