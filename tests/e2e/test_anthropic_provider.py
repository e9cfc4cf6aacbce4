"""The ``anthropic`` provider end to end: the official ``openai`` client through a real gateway
process to an Anthropic emulator; exact tokens in a real Prometheus, errors, broken streams.
The sans-IO translators: :mod:`tests.unit.test_anthropic_translation`."""
from __future__ import annotations

import json

import openai
import pytest

from tests.support.emulators.anthropic import AnthropicEmulator
from tests.support.provider_e2e import (
    COMPLETION,
    FIRST,
    PROMPT,
    TOTAL,
    assert_unreachable_502_and_timeout_504,
    mid_stream_failure,
    module_fixtures,
)
from tests.unit.test_anthropic_translation import USER

# -- end to end -----------------------------------------------------------------------------------
emu, gw = module_fixtures(AnthropicEmulator, "anthropic", "claude-sonnet-4-5")


def test_e2e_text_sync(gw, emu):
    emu.reply(text=["Bonjour", " !"], usage={"input_tokens": 11, "cache_read_input_tokens": 4, "output_tokens": 3})
    d = gw.delta()
    r = gw.client().chat.completions.create(model="m", messages=[
        {"role": "system", "content": "French."}, {"role": "user", "content": "hello"}], temperature=0.1)
    assert r.choices[0].message.content == "Bonjour !" and r.choices[0].finish_reason == "stop"
    assert r.model == emu.model and r.id.startswith("msg_")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (15, 3, 18)
    assert r.usage.prompt_tokens_details.cached_tokens == 4
    sent = emu.last.json
    assert sent["system"] == "French." and sent["messages"] == [{"role": "user", "content": "hello"}]
    assert sent["max_tokens"] == 4096 and sent["temperature"] == 0.1 and sent["model"] == "claude-sonnet-4-5"
    assert emu.last.headers["anthropic-version"] == "2023-06-01" and emu.last.headers["x-api-key"] == gw.upstream_key
    assert emu.last.headers["traceparent"].startswith("00-")
    d.expect(PROMPT, 15)
    d.expect(COMPLETION, 3)
    d.expect(TOTAL, 18)


def test_e2e_text_stream_sync_with_usage(gw, emu):
    emu.reply(text=["a", "b", "c"], usage={"input_tokens": 20, "cache_creation_input_tokens": 2, "output_tokens": 6},
              chunk_delay=0.01)
    d = gw.delta()
    chunks = list(gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "abc"}], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "abc"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (22, 6)
    assert emu.last.json["stream"] is True
    d.expect(PROMPT, 22)
    d.expect(COMPLETION, 6)
    d.expect(FIRST, 1)


async def test_e2e_tool_calls_stream_async(gw, emu):
    emu.reply(text=["Let me check."], tool_calls=[("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})],
              usage={"input_tokens": 30, "output_tokens": 12})
    d = gw.delta()
    stream = await gw.async_client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "weather?"}], stream=True,
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
               {"type": "function", "function": {"name": "get_time"}}])
    calls: dict[int, dict] = {}
    finish = None
    async for c in stream:
        assert c.usage is None
        for tc in c.choices[0].delta.tool_calls or ():
            slot = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            slot["arguments"] += tc.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert all(c["id"].startswith("toolu_") for c in calls.values())
    assert emu.last.json["tools"][1] == {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
    d.expect(PROMPT, 30)  # usage recorded though the client did not ask for it
    d.expect(COMPLETION, 12)


@pytest.mark.parametrize("stream", [False, True])
async def test_e2e_tool_call_without_parameters_gives_empty_object(gw, emu, stream):
    """Anthropic streams a parameterless tool call as one empty ``input_json_delta``; the
    fragments must still add up to the same valid JSON as the non-streamed ``input: {}``."""
    emu.reply(tool_calls=[("get_time", {}), ("get_weather", {"city": "Oslo"})], text=[])
    tools = [{"type": "function", "function": {"name": "get_time"}},
             {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = await gw.async_client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "time?"}], tools=tools, stream=stream)
    if not stream:
        args = [tc.function.arguments for tc in r.choices[0].message.tool_calls]
    else:
        calls: dict[int, str] = {}
        async for c in r:
            for tc in c.choices[0].delta.tool_calls or ():
                calls[tc.index] = calls.get(tc.index, "") + (tc.function.arguments or "")
        args = [calls[i] for i in sorted(calls)]
    assert args[0] == "{}" and [json.loads(a) for a in args] == [{}, {"city": "Oslo"}]


async def test_e2e_tool_round_trip_async(gw, emu):
    emu.reply(tool_calls=[("get_weather", {"city": "Oslo"})], text=[])
    client = gw.async_client()
    msgs = [{"role": "user", "content": "weather in Oslo?"}]
    r = await client.chat.completions.create(model="m", messages=msgs, tools=[
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    emu.reply(text=["Cold."])
    msgs += [r.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "-3C"}]
    r2 = await client.chat.completions.create(model="m", messages=msgs)
    assert r2.choices[0].message.content == "Cold."
    sent = emu.last.json["messages"]
    assert sent[1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": call.id, "name": "get_weather", "input": {"city": "Oslo"}}]}
    assert sent[2] == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "-3C"}]}


@pytest.mark.parametrize("status,atype,exc", [
    (400, "invalid_request_error", openai.BadRequestError), (401, "authentication_error", openai.AuthenticationError),
    (403, "permission_error", openai.PermissionDeniedError), (404, "not_found_error", openai.NotFoundError),
    (429, "rate_limit_error", openai.RateLimitError), (500, "api_error", openai.InternalServerError),
    (529, "overloaded_error", openai.InternalServerError)])
@pytest.mark.parametrize("stream", [False, True])
def test_e2e_errors(gw, emu, status, atype, exc, stream):
    emu.reply(error=(status, atype, f"upstream says {status}"), headers={"retry-after": "7"} if status == 429 else {})
    d = gw.delta(status=str(status))
    with pytest.raises(exc) as e:
        gw.client().chat.completions.create(model="m", messages=[USER], stream=stream)
    assert e.value.status_code == status
    otype = "api_error" if atype == "overloaded_error" else atype
    if status in (401, 403):  # the provider refused the gateway's key: told apart from the client's own
        assert e.value.body == {"message": "The upstream provider `anthropic` refused the gateway's credentials for "
                                f"model `m` (not your API key; tell the gateway's operator): upstream says {status}",
                                "type": otype, "code": "upstream_auth_failed"}
    else:
        assert e.value.body == {"message": f"upstream says {status}", "type": otype, "code": atype}
    if status == 429:
        assert e.value.response.headers["retry-after"] == "7"
    d.expect_status(1)


def test_e2e_wrong_upstream_key_is_401(gw):
    with pytest.raises(openai.AuthenticationError) as e:
        gw.client().chat.completions.create(model="m-badkey", messages=[USER])
    assert e.value.body["code"] == "upstream_auth_failed"
    assert e.value.body["message"].endswith("(not your API key; tell the gateway's operator): invalid x-api-key")


@pytest.mark.parametrize("stream", [False, True])
def test_e2e_unreachable_is_502_and_timeout_is_504(gw, emu, stream):
    assert_unreachable_502_and_timeout_504(gw, emu, [USER], stream)


@pytest.mark.parametrize("mode", ["error_after", "drop_after"])
def test_e2e_mid_stream_error(gw, emu, mode):
    """Measured with what it got: message_start's input tokens."""
    err = mid_stream_failure(gw, emu, [USER], mode, {"input_tokens": 8, "output_tokens": 3})
    if mode == "error_after":
        assert err.message == "Overloaded" and err.body["code"] == "overloaded_error"
