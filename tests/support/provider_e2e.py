"""End-to-end set-up for the translated providers: a real gateway process (``python -m aisix
serve``) whose models point at a provider emulator, the official ``openai`` client, and metric
deltas read from the session's real Prometheus.

Models: ``m`` (the emulator), ``m-badkey`` (a wrong upstream key), ``m-down`` (a closed port:
502), ``m-slow`` (``read_timeout_ms: 500``: 504 when the emulator holds its answer).
"""
from __future__ import annotations

import openai
import pytest

from tests.support.harness import GatewayMetrics, GatewayProcess, gateway_config
from tests.support.services import HOST, free_port

CHAT = "/v1/chat/completions"
TOK = "aisix_token_count_total"
PROMPT = (TOK, {"model": "m", "type": "prompt"})
COMPLETION = (TOK, {"model": "m", "type": "completion"})
TOTAL = (TOK, {"model": "m", "type": "total"})
FIRST = ("aisix_llm_first_token_latency_milliseconds_count", {"model": "m"})
LLM = ("aisix_llm_latency_milliseconds_count", {"model": "m"})


class Delta:
    """Metric values before a request, to assert the change it caused."""

    def __init__(self, metrics: GatewayMetrics, series: list[tuple[str, dict]], endpoint: str = CHAT,
                 status: str = "200"):
        self.m = metrics
        self.req = ("aisix_request_count_total", {"endpoint": endpoint, "status_code": status})
        self.before = {self._key(s): metrics.value(s[0], **s[1]) for s in [*series, self.req]}

    @staticmethod
    def _key(s):
        return (s[0], tuple(sorted(s[1].items())))

    def expect(self, series: tuple[str, dict], n: float) -> None:
        self.m.wait_value(series[0], self.before[self._key(series)] + n, **series[1])

    def expect_status(self, n: float) -> None:
        self.expect(self.req, n)


class E2E:
    """The gateway for one provider's emulator, as a context manager."""

    def __init__(self, tmp, provider: str, model_id: str, emu, prometheus):
        self.upstream_key = emu.api_key
        ref = f"{provider}/{model_id}"
        base = {"api_key": emu.api_key, "api_base": emu.base_url}
        models = [{"name": "m", "model": ref, "provider_config": base},
                  {"name": "m-badkey", "model": ref, "provider_config": {**base, "api_key": "wrong"}},
                  {"name": "m-down", "model": ref,
                   "provider_config": {**base, "api_base": f"http://{HOST}:{free_port()}{emu.prefix}"}},
                  {"name": "m-slow", "model": ref, "provider_config": {**base, "read_timeout_ms": 500}}]
        keys = [{"key": "sk-test", "allowed_models": [m["name"] for m in models]}]
        cfg = gateway_config(emu.base_url, prom_otlp=prometheus.otlp_url, models=models, apikeys=keys)
        self.proc = GatewayProcess(tmp, cfg)
        self.metrics = GatewayMetrics(prometheus, self.proc.instance)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.proc.base_url, api_key="sk-test", max_retries=0, timeout=30)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.proc.base_url, api_key="sk-test", max_retries=0, timeout=30)

    def delta(self, status: str = "200", endpoint: str = CHAT) -> Delta:
        return Delta(self.metrics, [PROMPT, COMPLETION, TOTAL, FIRST, LLM], endpoint, status)

    def __enter__(self) -> "E2E":
        self.proc.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.proc.__exit__(*exc)


def assert_unreachable_502_and_timeout_504(gw: "E2E", emu, messages: list, stream: bool) -> None:
    """``m-down`` (a closed port) answers 502 ``upstream_unreachable``; ``m-slow`` (500 ms read
    timeout, the emulator holding its answer 2 s) answers 504 ``timeout_error``."""
    with pytest.raises(openai.InternalServerError) as e:
        gw.client().chat.completions.create(model="m-down", messages=messages, stream=stream)
    assert e.value.status_code == 502 and e.value.body["code"] == "upstream_unreachable"
    emu.reply(head_delay=2.0)
    with pytest.raises(openai.APIStatusError) as e:
        gw.client().chat.completions.create(model="m-slow", messages=messages, stream=stream)
    assert e.value.status_code == 504 and e.value.body["type"] == "timeout_error"


def mid_stream_failure(gw: "E2E", emu, messages: list, mode: str, usage: dict) -> openai.APIError:
    """The upstream streams "one", "two", then fails (``mode``: ``error_after`` sends an error
    event, ``drop_after`` drops the connection); the client got exactly "onetwo" and then an
    error, the request is measured once as 502 with the prompt tokens the stream carried so far
    (8) and one first token. Returns the client's error for the provider-specific checks."""
    emu.reply(text=["one", "two", "three"], usage=usage, **{mode: 2})
    d = gw.delta(status="502")
    got = []
    with pytest.raises(openai.APIError) as e:
        for c in gw.client().chat.completions.create(model="m", messages=messages, stream=True):
            got.append(c.choices[0].delta.content or "")
    assert "".join(got) == "onetwo"
    d.expect_status(1)
    d.expect(PROMPT, 8)
    d.expect(FIRST, 1)
    return e.value


def module_fixtures(emulator, provider: str, upstream_model: str):
    """The ``emu`` (the provider's emulator) and ``gw`` (:class:`E2E` on it, with the session's
    Prometheus) fixtures of a provider's e2e module, one of each per module:
    ``emu, gw = module_fixtures(AnthropicEmulator, "anthropic", "claude-sonnet-4-5")``."""
    @pytest.fixture(scope="module")
    def emu():
        with emulator() as e:
            yield e

    @pytest.fixture(scope="module")
    def gw(tmp_path_factory, emu, prometheus):
        with E2E(tmp_path_factory.mktemp(f"gw-{provider}"), provider, upstream_model, emu, prometheus) as g:
            yield g
    return emu, gw
