"""The ``gemini`` provider end to end: the official ``openai`` client through a real gateway
process to a Gemini emulator; exact tokens in a real Prometheus, embeddings, errors, broken
streams. The sans-IO translators: :mod:`tests.unit.test_gemini_translation`."""
from __future__ import annotations

import json

import openai
import pytest

from tests.support.emulators.gemini import GeminiEmulator, embedding_values
from tests.support.provider_e2e import (
    COMPLETION,
    FIRST,
    PROMPT,
    TOTAL,
    assert_unreachable_502_and_timeout_504,
    mid_stream_failure,
    module_fixtures,
)
from tests.unit.test_gemini_translation import USER

# -- end to end -----------------------------------------------------------------------------------
emu, gw = module_fixtures(GeminiEmulator, "gemini", "gemini-2.5-flash")


def test_e2e_text_sync(gw, emu):
    emu.reply(text=["Bonjour", " !"], usage={"promptTokenCount": 9, "candidatesTokenCount": 3, "thoughtsTokenCount": 7})
    d = gw.delta()
    r = gw.client().chat.completions.create(model="m", messages=[
        {"role": "system", "content": "French."}, USER], max_tokens=100, n=1)
    assert r.choices[0].message.content == "Bonjour !" and r.choices[0].finish_reason == "stop"
    assert r.model == "gemini-2.5-flash"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (9, 10, 19)
    assert r.usage.completion_tokens_details.reasoning_tokens == 7
    assert emu.last.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert emu.last.headers["x-goog-api-key"] == gw.upstream_key
    assert emu.last.json == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                             "systemInstruction": {"parts": [{"text": "French."}]},
                             "generationConfig": {"maxOutputTokens": 100, "candidateCount": 1}}
    d.expect(PROMPT, 9)
    d.expect(COMPLETION, 10)
    d.expect(TOTAL, 19)


def test_e2e_text_stream_sync_with_usage(gw, emu):
    emu.reply(text=["a", "b", "c"], usage={"promptTokenCount": 12, "candidatesTokenCount": 3}, chunk_delay=0.01)
    d = gw.delta()
    chunks = list(gw.client().chat.completions.create(
        model="m", messages=[USER], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "abc"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (12, 3)
    assert emu.last.path.endswith(":streamGenerateContent") and emu.last.query == {"alt": "sse"}
    d.expect(PROMPT, 12)
    d.expect(COMPLETION, 3)
    d.expect(FIRST, 1)


async def test_e2e_tool_calls_stream_and_round_trip_async(gw, emu):
    emu.reply(text=[], tool_calls=[("get_weather", {"city": "Oslo"}), ("get_time", {})], signature="CiQBc2ln",
              usage={"promptTokenCount": 40, "candidatesTokenCount": 8})
    d = gw.delta()
    client = gw.async_client()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "get_time"}}]
    msgs = [{"role": "user", "content": "weather in Oslo?"}]
    calls: dict[int, dict] = {}
    finish = None
    async for c in await client.chat.completions.create(model="m", messages=msgs, tools=tools, stream=True):
        for tc in c.choices[0].delta.tool_calls or ():
            slot = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            slot["arguments"] += tc.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Oslo"}),
                                                                                 ("get_time", {})]
    d.expect(PROMPT, 40)
    d.expect(COMPLETION, 8)
    emu.reply(text=["Cold."])
    msgs.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls.values()]})
    msgs += [{"role": "tool", "tool_call_id": calls[0]["id"], "content": "-3C"},
             {"role": "tool", "tool_call_id": calls[1]["id"], "content": '{"time": "12:00"}'}]
    r = await client.chat.completions.create(model="m", messages=msgs, tools=tools)
    assert r.choices[0].message.content == "Cold."
    sent = emu.last.json["contents"]
    assert sent[1] == {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}, "thoughtSignature": "CiQBc2ln"},
        {"functionCall": {"name": "get_time", "args": {}}}]}
    assert sent[2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"output": "-3C"}}},
        {"functionResponse": {"name": "get_time", "response": {"time": "12:00"}}}]}


async def test_e2e_tool_call_whole_async(gw, emu):
    emu.reply(text=[], tool_calls=[("get_weather", {"city": "Rome"})])
    r = await gw.async_client().chat.completions.create(model="m", messages=[USER], tools=[
        {"type": "function", "function": {"name": "get_weather"}}], tool_choice="required")
    assert r.choices[0].finish_reason == "tool_calls"
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome"}
    assert emu.last.json["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}


@pytest.mark.parametrize("status,gstatus,exc", [
    (400, "INVALID_ARGUMENT", openai.BadRequestError), (401, "UNAUTHENTICATED", openai.AuthenticationError),
    (403, "PERMISSION_DENIED", openai.PermissionDeniedError), (404, "NOT_FOUND", openai.NotFoundError),
    (429, "RESOURCE_EXHAUSTED", openai.RateLimitError), (500, "INTERNAL", openai.InternalServerError),
    (503, "UNAVAILABLE", openai.InternalServerError)])
@pytest.mark.parametrize("stream", [False, True])
def test_e2e_errors(gw, emu, status, gstatus, exc, stream):
    emu.reply(error=(status, gstatus, f"upstream says {status}"))
    d = gw.delta(status=str(status))
    with pytest.raises(exc) as e:
        gw.client().chat.completions.create(model="m", messages=[USER], stream=stream)
    assert e.value.status_code == status
    if status in (401, 403):  # the provider refused the gateway's key: told apart from the client's own
        assert e.value.body["code"] == "upstream_auth_failed" and "not your API key" in e.value.body["message"]
        assert e.value.body["message"].endswith(f": upstream says {status}")
    else:
        assert e.value.body["message"] == f"upstream says {status}" and e.value.body["code"] == gstatus
    if status == 429:  # from the body's google.rpc.RetryInfo ("7s")
        assert e.value.response.headers["retry-after"] == "7"
    d.expect_status(1)


def test_e2e_wrong_upstream_key(gw):
    """Gemini answers a wrong key with 400 API_KEY_INVALID: the client learns it is the gateway's key."""
    with pytest.raises(openai.BadRequestError) as e:
        gw.client().chat.completions.create(model="m-badkey", messages=[USER])
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["code"] == "upstream_auth_failed"
    assert "refused the gateway's credentials" in e.value.body["message"]
    assert e.value.body["message"].endswith(": API key not valid. Please pass a valid API key.")


@pytest.mark.parametrize("stream", [False, True])
def test_e2e_unreachable_is_502_and_timeout_is_504(gw, emu, stream):
    assert_unreachable_502_and_timeout_504(gw, emu, [USER], stream)


@pytest.mark.parametrize("mode", ["error_after", "drop_after"])
def test_e2e_mid_stream_error(gw, emu, mode):
    """Measured with what it got: the running usage of the last event."""
    err = mid_stream_failure(gw, emu, [USER], mode, {"promptTokenCount": 8, "candidatesTokenCount": 3})
    if mode == "error_after":
        assert err.body["code"] == "UNAVAILABLE"


@pytest.mark.parametrize("fmt", [None, "float"])
def test_e2e_embeddings(gw, emu, fmt):
    texts = ["hello world", "gateway"]
    d = gw.delta(endpoint="/v1/embeddings")
    extra = {"encoding_format": fmt} if fmt else {}  # the client asks base64 by default and decodes it
    r = gw.client().embeddings.create(model="m", input=texts, dimensions=6, **extra)
    assert [e.embedding for e in r.data] == [embedding_values(t, 6) for t in texts]
    assert r.model == "gemini-2.5-flash" and (r.usage.prompt_tokens, r.usage.total_tokens) == (5, 5)
    assert emu.last.path == "/v1beta/models/gemini-2.5-flash:batchEmbedContents"
    assert [q["outputDimensionality"] for q in emu.last.json["requests"]] == [6, 6]
    d.expect(PROMPT, 5)  # ceil(11/4) + ceil(7/4)
    d.expect(TOTAL, 5)
    d.expect_status(1)
