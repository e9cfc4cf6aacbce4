"""The OpenAI Responses API's sans-IO pieces (aisix.providers.responses_chat, passthrough): the
Responses → chat request translation and its refusals, the chat → ``response`` object and event
sequence (checked by the official SDK's own stream state, which refuses inconsistent
sequences), the pass-through decoder on a recorded stream. End to end:
:mod:`tests.e2e.test_responses_api`."""
from __future__ import annotations

import json

import openai
import orjson
import pytest
from openai._models import construct_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from aisix.errors import GatewayError
from aisix.providers.base import TOKEN, ChatResult
from aisix.providers.passthrough import ResponsesEventsDecoder
from aisix.providers.responses_chat import ResponsesEncoder, chat_body, response_result
from aisix.sse import SSEParser
from tests.support.emulators.openai import OpenAIEmulator
from tests.unit.test_messages_translation import CHAT_CHUNKS, CHAT_RESPONSE

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
