"""``POST /v1/responses`` (the OpenAI Responses API, stateless subset).

First the sans-IO pieces: the Responses → chat request translation and its refusals, the chat →
``response`` object and event sequence (checked by the official SDK's own stream state, which
refuses inconsistent sequences), the pass-through decoder on a recorded stream. Then end to end
with the official ``openai`` SDK (``client.responses``) through a real gateway process: passed
through to the ``openai`` provider (the OpenAI emulator; the bytes the client gets are the
upstream's), translated for ``deepseek`` (the same emulator's chat API), ``anthropic`` and
``mock``, streamed and not, with a function call round trip; tokens and first-token samples in
the real Prometheus; errors in the OpenAI envelope.
"""
from __future__ import annotations

import json

import openai
import orjson
import pytest
from openai._models import construct_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from aisix.errors import GatewayError
from aisix.providers.base import ChatResult
from aisix.providers.passthrough import ResponsesEventsDecoder
from aisix.providers.responses_chat import ResponsesEncoder, chat_body, response_result
from aisix.sse import SSEParser
from aisix.providers.base import TOKEN
from tests.emulators.openai import OpenAIEmulator
from tests.entry_e2e import emulators, entry_gateway, series
from tests.provider_e2e import Delta
from tests.test_entry_messages import CHAT_CHUNKS, CHAT_RESPONSE

RESPONSES = "/v1/responses"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


# -- Responses → chat -----------------------------------------------------------------------------
def test_chat_body_items_tools_and_format():
    body = {"model": "ds", "instructions": "Be brief.", "max_output_tokens": 200, "temperature": 0.3,
            "reasoning": {"effort": "low", "summary": "auto"}, "store": False, "parallel_tool_calls": False,
            "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
            "input": [
                {"role": "user", "content": "Weather in Paris?"},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "Also this: "},
                    {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
                 "arguments": '{"city":"Paris"}', "status": "completed"},
                {"type": "function_call_output", "call_id": "call_1", "output": '{"temp":20}'}]}
    assert chat_body(body) == {
        "model": "ds", "max_tokens": 200, "temperature": 0.3, "reasoning_effort": "low", "parallel_tool_calls": False,
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                    "parameters": WEATHER["parameters"]}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                    "strict": True}},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "user", "content": [{"type": "text", "text": "Also this: "},
                                         {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp":20}'}]}


def test_chat_body_string_input_and_json_object():
    assert chat_body({"model": "m", "input": "hi", "text": {"format": {"type": "json_object"}}, "stream": True}) == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"},
        "stream": True}


@pytest.mark.parametrize("extra,param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"), ({"conversation": "conv_1"}, "conversation"),
    ({"store": True}, "store"), ({"background": True}, "background"), ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0]")])
def test_stateful_features_are_400_naming_them(extra, param):
    with pytest.raises(GatewayError) as e:
        chat_body({"model": "m", "input": "hi", **extra})
    assert e.value.status == 400 and e.value.param == param and e.value.code == "unsupported_parameter"
    assert param.split("[")[0] in e.value.message


@pytest.mark.parametrize("body,param", [
    ({"input": []}, "input"), ({"input": 3}, "input"), ({"input": "x", "instructions": 1}, "instructions"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input[0]"),
    ({"input": "x", "tool_choice": "maybe"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format")])
def test_malformed_requests_are_400(body, param):
    with pytest.raises(GatewayError) as e:
        chat_body({"model": "m", **body})
    assert e.value.status == 400 and e.value.param == param


# -- chat → Responses -----------------------------------------------------------------------------
def test_response_result():
    r = response_result(ChatResult(orjson.dumps(CHAT_RESPONSE), None, "gpt-4o", ("tool_calls",)),
                        {"model": "ds", "input": "x", "instructions": "I."})
    doc = orjson.loads(r.body)
    assert doc["object"] == "response" and doc["status"] == "completed" and doc["id"].startswith("resp_")
    assert doc["model"] == "gpt-4o" and doc["instructions"] == "I." and doc["store"] is False
    assert [(o["type"], o.get("status")) for o in doc["output"]] == [
        ("reasoning", None), ("message", "completed"), ("function_call", "completed")]
    assert doc["output"][0]["summary"] == [{"type": "summary_text", "text": "Need weather."}]
    assert doc["output"][1]["content"] == [{"type": "output_text", "text": "Checking.", "annotations": [],
                                            "logprobs": []}]
    assert {k: doc["output"][2][k] for k in ("call_id", "name", "arguments")} == {
        "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"SF"}'}
    assert doc["usage"] == {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10}, "output_tokens": 12,
                            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 42}


def test_cut_output_is_incomplete():
    doc = {"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "length",
                                                  "message": {"role": "assistant", "content": "x"}}]}
    out = orjson.loads(response_result(ChatResult(orjson.dumps(doc), None), {}).body)
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "max_output_tokens"}


def _events(data: bytes) -> list[tuple[str, dict]]:
    return [(e.event, orjson.loads(e.data)) for e in SSEParser().feed(data)]


def test_encoder_event_sequence_and_the_sdk_accepts_it():
    enc = ResponsesEncoder({"model": "ds", "input": "x", "tools": [WEATHER]})
    outs, flags = [], []
    for c in CHAT_CHUNKS:
        outs.append(enc.chunk(c))
        flags.append(enc.output)
    assert flags == [False, True, True, True, False, True, True, True, False, False]
    evs = _events(b"".join(outs) + enc.done())
    assert all(name == obj["type"] for name, obj in evs)
    assert [o["sequence_number"] for _, o in evs] == list(range(len(evs)))
    assert [o["type"] for _, o in evs] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_part.added", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    done = evs[-1][1]["response"]
    assert done["status"] == "completed" and done["usage"]["input_tokens"] == 40
    assert [o["type"] for o in done["output"]] == ["reasoning", "message", "function_call", "function_call"]
    assert done["output"][2]["arguments"] == '{"city":"SF"}' and done["output"][3]["call_id"] == "call_2"
    state = ResponseStreamState(input_tools=[WEATHER], text_format=openai.omit)  # the SDK's own bookkeeping
    for _, obj in evs:
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=obj))
    final = state._completed_response
    assert final.output_text == "Let me check." and json.loads(final.output[2].arguments) == {"city": "SF"}
    assert enc.done() == b""


# -- pass-through decoder -------------------------------------------------------------------------
def test_passthrough_decoder_relays_and_measures():
    with OpenAIEmulator() as emu:
        emu.reply(text=["Hi", " there"], tool_calls=[("f", {"a": 1})], usage={"prompt_tokens": 8, "completion_tokens": 3})
        import urllib.request
        req = urllib.request.Request(emu.base_url + "/responses", data=b'{"model":"m","input":"x","stream":true}',
                                     headers={"Authorization": f"Bearer {emu.api_key}"})
        data = urllib.request.urlopen(req, timeout=10).read()
    d, out, tokens = ResponsesEventsDecoder(), [], []
    for ev in SSEParser().feed(data):
        b, kind = d.feed(ev)
        out.append(b)
        tokens.append((ev.event, bool(kind & TOKEN)))
    assert b"".join(out) == data
    assert [name for name, t in tokens if t] == ["response.output_text.delta"] * 2 + [
        "response.function_call_arguments.delta"] * 3
    assert (d.usage.prompt_tokens, d.usage.completion_tokens, d.usage.total_tokens) == (8, 3, 11)
    assert d.done and d.finished and d.finish_reasons == ["stop"] and d.end() is None


# -- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emus():
    with emulators() as pair:
        yield pair


@pytest.fixture(scope="module")
def gw(tmp_path_factory, emus, prometheus):
    with entry_gateway(tmp_path_factory.mktemp("gw-responses"), prometheus, *emus, mock_tokens=3) as proc:
        yield proc


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="sk-test", max_retries=0, timeout=30)


def delta(gw, model: str, status: str = "200") -> Delta:
    return Delta(gw.metrics, list(series(model).values()), RESPONSES, status)


def test_passthrough_whole_bytes_and_stateful_features(gw, emus):
    o, _ = emus
    o.reply(text=["Hello."], usage={"prompt_tokens": 12, "completion_tokens": 3})
    d = delta(gw, "gpt")
    raw = client(gw).responses.with_raw_response.create(model="gpt", input="hi", previous_response_id="resp_abc",
                                                        store=True, tools=[{"type": "web_search"}])
    sent = raw.http_response.request.content
    assert o.last.path == "/v1/responses" and o.last.raw == sent.replace(b'"model":"gpt"', b'"model":"gpt-4o"')
    assert raw.http_response.content == bytes(o.sent[-1])
    assert raw.parse().output_text == "Hello."
    d.expect(series("gpt")["prompt"], 12)
    d.expect(series("gpt")["completion"], 3)
    d.expect(series("gpt")["total"], 15)


def test_passthrough_stream_bytes_and_first_token(gw, emus):
    o, _ = emus
    o.reply(text=["Sun", "ny"], tool_calls=[("get_weather", {"city": "Oslo"})],
            usage={"prompt_tokens": 20, "completion_tokens": 6})
    d = delta(gw, "gpt")
    with client(gw).responses.with_streaming_response.create(model="gpt", input="Weather?", tools=[WEATHER],
                                                             stream=True) as resp:
        body = resp.read()
    assert body == bytes(o.sent[-1])
    d.expect(series("gpt")["prompt"], 20)
    d.expect(series("gpt")["completion"], 6)
    d.expect(series("gpt")["first"], 1)


def test_passthrough_mid_stream_error_event(gw, emus):
    o, _ = emus
    o.reply(text=["a", "b", "c"], error_after=3)
    d = delta(gw, "gpt", status="502")
    events = list(client(gw).responses.create(model="gpt", input="x", stream=True))
    assert events[-1].type == "error" and events[-1].code == "server_error"
    assert events[-1].message == "The server had an error"
    d.expect_status(1)
    o.reply(text=["a", "b", "c"], error_after=3)
    with client(gw).responses.with_streaming_response.create(model="gpt", input="x", stream=True) as resp:
        assert resp.read() == bytes(o.sent[-1])  # the error event too, as the upstream sent it


@pytest.mark.parametrize("stream", [False, True])
def test_translated_function_call_round_trip(gw, emus, stream):
    o, _ = emus
    o.reply(thinking=["Need weather."], tool_calls=[("get_weather", {"city": "Lima"})], text=[],
            usage={"prompt_tokens": 25, "completion_tokens": 8})
    d = delta(gw, "ds")
    c = client(gw)
    if stream:
        with c.responses.stream(model="ds", input="Weather in Lima?", tools=[WEATHER], instructions="Brief.") as s:
            kinds = [ev.type for ev in s]
            first = s.get_final_response()
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
        assert "response.function_call_arguments.delta" in kinds
    else:
        first = c.responses.create(model="ds", input="Weather in Lima?", tools=[WEATHER], instructions="Brief.")
    assert first.status == "completed" and first.usage.input_tokens == 25 and first.usage.output_tokens == 8
    assert [i.type for i in first.output] == ["reasoning", "function_call"]
    call = first.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Lima"}
    sent = o.last.json
    assert o.last.path == "/v1/chat/completions" and sent["model"] == "deepseek-chat"
    assert sent["messages"] == [{"role": "system", "content": "Brief."}, {"role": "user", "content": "Weather in Lima?"}]
    assert sent["tools"] == [{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description",
                                                                                         "parameters")}}]
    assert sent.get("stream", False) is stream
    d.expect(series("ds")["prompt"], 25)
    d.expect(series("ds")["completion"], 8)
    d.expect(series("ds")["first"], 1 if stream else 0)

    o.reply(text=["Lima: 18 C."], usage={"prompt_tokens": 40, "completion_tokens": 5})
    follow = [{"role": "user", "content": "Weather in Lima?"}, *[i.model_dump(exclude_none=True) for i in first.output],
              {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}]
    if stream:
        with c.responses.stream(model="ds", input=follow, tools=[WEATHER]) as s:
            text = "".join(ev.delta for ev in s if ev.type == "response.output_text.delta")
            second = s.get_final_response()
        assert text == "Lima: 18 C."
    else:
        second = c.responses.create(model="ds", input=follow, tools=[WEATHER])
    assert second.output_text == "Lima: 18 C."
    assert o.last.json["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "18 C"}]
    d.expect(series("ds")["prompt"], 65)


@pytest.mark.parametrize("stream", [False, True])
def test_translated_to_anthropic(gw, emus, stream):
    _, a = emus
    a.reply(text=["Bon", "jour"], usage={"input_tokens": 9, "cache_read_input_tokens": 2, "output_tokens": 2})
    d = delta(gw, "claude")
    if stream:
        with client(gw).responses.stream(model="claude", input="hi", max_output_tokens=50) as s:
            r = s.get_final_response()
    else:
        r = client(gw).responses.create(model="claude", input="hi", max_output_tokens=50)
    assert r.output_text == "Bonjour" and r.usage.input_tokens == 11 and r.usage.input_tokens_details.cached_tokens == 2
    assert a.last.json["max_tokens"] == 50 and a.last.json["messages"] == [{"role": "user", "content": "hi"}]
    d.expect(series("claude")["prompt"], 11)
    d.expect(series("claude")["completion"], 2)


def test_translated_to_mock(gw):
    r = client(gw).responses.create(model="mocked", input="hi")
    assert r.output_text == "Hello from the" and r.usage.output_tokens == 3


def test_errors_in_openai_envelope(gw):
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).responses.create(model="ds", input="hi", previous_response_id="resp_1")
    assert e.value.body["param"] == "previous_response_id" and e.value.body["code"] == "unsupported_parameter"
    assert "previous_response_id" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).responses.create(model="ds", input="hi", tools=[{"type": "file_search", "vector_store_ids": ["v"]}])
    assert e.value.body["param"] == "tools[0]" and "file_search" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).responses.create(model="nope", input="hi")
    assert e.value.body["code"] == "model_not_found"
