"""Issue 4's "done when": the official openai client streams from all five provider kinds
(openai, deepseek, anthropic, gemini, mock) through one gateway, and Prometheus shows exactly the
tokens each upstream reported (checked against the usage the client received and, for the
emulators, the usage they sent)."""
from __future__ import annotations

import openai

from tests.support.emulators.anthropic import AnthropicEmulator
from tests.support.emulators.gemini import GeminiEmulator
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
)


def test_openai_client_streams_from_five_provider_kinds_with_exact_tokens(tmp_path, prometheus):
    up = ScriptedUpstream().start()
    up.script("default", writes=[(0, ev(ROLE)), (0.01, ev(TXT("Hel"))), (0.01, ev(TXT("lo"))), (0.01, ev(STOP)),
                                 (0, ev(USAGE(13, 2))), (0, b"data: [DONE]\n\n")])
    anth, gem = AnthropicEmulator().start(), GeminiEmulator().start()
    try:
        anth.reply(text=["Bon", "jour"], usage={"input_tokens": 21, "output_tokens": 4})
        gem.reply(text=["Hal", "lo"], usage={"promptTokenCount": 17, "candidatesTokenCount": 3, "totalTokenCount": 20})
        models = [
            {"name": "p-openai", "model": "openai/up-1", "provider_config": {"api_key": "k", "api_base": up.base_url}},
            {"name": "p-deepseek", "model": "deepseek/deepseek-chat",
             "provider_config": {"api_key": "k", "api_base": up.base_url}},
            {"name": "p-anthropic", "model": "anthropic/claude-x",
             "provider_config": {"api_key": anth.api_key, "api_base": anth.base_url}},
            {"name": "p-gemini", "model": "gemini/gemini-x",
             "provider_config": {"api_key": gem.api_key, "api_base": gem.base_url}},
            {"name": "p-mock", "model": "mock/mock-1", "provider_config": {"ttft_ms": 5, "tpot_ms": 1, "tokens": 6}},
        ]
        names = [m["name"] for m in models]
        cfg = gateway_config(up.base_url, prom_otlp=prometheus.otlp_url, models=models,
                             apikeys=[{"key": "sk-test", "allowed_models": names}])
        with GatewayProcess(tmp_path, cfg) as gw:
            client = openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0)
            seen = {}
            for name in names:
                chunks = list(client.chat.completions.create(
                    model=name, stream=True, stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": "hi there, how are you today"}]))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                assert text, name
                usage = chunks[-1].usage
                seen[name] = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
            assert seen["p-openai"] == seen["p-deepseek"] == (13, 2, 15)
            assert seen["p-anthropic"] == (21, 4, 25)
            assert seen["p-gemini"] == (17, 3, 20)
            assert seen["p-mock"][1] == 6
            m = GatewayMetrics(prometheus, gw.instance)
            for name, (p, c, t) in seen.items():
                m.wait_value("aisix_token_count_total", p, model=name, type="prompt")
                m.wait_value("aisix_token_count_total", c, model=name, type="completion")
                m.wait_value("aisix_token_count_total", t, model=name, type="total")
                m.wait_value("aisix_llm_first_token_latency_milliseconds_count", 1, model=name)
        assert anth.sent_usage[-1]["input_tokens"] == 21 and gem.sent_usage[-1]["promptTokenCount"] == 17
        assert up.seen[0].headers["Authorization"] == "Bearer k"
    finally:
        up.stop()
        anth.stop()
        gem.stop()
