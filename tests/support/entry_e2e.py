"""End-to-end set-up for the entry routes (``/v1/messages``, ``/v1/responses``, ``/v1/completions``):
one real gateway process whose models point at the OpenAI and Anthropic emulators and the
built-in mock, and the metric series the tests read from the session's real Prometheus.

Models: ``gpt`` (``openai/gpt-4o`` → the OpenAI emulator), ``ds`` (``deepseek/deepseek-chat`` →
the same emulator), ``claude`` (``anthropic/claude-sonnet-4-5`` → the Anthropic emulator),
``mocked`` (``mock/mock-1``, no pacing, ``mock_tokens`` tokens), and with a Gemini emulator
``gem`` (``gemini/gemini-2.5-flash``). ``claude`` and ``gpt`` have their own ``pricing``
(:data:`CLAUDE_PRICING`, :data:`GPT_PRICING`). Keys: ``sk-test`` (every model), ``sk-other``
(none), ``sk-limited`` (every model, ``rate_limit: {rpm: 2, tpm: 1000}``).
"""
from __future__ import annotations

import contextlib

from tests.support.emulators.anthropic import AnthropicEmulator
from tests.support.emulators.gemini import GeminiEmulator
from tests.support.emulators.openai import OpenAIEmulator
from tests.support.harness import GatewayMetrics, GatewayProcess, gateway_config

TOK = "aisix_token_count_total"
#: USD per 1 M tokens: fresh input, output, cache reads, cache writes (each rate apart, so a token
#: counted under the wrong kind shows in the cost).
CLAUDE_PRICING = {"input_per_million": 3.0, "output_per_million": 15.0, "cached_input_per_million": 0.3,
                  "cache_write_per_million": 3.75}
GPT_PRICING = {"input_per_million": 2.5, "output_per_million": 10.0, "cached_input_per_million": 1.25}


def series(model: str) -> dict:
    """The per-model series a test of one request reads: tokens by type, first-token samples."""
    return {"prompt": (TOK, {"model": model, "type": "prompt"}),
            "completion": (TOK, {"model": model, "type": "completion"}),
            "total": (TOK, {"model": model, "type": "total"}),
            "first": ("aisix_llm_first_token_latency_milliseconds_count", {"model": model}),
            "first_sum": ("aisix_llm_first_token_latency_milliseconds_sum", {"model": model})}


@contextlib.contextmanager
def entry_gateway(tmp, prometheus, o: OpenAIEmulator, a: AnthropicEmulator, mock_tokens: int = 4,
                  traces: str | None = None, g: GeminiEmulator | None = None):
    """The gateway (a :class:`GatewayProcess` with ``.metrics``), stopped on exit."""
    up = {"api_key": o.api_key, "api_base": o.base_url}
    models = [{"name": "gpt", "model": "openai/gpt-4o", "provider_config": up, "pricing": GPT_PRICING},
              {"name": "ds", "model": "deepseek/deepseek-chat", "provider_config": up},
              {"name": "claude", "model": "anthropic/claude-sonnet-4-5",
               "provider_config": {"api_key": a.api_key, "api_base": a.base_url}, "pricing": CLAUDE_PRICING},
              {"name": "mocked", "model": "mock/mock-1",
               "provider_config": {"ttft_ms": 0, "tpot_ms": 0, "tokens": mock_tokens}}]
    if g is not None:
        models.append({"name": "gem", "model": "gemini/gemini-2.5-flash",
                       "provider_config": {"api_key": g.api_key, "api_base": g.base_url}})
    every = [m["name"] for m in models]
    keys = [{"key": "sk-test", "allowed_models": every}, {"key": "sk-other", "allowed_models": []},
            {"key": "sk-limited", "allowed_models": every, "rate_limit": {"rpm": 2, "tpm": 1000}}]
    cfg = gateway_config(o.base_url, prom_otlp=prometheus.otlp_url, traces=traces, models=models, apikeys=keys)
    with GatewayProcess(tmp, cfg) as proc:
        proc.metrics = GatewayMetrics(prometheus, proc.instance)
        yield proc


@contextlib.contextmanager
def emulators():
    """``(OpenAIEmulator, AnthropicEmulator)``, started and stopped."""
    with OpenAIEmulator() as o, AnthropicEmulator() as a:
        yield o, a
