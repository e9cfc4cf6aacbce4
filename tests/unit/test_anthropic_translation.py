"""aisix.providers.anthropic, sans IO: the translators (request, response, stream decoder,
errors) byte by byte. End to end: :mod:`tests.e2e.test_anthropic_provider`."""
from __future__ import annotations

import json

import pytest

from aisix.config.resources import Model
from aisix.errors import GatewayError
from aisix.providers import get_provider
from aisix.providers.anthropic import AnthropicStreamDecoder, messages_request
from aisix.providers.base import TOKEN
from aisix.sse import SSEParser

P = get_provider("anthropic")
USER = {"role": "user", "content": "hi"}


def model(**cfg) -> Model:
    return Model(name="c", model="anthropic/claude-sonnet-4-5", provider_config={"api_key": "sk-ant", **cfg})


# -- request ------------------------------------------------------------------------------------
def test_request_url_headers_and_defaults():
    req = P.chat_request(model(), {"model": "c", "messages": [USER]}, False, {"traceparent": "00-x"})
    assert req.url == "https://api.anthropic.com/v1/messages"
    assert req.headers["x-api-key"] == "sk-ant"
    assert req.headers["anthropic-version"] == "2023-06-01"
    assert req.headers["traceparent"] == "00-x"
    assert "Authorization" not in req.headers
    assert req.body == b'{"model":"claude-sonnet-4-5","max_tokens":4096,"messages":[{"role":"user","content":"hi"}]}'


def test_request_api_base_default_max_tokens_and_stream():
    req = P.chat_request(model(api_base="http://127.0.0.1:9/v1", default_max_tokens=1000),
                         {"messages": [USER]}, True, {})
    assert req.url == "http://127.0.0.1:9/v1/messages"
    assert json.loads(req.body) == {"model": "claude-sonnet-4-5", "max_tokens": 1000,
                                    "messages": [USER], "stream": True}


@pytest.mark.parametrize("body,expected", [
    ({"max_completion_tokens": 7}, 7), ({"max_tokens": 9}, 9), ({"max_completion_tokens": 7, "max_tokens": 9}, 7)])
def test_max_tokens(body, expected):
    assert messages_request("m", {"messages": [USER], **body}, False)["max_tokens"] == expected


def test_system_multi_turn_and_sampling():
    doc = messages_request("m", {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": [
            {"type": "text", "text": "Use French."}]}, USER, {"role": "assistant", "content": "Salut"},
            {"role": "user", "content": "encore"}, {"role": "user", "content": [{"type": "text", "text": "!"}]}],
        "temperature": 0.2, "top_p": 0.9, "stop": "END", "user": "u1", "n": 1,
        "presence_penalty": 1, "seed": 3}, False)
    assert doc["system"] == [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use French."}]
    assert doc["messages"] == [USER, {"role": "assistant", "content": "Salut"},
                               {"role": "user", "content": [{"type": "text", "text": "encore"},
                                                            {"type": "text", "text": "!"}]}]
    assert (doc["temperature"], doc["top_p"], doc["stop_sequences"]) == (0.2, 0.9, ["END"])
    assert doc["metadata"] == {"user_id": "u1"}
    assert "presence_penalty" not in doc and "seed" not in doc and "n" not in doc


def test_one_system_message_is_a_string():
    doc = messages_request("m", {"messages": [{"role": "system", "content": "S"}, USER]}, False)
    assert doc["system"] == "S"


def test_tools_tool_calls_and_tool_results():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
             {"type": "function", "function": {"name": "now"}}]
    doc = messages_request("m", {"tools": tools, "tool_choice": "required", "messages": [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call.2", "type": "function", "function": {"name": "now", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call.2", "content": [{"type": "text", "text": "noon"}]},
        {"role": "user", "content": "thanks"}]}, False)
    assert doc["tools"] == [{"name": "get_weather", "description": "Weather",
                             "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
                            {"name": "now", "input_schema": {"type": "object", "properties": {}}}]
    assert doc["tool_choice"] == {"type": "any"}
    assert doc["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "now", "input": {}}]}
    assert doc["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": "noon"},
        {"type": "text", "text": "thanks"}]}


@pytest.mark.parametrize("choice,parallel,expected", [
    ("auto", None, {"type": "auto"}), ("none", None, {"type": "none"}),
    ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True})])
def test_tool_choice(choice, parallel, expected):
    body = {"messages": [USER], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": choice}
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert messages_request("m", body, False)["tool_choice"] == expected


def test_images():
    doc = messages_request("m", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}}]}]}, False)
    assert doc["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"), ({}, "messages"), ({"messages": [USER], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [USER], "stop": 3}, "stop"), ({"messages": [USER], "max_tokens": 0}, "max_tokens"),
    ({"messages": [USER], "tools": [{"type": "retrieval"}]}, "tools")])
def test_requests_anthropic_cannot_express_are_400(body, param):
    with pytest.raises(GatewayError) as e:
        messages_request("m", body, False)
    assert e.value.status == 400 and e.value.param == param


# -- whole response -------------------------------------------------------------------------------
def test_response_text_and_usage_with_cache():
    body = (b'{"model":"claude-sonnet-4-5-20250929","id":"msg_01A","type":"message","role":"assistant",'
            b'"content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}],"stop_reason":"end_turn",'
            b'"stop_sequence":null,"usage":{"input_tokens":10,"cache_creation_input_tokens":3,'
            b'"cache_read_input_tokens":20,"output_tokens":5,"service_tier":"standard"}}')
    r = P.chat_response(body)
    doc = json.loads(r.body)
    assert doc["id"] == "msg_01A" and doc["object"] == "chat.completion" and doc["model"] == "claude-sonnet-4-5-20250929"
    assert doc["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hi there", "refusal": None},
                               "logprobs": None, "finish_reason": "stop"}]
    assert doc["usage"] == {"prompt_tokens": 33, "completion_tokens": 5, "total_tokens": 38,
                            "prompt_tokens_details": {"cached_tokens": 20}}
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (33, 5, 38)
    assert r.response_model == "claude-sonnet-4-5-20250929" and r.finish_reasons == ("stop",)


def test_response_tool_use_and_thinking():
    body = json.dumps({"model": "c", "id": "msg_2", "type": "message", "role": "assistant", "content": [
        {"type": "thinking", "thinking": "Need weather.", "signature": "sig"},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "n": 1}}],
        "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 9}}).encode()
    doc = json.loads(P.chat_response(body).body)
    msg = doc["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": None, "refusal": None, "reasoning_content": "Need weather.",
                   "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
                       "name": "get_weather", "arguments": '{"city":"Paris","n":1}'}}]}
    assert doc["choices"][0]["finish_reason"] == "tool_calls"
    assert doc["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}


@pytest.mark.parametrize("reason,finish", [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
                                           ("tool_use", "tool_calls"), ("refusal", "content_filter"),
                                           ("pause_turn", "stop")])
def test_stop_reasons(reason, finish):
    body = json.dumps({"id": "m", "content": [], "stop_reason": reason, "usage": {}}).encode()
    assert P.chat_response(body).finish_reasons == (finish,)


def test_response_not_json_is_502():
    with pytest.raises(GatewayError) as e:
        P.chat_response(b"<html>")
    assert e.value.status == 502


# -- stream ---------------------------------------------------------------------------------------
# The shape of a real capture (the Messages API's compact JSON, its `{"type": "ping"}`).
STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-haiku-4-5-20251001",'
    b'"id":"msg_01K2","type":"message","role":"assistant","content":[],"stop_reason":null,"stop_sequence":null,'
    b'"usage":{"input_tokens":849,"cache_creation_input_tokens":0,"cache_read_input_tokens":100,'
    b'"output_tokens":10,"service_tier":"standard"}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b'event: ping\ndata: {"type": "ping"}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"I\'ll look"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":1,"content_block":'
    b'{"type":"tool_use","id":"toolu_01KF","name":"json","input":{}}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
    b'"partial_json":"{\\"city\\": \\"SF\\""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"}"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
    b'"usage":{"input_tokens":849,"cache_creation_input_tokens":0,"cache_read_input_tokens":100,"output_tokens":47}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def run(data: bytes, include_usage: bool, step: int = 1):
    """Feed ``data`` ``step`` bytes at a time; returns (decoder, [(event name, out bytes, token)])."""
    d = AnthropicStreamDecoder(include_usage)
    parser, outs = SSEParser(), []
    for i in range(0, len(data), step):
        for ev in parser.feed(data[i:i + step]):
            b, kind = d.feed(ev)
            outs.append((ev.event, b, bool(kind & TOKEN)))
    return d, outs


def chunk(d, choices, usage_null=False) -> bytes:
    head = f'{{"id":"msg_01K2","object":"chat.completion.chunk","created":{d.created},"model":"claude-haiku-4-5-20251001",'
    return (b"data: " + head.encode() + b'"choices":' + json.dumps(choices, separators=(",", ":")).encode()
            + (b',"usage":null' if usage_null else b"") + b"}\n\n")


def ch(delta, finish=None):
    return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_byte_by_byte(include_usage):
    d, outs = run(STREAM, include_usage)
    u = include_usage
    expected = [
        ("message_start", chunk(d, ch({"role": "assistant", "content": ""}), u), False),
        ("content_block_start", None, False),
        ("ping", None, False),
        ("content_block_delta", chunk(d, ch({"content": "I'll look"}), u), True),
        ("content_block_stop", None, False),
        ("content_block_start", chunk(d, ch({"tool_calls": [{"index": 0, "id": "toolu_01KF", "type": "function",
                                                             "function": {"name": "json", "arguments": ""}}]}), u), True),
        ("content_block_delta", None, False),  # the empty first fragment
        ("content_block_delta", chunk(d, ch({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "SF"'}}]}), u), True),
        ("content_block_delta", chunk(d, ch({"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}), u), True),
        ("content_block_stop", None, False),
        ("message_delta", chunk(d, ch({}, "tool_calls"), u), False),
    ]
    usage = {"prompt_tokens": 949, "completion_tokens": 47, "total_tokens": 996,
             "prompt_tokens_details": {"cached_tokens": 100}}
    tail = (b'data: {"id":"msg_01K2","object":"chat.completion.chunk","created":%d,"model":"claude-haiku-4-5-20251001",'
            b'"choices":[],"usage":%s}\n\n' % (d.created, json.dumps(usage, separators=(",", ":")).encode())
            if include_usage else b"") + b"data: [DONE]\n\n"
    expected.append(("message_stop", tail, False))
    assert outs == expected
    assert (d.usage.prompt_tokens, d.usage.completion_tokens, d.usage.total_tokens) == (949, 47, 996)
    assert d.done and d.finished and d.finish_reasons == ["tool_calls"]
    assert d.response_model == "claude-haiku-4-5-20251001" and d.error is None
    assert d.end() is None  # message_stop already ended it


def test_stream_in_one_read_gives_the_same_bytes():
    _, slow = run(STREAM, True)
    _, fast = run(STREAM, True, step=len(STREAM))
    assert [o for _, o, _ in slow] == [o for _, o, _ in fast]


def test_stream_thinking_delta_is_reasoning_content():
    data = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","model":"c","usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
            b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n'
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Hmm"}}\n\n'
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQ"}}\n\n')
    d, outs = run(data, False)
    assert [json.loads(o[6:])["choices"][0]["delta"] if o else None for _, o, _ in outs] == [
        {"role": "assistant", "content": ""}, None, {"reasoning_content": "Hmm"}, None]
    assert [t for _, _, t in outs] == [False, False, True, False]
    assert (d.usage.prompt_tokens, d.usage.completion_tokens) == (3, 1)  # what it got so far


def test_stream_error_event():
    data = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","model":"c","usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
            b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n')
    d, outs = run(data, False)
    assert outs[-1] == ("error", None, False)
    assert d.error is not None and d.error.status == 502
    assert d.error.body() == {"error": {"message": "Overloaded", "type": "api_error", "code": "overloaded_error"}}
    assert not d.finished and d.usage.prompt_tokens == 3


def test_stream_end_without_message_stop_adds_done():
    cut = STREAM[:STREAM.index(b"event: message_stop")]
    d, _ = run(cut, True)
    assert d.finished and not d.done
    tail = d.end()
    assert tail.endswith(b"data: [DONE]\n\n") and b'"choices":[]' in tail


def test_stream_ignores_unknown_and_malformed_events():
    d, outs = run(b'event: future_thing\ndata: {"type":"future_thing"}\n\ndata: not json\n\n: comment\n\n', False)
    assert [o for _, o, _ in outs] == [None, None, None]


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("status,atype,otype", [
    (400, "invalid_request_error", "invalid_request_error"), (401, "authentication_error", "authentication_error"),
    (403, "permission_error", "permission_error"), (404, "not_found_error", "not_found_error"),
    (413, "request_too_large", "invalid_request_error"), (429, "rate_limit_error", "rate_limit_error"),
    (500, "api_error", "api_error"), (529, "overloaded_error", "api_error")])
def test_error_envelope(status, atype, otype):
    body = json.dumps({"type": "error", "error": {"type": atype, "message": f"m{status}"}, "request_id": "req_1"}).encode()
    e = P.error_from_response(status, {"retry-after": "7"} if status == 429 else {}, body)
    assert (e.status, e.body()) == (status, {"error": {"message": f"m{status}", "type": otype, "code": atype}})
    assert e.headers == ({"Retry-After": "7"} if status == 429 else {})


def test_error_not_json_keeps_status():
    e = P.error_from_response(503, {}, b"<html>busy</html>")
    assert e.status == 503 and e.type == "api_error" and "503" in e.message
