"""The Anthropic Messages API's sans-IO pieces (aisix.providers.messages_chat, passthrough) on
recorded event sequences (the shapes of the Messages and chat streaming references): the model
rewrite that keeps every other byte, the Messages → chat request translation, the chat →
Messages answer and event sequence, the pass-through decoder. End to end:
:mod:`tests.e2e.test_messages_api`."""
from __future__ import annotations

import json

import orjson
import pytest

from aisix.errors import GatewayError
from aisix.providers.base import ERROR, TOKEN, ChatResult
from aisix.providers.messages_chat import (
    AnthropicError,
    MessagesEncoder,
    anthropic_usage,
    chat_body,
    estimate_input_tokens,
    message_result,
)
from aisix.providers.passthrough import AnthropicEventsDecoder, rewrite_model
from aisix.sse import SSEParser
from tests.unit.test_anthropic_translation import STREAM as ANTHROPIC_STREAM

MESSAGES = "/v1/messages"


# -- the model rewrite ------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,at", [
    (b'{"model":"claude","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}', 9),
    (b'{ "max_tokens" : 5,\n  "model" :  "claude" , "messages":[{"role":"user","content":"\\u00e9 \\"model\\": 1"}]}', 33),
    ((b'{"tools":[{"name":"f","input_schema":{"type":"object","properties":{"model":{"type":"string"}}}}],'
      b'"metadata":{"model":"claude"},"model":"claude","x":1.50}'), 136),
])
def test_rewrite_model_changes_only_the_top_level_model(raw, at):
    assert raw[at:at + 8] == b'"claude"'
    body = orjson.loads(raw)
    out = rewrite_model(raw, body, "claude-sonnet-4-5")
    assert out == raw[:at] + b'"claude-sonnet-4-5"' + raw[at + 8:]  # every other byte as sent
    assert orjson.loads(out) == {**body, "model": "claude-sonnet-4-5"}


def test_rewrite_model_with_an_escaped_key_serialises_the_same_json():
    raw = b'{"mod\\u0065l":"claude","max_tokens":5}'
    body = orjson.loads(raw)
    assert orjson.loads(rewrite_model(raw, body, "up")) == {"model": "up", "max_tokens": 5}


def test_rewrite_model_refuses_a_body_with_model_twice():
    """Found by attacking a gateway: with ``model`` twice the gateway routed by the last and the
    upstream got the first one untouched (a model the key may not use, on the operator's account)."""
    raw = b'{"model":"claude-opus-EXPENSIVE","max_tokens":5,"model":"claude"}'
    with pytest.raises(GatewayError) as e:
        rewrite_model(raw, orjson.loads(raw), "up")
    assert (e.value.status, e.value.code, e.value.param) == (400, "duplicate_key", "model")
    nested = b'{"model":"claude","tools":[{"name":"t","input_schema":{"model":"x","model2":"y"}}]}'
    assert orjson.loads(rewrite_model(nested, orjson.loads(nested), "up"))["model"] == "up"  # a nested key is fine


# -- Messages → chat ------------------------------------------------------------------------------
def test_chat_body_text_system_images_tools_and_results():
    body = {"model": "gpt", "max_tokens": 300, "system": [{"type": "text", "text": "Be brief.",
                                                          "cache_control": {"type": "ephemeral"}},
                                                         {"type": "text", "text": "French."}],
            "temperature": 0.2, "top_p": 0.9, "top_k": 5, "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
            "thinking": {"type": "enabled", "budget_tokens": 2000},
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"},
                       "cache_control": {"type": "ephemeral"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                             {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                          "data": "iVBO"}},
                                             {"type": "image", "source": {"type": "url", "url": "https://x/y.jpg"}}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "SF"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                              "content": [{"type": "text", "text": "20"}, {"type": "text", "text": "C"}]},
                                             {"type": "text", "text": "thanks"}]}]}
    assert chat_body(body, "max_completion_tokens") == {
        "model": "gpt", "max_completion_tokens": 300, "temperature": 0.2, "top_p": 0.9, "stop": ["END"], "user": "u1",
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                    "parameters": {"type": "object"}}}],
        "tool_choice": "required", "parallel_tool_calls": False,
        "messages": [
            {"role": "system", "content": "Be brief.\nFrench."},
            {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                                         {"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"SF"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "20\nC"},
            {"role": "user", "content": "thanks"}]}


@pytest.mark.parametrize("choice,expected", [
    ({"type": "auto"}, {"tool_choice": "auto"}), ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "f"}, {"tool_choice": {"type": "function", "function": {"name": "f"}}}),
    ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False})])
def test_chat_body_tool_choice(choice, expected):
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "tool_choice": choice}
    out = chat_body(body)
    assert {k: out[k] for k in expected} == expected and "max_tokens" in out


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages[0].content[0]"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305",
                                                                                   "name": "web_search"}]}, "tools[0]"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "mcp_servers": []}, "mcp_servers"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                                  "content": [{"type": "image", "source": {}}]}]}]},
     "messages[0].content[0].content"),
])
def test_chat_body_refuses_what_chat_cannot_carry(body, param):
    with pytest.raises(GatewayError) as e:
        chat_body({"model": "m", **body})
    assert e.value.status == 400 and e.value.param == param


def test_error_envelope_types_by_status_and_upstream_type():
    assert AnthropicError.of(GatewayError(400, "bad", code="model_not_found")).body() == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
    assert AnthropicError.of(GatewayError(529, "busy", "api_error", "overloaded_error")).body()["error"]["type"] \
        == "overloaded_error"
    for status, etype in [(401, "authentication_error"), (403, "permission_error"), (404, "not_found_error"),
                          (413, "request_too_large"), (429, "rate_limit_error"), (502, "api_error"),
                          (504, "timeout_error")]:
        e = AnthropicError.of(GatewayError(status, "m", headers={"Retry-After": "3"}))
        assert (e.status, e.body()["error"]["type"], e.headers) == (status, etype, {"Retry-After": "3"})


def test_estimate_counts_text_and_images():
    small = estimate_input_tokens({"messages": [{"role": "user", "content": "x" * 400}]})
    assert 100 <= small <= 120
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 100000}}
    assert estimate_input_tokens({"messages": [{"role": "user", "content": [image]}]}) < 1700


# -- chat → Messages (whole) ----------------------------------------------------------------------
CHAT_RESPONSE = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Checking.", "reasoning_content": "Need weather.",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                         "arguments": '{"city":"SF"}'}}]}}],
    "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42,
              "prompt_tokens_details": {"cached_tokens": 10}}}


def test_message_result():
    r = message_result(ChatResult(orjson.dumps(CHAT_RESPONSE), None, "gpt-4o", ("tool_calls",)))
    assert orjson.loads(r.body) == {
        "id": "msg_chatcmpl-1", "type": "message", "role": "assistant", "model": "gpt-4o",
        "content": [{"type": "thinking", "thinking": "Need weather.", "signature": ""},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "SF"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 20, "cache_read_input_tokens": 10, "output_tokens": 12}}
    assert r.finish_reasons == ("tool_calls",)


@pytest.mark.parametrize("finish,stop", [("stop", "end_turn"), ("length", "max_tokens"),
                                         ("content_filter", "refusal"), ("tool_calls", "tool_use"), (None, "end_turn")])
def test_stop_reasons(finish, stop):
    doc = {"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": finish,
                                                  "message": {"role": "assistant", "content": "x"}}]}
    assert orjson.loads(message_result(ChatResult(orjson.dumps(doc), None)).body)["stop_reason"] == stop


def test_tool_arguments_that_are_not_an_object_are_502():
    doc = json.loads(json.dumps(CHAT_RESPONSE))
    doc["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = "[1"
    with pytest.raises(GatewayError) as e:
        message_result(ChatResult(orjson.dumps(doc), None))
    assert e.value.status == 502


# -- chat → Messages (stream) ---------------------------------------------------------------------
def _chunk(delta: dict, finish=None, **extra) -> dict:
    return {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


# The shape of OpenAI's streaming reference (role chunk, deltas, tool call fragments, finish, usage chunk).
CHAT_CHUNKS = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"reasoning_content": "Hmm"}),
    _chunk({"content": "Let me"}), _chunk({"content": " check."}),
    _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"SF"}'}}]}),
    _chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"}}]}),
    _chunk({}, "tool_calls"),
    {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o", "choices": [],
     "usage": {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}},
]


def _events(data: bytes) -> list[tuple[str, dict]]:
    return [(e.event, orjson.loads(e.data)) for e in SSEParser().feed(data)]


def test_encoder_event_sequence():
    enc = MessagesEncoder()
    outs, flags = [], []
    for c in CHAT_CHUNKS:
        outs.append(enc.chunk(c))
        flags.append(enc.output)
    assert flags == [False, True, True, True, False, True, True, True, False, False]
    evs = _events(b"".join(outs) + enc.done())
    assert all(name == obj["type"] for name, obj in evs)
    assert [(o["type"], o.get("index")) for _, o in evs] == [
        ("message_start", None),
        ("content_block_start", 0), ("content_block_delta", 0),
        ("content_block_stop", 0), ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1),
        ("content_block_stop", 1), ("content_block_start", 2), ("content_block_delta", 2), ("content_block_delta", 2),
        ("content_block_stop", 2), ("content_block_start", 3), ("content_block_delta", 3),
        ("content_block_stop", 3), ("message_delta", None), ("message_stop", None)]
    start = evs[0][1]["message"]
    assert start["id"] == "msg_chatcmpl-9" and start["model"] == "gpt-4o" and start["content"] == []
    assert evs[1][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert evs[2][1]["delta"] == {"type": "thinking_delta", "thinking": "Hmm"}
    assert evs[5][1]["delta"] == {"type": "text_delta", "text": "Let me"}
    assert evs[8][1]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    assert [evs[i][1]["delta"]["partial_json"] for i in (9, 10)] == ['{"city":', '"SF"}']
    assert evs[15][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"input_tokens": 40, "cache_read_input_tokens": 0, "output_tokens": 9}}
    assert enc.done() == b""


def test_encoder_output_accumulates_in_the_anthropic_sdk():
    """The events, fed to the official SDK's own accumulator, make the Message they describe."""
    from anthropic._models import construct_type
    from anthropic.lib.streaming._messages import accumulate_event
    from anthropic.types import RawMessageStreamEvent
    enc = MessagesEncoder()
    data = b"".join(enc.chunk(c) for c in CHAT_CHUNKS) + enc.done()
    snap, bufs = None, {}
    for _, obj in _events(data):
        snap = accumulate_event(event=construct_type(type_=RawMessageStreamEvent, value=obj),
                                current_snapshot=snap, json_bufs=bufs)
    assert [b.type for b in snap.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert snap.content[1].text == "Let me check." and snap.content[2].input == {"city": "SF"}
    assert snap.content[3].input == {} and snap.stop_reason == "tool_use"
    assert (snap.usage.input_tokens, snap.usage.output_tokens) == (40, 9)


def test_anthropic_usage_from_chat_usage():
    assert anthropic_usage({"prompt_tokens": 9, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}) \
        == {"input_tokens": 5, "cache_read_input_tokens": 4, "output_tokens": 2}
    assert anthropic_usage(None) == {"input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0}


# -- pass-through decoder -------------------------------------------------------------------------
@pytest.mark.parametrize("step", [1, 7, len(ANTHROPIC_STREAM)])
def test_passthrough_decoder_relays_bytes_and_measures(step):
    d, parser, out, tokens = AnthropicEventsDecoder(), SSEParser(), [], []
    for i in range(0, len(ANTHROPIC_STREAM), step):
        for ev in parser.feed(ANTHROPIC_STREAM[i:i + step]):
            b, kind = d.feed(ev)
            out.append(b)
            tokens.append((ev.event, bool(kind & TOKEN)))
    assert b"".join(out) == ANTHROPIC_STREAM
    assert [name for name, t in tokens if t] == ["content_block_delta"] * 3  # text, then two tool input fragments
    assert tokens[0] == ("message_start", False) and tokens[5] == ("content_block_start", False)
    assert (d.usage.prompt_tokens, d.usage.completion_tokens, d.usage.total_tokens) == (949, 47, 996)
    assert d.done and d.finished and d.end() is None


def test_passthrough_decoder_relays_the_upstream_error_event_unless_masked():
    raw = b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
    d = AnthropicEventsDecoder()
    assert d.feed(SSEParser().feed(raw)[0]) == (None, ERROR) and d.error.code == "overloaded_error"
    assert d.error_event(d.error) == raw
    d.error.message = "Overloaded ****1234"  # what the redaction does to a message holding a secret
    assert _events(d.error_event(d.error)) == [("error", {"type": "error", "error": {
        "type": "overloaded_error", "message": "Overloaded ****1234"}})]


def test_passthrough_decoder_adds_message_stop_and_frames_errors():
    d = AnthropicEventsDecoder()
    cut = ANTHROPIC_STREAM[:ANTHROPIC_STREAM.index(b"event: message_stop")]
    for ev in SSEParser().feed(cut):
        d.feed(ev)
    assert d.finished and not d.done
    assert d.end() == b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    err = d.error_event(GatewayError(502, "upstream broke", "api_error", "upstream_unreachable"))
    assert _events(err) == [("error", {"type": "error", "error": {"type": "api_error", "message": "upstream broke"}})]
