"""``POST /v1/messages`` and ``/v1/messages/count_tokens`` (the Anthropic Messages API) end to
end: the official ``anthropic`` SDK through a real gateway process, passed through to an
Anthropic-emulated upstream and translated to the others; exact tokens in a real Prometheus.
The sans-IO translators: :mod:`tests.unit.test_messages_translation`."""
from __future__ import annotations

import time

import anthropic
import openai
import orjson
import pytest

from tests.support.emulators.gemini import GeminiEmulator
from tests.support.entry_e2e import CLAUDE_PRICING, GPT_PRICING, emulators, entry_gateway, series
from tests.support.provider_e2e import Delta
from tests.unit.test_messages_stream_interleaving import accumulate, well_formed
from tests.unit.test_messages_translation import MESSAGES


# -- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emus():
    with emulators() as (o, a):
        yield a, o


@pytest.fixture(scope="module")
def gem():
    with GeminiEmulator() as g:
        yield g


@pytest.fixture(scope="module")
def gw(tmp_path_factory, emus, gem, prometheus, sink):
    a, o = emus
    with entry_gateway(tmp_path_factory.mktemp("gw-messages"), prometheus, o, a, g=gem, traces=sink.endpoint) as proc:
        yield proc


def client(gw, key: str = "sk-test", **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=30, **kw)


def delta(gw, model: str, status: str = "200", endpoint: str = MESSAGES) -> Delta:
    return Delta(gw.metrics, list(series(model).values()), endpoint, status)


TOOLS = [{"name": "get_weather", "description": "Weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def test_passthrough_whole_bytes_both_ways(gw, emus):
    a, _ = emus
    a.reply(thinking=["Let me think."], text=["It is sunny."], tool_calls=[("get_weather", {"city": "Paris"})],
            usage={"input_tokens": 21, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 7,
                   "output_tokens": 13})
    d = delta(gw, "claude")
    raw = client(gw).messages.with_raw_response.create(
        model="claude", max_tokens=512, tools=TOOLS, thinking={"type": "enabled", "budget_tokens": 1024},
        system=[{"type": "text", "text": "Brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"})
    sent = raw.http_response.request.content
    up = a.last
    assert up.path == "/v1/messages" and up.raw == sent.replace(b'"model":"claude"', b'"model":"claude-sonnet-4-5"')
    assert up.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert up.headers["anthropic-version"] == raw.http_response.request.headers["anthropic-version"]  # the client's
    assert up.headers["x-api-key"] == a.api_key
    assert raw.http_response.content == bytes(a.sent[-1])  # the client's bytes are the upstream's
    assert raw.http_response.headers["request-id"].startswith("req_")
    msg = raw.parse()
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]
    assert msg.content[2].input == {"city": "Paris"} and msg.stop_reason == "tool_use"
    d.expect(series("claude")["prompt"], 33)  # input + cache_creation_input + cache_read_input
    d.expect(series("claude")["completion"], 13)
    d.expect(series("claude")["total"], 46)
    d.expect_status(1)


def test_passthrough_stream_bytes_and_first_token(gw, emus):
    a, _ = emus
    a.reply(thinking=["Hmm", "m."], text=["Sun", "ny."], tool_calls=[("get_weather", {"city": "Oslo"})],
            usage={"input_tokens": 17, "cache_read_input_tokens": 3, "output_tokens": 11}, chunk_delay=0.2)
    d = delta(gw, "claude")
    with client(gw).messages.with_streaming_response.create(
            model="claude", max_tokens=256, stream=True, tools=TOOLS,
            thinking={"type": "enabled", "budget_tokens": 1024},
            messages=[{"role": "user", "content": "Weather in Oslo?"}]) as resp:
        body = resp.read()
    assert resp.http_response.headers["content-type"].startswith("text/event-stream")
    assert body == bytes(a.sent[-1])
    d.expect(series("claude")["prompt"], 20)
    d.expect(series("claude")["completion"], 11)
    d.expect(series("claude")["first"], 1)
    # message_start and the first block start go out at once; the first delta 2 pauses (0.4 s) later:
    # the first token is the delta, so the sample is at least that (a lower bound holds on any machine)
    assert gw.metrics.value(*series("claude")["first_sum"][:1], **series("claude")["first_sum"][1]) \
        - d.before[d._key(series("claude")["first_sum"])] >= 400


def test_passthrough_stream_with_the_sdk_helper(gw, emus):
    a, _ = emus
    a.reply(text=["Bon", "jour"], usage={"input_tokens": 9, "output_tokens": 2})
    with client(gw).messages.stream(model="claude", max_tokens=64,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Bonjour" and final.usage.input_tokens == 9 and final.usage.output_tokens == 2
    assert a.last.json["stream"] is True and a.last.json["model"] == "claude-sonnet-4-5"


def test_passthrough_upstream_errors_keep_anthropic_envelope(gw, emus):
    a, _ = emus
    a.reply(error=(429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
            headers={"retry-after": "17"})
    with pytest.raises(anthropic.RateLimitError) as e:
        client(gw).messages.create(model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body == {"type": "error", "error": {"type": "rate_limit_error", "message":
                                                       "Number of request tokens has exceeded your per-minute rate limit"}}
    assert e.value.response.headers["retry-after"] == "17"
    a.reply(error=(529, "overloaded_error", "Overloaded"))
    with pytest.raises(anthropic.APIStatusError) as e:
        client(gw).messages.create(model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 529 and e.value.body["error"]["type"] == "overloaded_error"


def test_passthrough_mid_stream_error_is_an_anthropic_error_event(gw, emus):
    a, _ = emus
    a.reply(text=["a", "b", "c"], error_after=1)
    d = delta(gw, "claude", status="502")
    with pytest.raises(anthropic.APIStatusError) as e, client(gw).messages.stream(
            model="claude", max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as stream:
        for _ in stream:
            pass
    assert e.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    d.expect_status(1)


def test_gateway_errors_in_anthropic_envelope(gw):
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(gw, key="sk-nope").messages.create(model="claude", max_tokens=5,
                                                  messages=[{"role": "user", "content": "x"}])
    assert e.value.body == {"type": "error", "error": {"type": "authentication_error", "message": "Invalid API key"}}
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        client(gw, key="sk-other").messages.create(model="claude", max_tokens=5,
                                                   messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "permission_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client(gw).messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                       "message": "The model `nope` does not exist."}}
    with pytest.raises(anthropic.BadRequestError) as e:  # translated: max_tokens is required
        client(gw).messages.create(model="gpt", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and "max_tokens" in e.value.body["error"]["message"]


def test_bearer_key_works_too(gw, emus):
    a, _ = emus
    a.reply(text=["ok"])
    c = anthropic.Anthropic(base_url=gw.url, auth_token="sk-test", max_retries=0, timeout=30)  # Claude Code's
    msg = c.messages.create(model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert msg.content[0].text == "ok"
    assert "authorization" not in a.last.headers and a.last.headers["x-api-key"] == a.api_key


def test_translated_whole_text_thinking_and_tool_call(gw, emus):
    _, o = emus
    o.reply(thinking=["Need the weather."], text=["Checking."], tool_calls=[("get_weather", {"city": "Rome"})],
            usage={"prompt_tokens": 31, "completion_tokens": 14, "prompt_tokens_details": {"cached_tokens": 6}})
    d = delta(gw, "gpt")
    msg = client(gw).messages.create(
        model="gpt", max_tokens=300, tools=TOOLS, tool_choice={"type": "auto"}, system="Be brief.",
        messages=[{"role": "user", "content": "Weather in Rome?"}])
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]
    assert msg.content[0].thinking == "Need the weather." and msg.content[1].text == "Checking."
    assert msg.content[2].name == "get_weather" and msg.content[2].input == {"city": "Rome"}
    assert msg.stop_reason == "tool_use" and msg.model == o.model
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (25, 6, 14)
    sent = o.last.json
    assert o.last.path == "/v1/chat/completions" and sent["model"] == "gpt-4o"
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Weather in Rome?"}]
    assert sent["max_completion_tokens"] == 300 and sent["tool_choice"] == "auto"
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    d.expect(series("gpt")["prompt"], 31)
    d.expect(series("gpt")["completion"], 14)
    d.expect(series("gpt")["total"], 45)


def test_translated_stream_tool_round_trip(gw, emus):
    _, o = emus
    o.reply(thinking=["Hmm."], text=["Let me", " look."], tool_calls=[("get_weather", {"city": "Lima"})],
            usage={"prompt_tokens": 40, "completion_tokens": 9}, chunk_delay=0.2)
    d = delta(gw, "gpt")
    with client(gw).messages.stream(model="gpt", max_tokens=100, tools=TOOLS,
                                    messages=[{"role": "user", "content": "Weather in Lima?"}]) as stream:
        names = [ev.type for ev in stream]
        final = stream.get_final_message()
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[1].text == "Let me look." and final.content[2].input == {"city": "Lima"}
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (40, 9)
    assert o.last.json["stream"] is True and o.last.json["stream_options"] == {"include_usage": True}
    d.expect(series("gpt")["prompt"], 40)
    d.expect(series("gpt")["completion"], 9)
    d.expect(series("gpt")["first"], 1)
    assert gw.metrics.value(*series("gpt")["first_sum"][:1], **series("gpt")["first_sum"][1]) \
        - d.before[d._key(series("gpt")["first_sum"])] >= 400  # the role chunk (message_start) is not the token

    call = final.content[2]
    o.reply(text=["Lima: 18 C."], usage={"prompt_tokens": 60, "completion_tokens": 5})
    msg = client(gw).messages.create(model="gpt", max_tokens=100, tools=TOOLS, messages=[
        {"role": "user", "content": "Weather in Lima?"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C"}]}])
    assert msg.content[0].text == "Lima: 18 C." and msg.stop_reason == "end_turn"
    assert o.last.json["messages"][1:] == [
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Lima"}'}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]


def test_translated_upstream_error_and_broken_stream(gw, emus):
    _, o = emus
    o.reply(error=(429, "rate_limit_error", "Rate limit reached"), headers={"retry-after": "2"})
    with pytest.raises(anthropic.RateLimitError) as e:
        client(gw).messages.create(model="gpt", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body == {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached"}}
    o.reply(text=["a", "b", "c"], drop_after=3)
    with pytest.raises(anthropic.APIStatusError) as e, client(gw).messages.stream(
            model="gpt", max_tokens=5, messages=[{"role": "user", "content": "x"}]) as stream:
        for _ in stream:
            pass
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "api_error"


@pytest.mark.parametrize("stream", [False, True])
def test_translated_to_gemini(gw, gem, stream):
    """Through two translators (Messages → chat → Gemini and back): text, thinking and a tool call."""
    gem.reply(thinking=["Weather needed."], text=["Checking."], tool_calls=[("get_weather", {"city": "Kyiv"})],
              usage={"promptTokenCount": 19, "candidatesTokenCount": 7, "thoughtsTokenCount": 3})
    d = delta(gw, "gem")
    kw = {"model": "gem", "max_tokens": 100, "tools": TOOLS, "messages": [{"role": "user", "content": "Kyiv?"}]}
    if stream:
        with client(gw).messages.stream(**kw) as s:
            msg = s.get_final_message()
    else:
        msg = client(gw).messages.create(**kw)
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]
    assert msg.content[1].text == "Checking." and msg.content[2].input == {"city": "Kyiv"}
    assert msg.stop_reason == "tool_use" and (msg.usage.input_tokens, msg.usage.output_tokens) == (19, 10)
    assert gem.requests[-1].json["generationConfig"]["maxOutputTokens"] == 100
    d.expect(series("gem")["prompt"], 19)
    d.expect(series("gem")["completion"], 10)  # candidates + thoughts
    d.expect(series("gem")["first"], 1 if stream else 0)


def test_translated_to_mock(gw):
    msg = client(gw).messages.create(model="mocked", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == "Hello from the aisix" and msg.usage.output_tokens == 4


def test_count_tokens_passthrough_and_estimate(gw, emus):
    a, _ = emus
    n = client(gw).messages.count_tokens(model="claude", messages=[{"role": "user", "content": "hello there"}])
    assert a.last.path == "/v1/messages/count_tokens" and a.last.json["model"] == "claude-sonnet-4-5"
    assert n.input_tokens == len(a.last.raw) // 16  # the emulator's count of what it got
    raw = client(gw).messages.with_raw_response.count_tokens(
        model="gpt", messages=[{"role": "user", "content": "x" * 400}])
    assert raw.http_response.headers["x-aisix-token-count"] == "estimated"
    est = raw.parse()
    assert 100 <= est.input_tokens <= 120 and est.model_extra == {"estimated": True}


# -- the prompt cache: reads and writes apart, on the span and in the cost ------------------------------
COST = "aisix_cost_usd_total"
CACHED_USAGE = {"input_tokens": 21, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 7, "output_tokens": 13}


def usd(pricing: dict, fresh: int, read: int, written: int, output: int) -> float:
    """The cost the pricing says (USD), each kind of token at its own rate."""
    return (fresh * pricing["input_per_million"] + read * pricing["cached_input_per_million"]
            + written * pricing.get("cache_write_per_million", pricing["input_per_million"])
            + output * pricing["output_per_million"]) / 1e6


def expect_cost(gw, model: str, before: float, cost: float) -> None:
    """Poll the real Prometheus until the model's cost series grew by ``cost`` (float sums: 1e-12 relative)."""
    deadline = time.monotonic() + 15
    while (got := gw.metrics.value(COST, model=model) - before) != pytest.approx(cost, rel=1e-9, abs=1e-15):
        assert time.monotonic() < deadline, f"{COST}{{model={model}}} grew by {got}, expected {cost}"
        time.sleep(0.1)


def spans_of(sink, request_id: str) -> tuple[dict, dict]:
    """The request's SERVER span (its id is in ``x-aisix-request-id``) and its one CLIENT span."""
    trace, span = request_id.split("-")
    deadline = time.monotonic() + 10
    while True:
        server = [s for s in sink.spans if s["trace_id"] == trace and s["span_id"] == span]
        client = [s for s in sink.spans if s["trace_id"] == trace and s["parent_span_id"] == span]
        if server and client:
            return server[0], client[0]
        assert time.monotonic() < deadline, f"no spans for {request_id}"
        time.sleep(0.1)


def usage_attrs(span: dict) -> dict:
    return {k.removeprefix("gen_ai.usage."): v for k, v in span["attributes"].items() if k.startswith("gen_ai.usage.")}


@pytest.mark.parametrize("stream", [False, True])
def test_passthrough_cache_reads_and_writes_priced_apart(gw, emus, sink, stream):
    a, _ = emus
    a.reply(text=["Cached", " answer."], usage=CACHED_USAGE)
    d, cost_before = delta(gw, "claude"), gw.metrics.value(COST, model="claude")
    kw = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}],
          "system": [{"type": "text", "text": "Long.", "cache_control": {"type": "ephemeral"}}]}
    if stream:
        with client(gw).messages.with_streaming_response.create(stream=True, **kw) as resp:
            resp.read()
            rid = resp.http_response.headers["x-aisix-request-id"]
    else:
        rid = client(gw).messages.with_raw_response.create(**kw).http_response.headers["x-aisix-request-id"]
    d.expect(series("claude")["prompt"], 33)  # the seed series: every input token
    d.expect(series("claude")["completion"], 13)
    cost = usd(CLAUDE_PRICING, 21, 7, 5, 13)  # 0.0002841
    expect_cost(gw, "claude", cost_before, cost)
    server, upstream = spans_of(sink, rid)
    want = {"input_tokens": 33, "output_tokens": 13, "cache_read.input_tokens": 7, "cache_creation.input_tokens": 5}
    assert usage_attrs(server) == want and usage_attrs(upstream) == want
    assert server["attributes"]["aisix.cost_usd"] == pytest.approx(cost, rel=1e-12)


def test_chat_completions_to_anthropic_keep_the_cache_breakdown(gw, emus, sink):
    """/v1/chat/completions translated to Anthropic (providers/anthropic.py): the client sees the
    cache reads as cached_tokens, the record keeps the writes too."""
    a, _ = emus
    a.reply(text=["ok"], usage=CACHED_USAGE)
    d, cost_before = delta(gw, "claude", endpoint="/v1/chat/completions"), gw.metrics.value(COST, model="claude")
    c = openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0, timeout=30)
    raw = c.chat.completions.with_raw_response.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    usage = raw.parse().usage
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, usage.completion_tokens) == (33, 7, 13)
    d.expect(series("claude")["prompt"], 33)
    expect_cost(gw, "claude", cost_before, usd(CLAUDE_PRICING, 21, 7, 5, 13))
    server, _ = spans_of(sink, raw.headers["x-aisix-request-id"])
    assert usage_attrs(server) == {"input_tokens": 33, "output_tokens": 13, "cache_read.input_tokens": 7,
                                   "cache_creation.input_tokens": 5}


@pytest.mark.parametrize("stream", [False, True])
def test_translated_cache_reads_priced_apart(gw, emus, sink, stream):
    """/v1/messages to an OpenAI model: cached_tokens are Anthropic's cache_read_input_tokens for
    the client, cache reads on the span and in the cost (OpenAI reports no cache writes)."""
    _, o = emus
    o.reply(text=["Sure."], usage={"prompt_tokens": 31, "completion_tokens": 14, "prompt_tokens_details": {"cached_tokens": 6}})
    cost_before = gw.metrics.value(COST, model="gpt")
    kw = {"model": "gpt", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        with client(gw).messages.with_streaming_response.create(stream=True, **kw) as resp:
            msg = accumulate(resp.read())
            rid = resp.http_response.headers["x-aisix-request-id"]
    else:
        raw = client(gw).messages.with_raw_response.create(**kw)
        msg, rid = raw.parse(), raw.http_response.headers["x-aisix-request-id"]
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (25, 6, 14)
    expect_cost(gw, "gpt", cost_before, usd(GPT_PRICING, 25, 6, 0, 14))
    server, _ = spans_of(sink, rid)
    assert usage_attrs(server) == {"input_tokens": 31, "output_tokens": 14, "cache_read.input_tokens": 6}


# -- count_tokens under the key's rate limits ---------------------------------------------------------
def test_count_tokens_is_rate_limited_like_any_call(gw, emus):
    a, _ = emus
    if 60 - time.time() % 60 < 5:  # the three calls must fall in one clock minute (the rpm window)
        time.sleep(60 - time.time() % 60)
    c = client(gw, key="sk-limited")
    seen = []
    for model in ("claude", "gpt"):  # Anthropic's endpoint, then the estimate: both counted
        raw = c.messages.with_raw_response.count_tokens(model=model, messages=[{"role": "user", "content": "hi"}])
        seen.append({k: raw.http_response.headers[f"x-ratelimit-{k}"] for k in (
            "limit-requests", "remaining-requests", "limit-tokens", "remaining-tokens")})
    assert seen == [{"limit-requests": "2", "remaining-requests": "1", "limit-tokens": "1000", "remaining-tokens": "1000"},
                    {"limit-requests": "2", "remaining-requests": "0", "limit-tokens": "1000", "remaining-tokens": "1000"}]
    upstream_calls = len(a.requests)
    with pytest.raises(anthropic.RateLimitError) as e:
        c.messages.count_tokens(model="claude", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "rate_limit_error"
    assert "requests per minute (rpm): limit 2, used 2" in e.value.body["error"]["message"]
    h = e.value.response.headers
    assert h["x-ratelimit-remaining-requests"] == "0" and h["x-ratelimit-limit-requests"] == "2"
    assert 1 <= int(h["retry-after"]) <= 60
    assert len(a.requests) == upstream_calls  # refused before the upstream


# -- interleaved parallel tool calls from a chat upstream -------------------------------------------
WEATHER_AND_TIME = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"tz": "Europe/Paris"})]


def test_interleaved_tool_calls_reach_the_sdk_whole(gw, emus):
    _, o = emus
    o.reply(text=["Both", " at once."], tool_calls=WEATHER_AND_TIME, interleave=True)
    with client(gw).messages.with_streaming_response.create(
            model="gpt", max_tokens=100, stream=True, tools=TOOLS,
            messages=[{"role": "user", "content": "Weather and time in Paris?"}]) as resp:
        data = resp.read()
    chunks = [orjson.loads(line[6:]) for line in bytes(o.sent[-1]).split(b"\n\n") if line.startswith(b"data: {")]
    order = [(tc["index"], "name" in tc["function"]) for c in chunks if c["choices"]
             for tc in c["choices"][0]["delta"].get("tool_calls", ())]
    assert order.index((0, False)) > order.index((1, True))  # the upstream did interleave
    well_formed([orjson.loads(e.split(b"data: ", 1)[1]) for e in data.split(b"\n\n") if b"data: " in e])
    msg = accumulate(data)
    assert [(b.type, getattr(b, "input", None)) for b in msg.content] == [
        ("tool_use", WEATHER_AND_TIME[0][1]), ("tool_use", WEATHER_AND_TIME[1][1]), ("text", None)]
    assert msg.content[2].text == "Both at once." and msg.stop_reason == "tool_use"

    o.reply(text=["Both", " at once."], tool_calls=WEATHER_AND_TIME, interleave=True)
    with client(gw).messages.stream(model="gpt", max_tokens=100, tools=TOOLS,
                                    messages=[{"role": "user", "content": "Weather and time in Paris?"}]) as stream:
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == WEATHER_AND_TIME
