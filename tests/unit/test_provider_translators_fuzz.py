"""The translating providers (``anthropic``, ``gemini``) under malformed input.

Every translator entry point (request builders, whole-response and embeddings translators, the
stream decoders, the error translators) is fed seeded random mutations of valid input: a value
replaced by one of another type, a key or element dropped, a subtree moved, a container
wrapped, bytes flipped. Whatever comes in, what comes out is either a normal result in the
OpenAI shape or a :class:`GatewayError` (400 for a client request, 502 for an upstream body or
event, the upstream's own status for an error body), never another exception. Then the cases the
fuzzing found, one by one.
"""
from __future__ import annotations

import copy
import json
import random

import orjson
import pytest

from aisix.config.resources import Model
from aisix.errors import GatewayError
from aisix.providers import get_provider
from aisix.providers.base import ERROR
from aisix.sse import SSEParser
from aisix.upstream.pool import UpstreamRequest

ANTHROPIC = get_provider("anthropic")
GEMINI = get_provider("gemini")
MODELS = {
    "anthropic": Model(name="c", model="anthropic/claude-x", provider_config={"api_key": "k"}),
    "gemini": Model(name="g", model="gemini/gemini-x", provider_config={"api_key": "k"}),
}
TRIALS = 400  # per seed and entry point
SEEDS = [1, 2, 3]

# -- mutation ---------------------------------------------------------------------------------------
HOSTILE = [None, True, False, 0, -1, 7, 1.5, -2.5e30, 2 ** 63, -2 ** 63, "", "x", "STOP", "tool_use", "text",
           "\x00\ud7ff", [], [None], [1, "a"], [[[]]], {}, {"a": None}, {"type": "text"}, {"text": 5},
           {"functionCall": {}}, {"type": "tool_use", "input": []}]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def mutate(obj, rng: random.Random, keep_root_dict: bool = True):
    """A deep copy of ``obj`` with 1 to 3 random mutations."""
    obj = copy.deepcopy(obj)
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(obj))
        path = rng.choice(paths)
        op = rng.random()
        if op < 0.6:
            new = copy.deepcopy(rng.choice(HOSTILE))
        elif op < 0.75:
            new = copy.deepcopy(_get(obj, rng.choice(paths)))  # another part of the document
        elif op < 0.85:
            new = [copy.deepcopy(_get(obj, path))]  # wrapped
        else:
            new = None  # delete
        if not path:
            if not keep_root_dict and new is not None:
                obj = new
            continue
        parent = _get(obj, path[:-1])
        if new is None and op >= 0.85:
            del parent[path[-1]]
        else:
            parent[path[-1]] = new
    return obj


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


# -- what may come out --------------------------------------------------------------------------------
def check_error(e: GatewayError, status: int) -> None:
    assert e.status == status, (e.status, e.message)
    doc = orjson.loads(e.to_bytes())["error"]
    assert isinstance(doc["message"], str) and doc["message"]
    assert doc["code"] is None or isinstance(doc["code"], str)
    assert doc.get("param") is None or isinstance(doc["param"], str)
    for text in (doc["message"], doc["code"] or ""):
        assert "{'" not in text and "['" not in text, text  # no Python repr


def check_message(msg: dict, delta: bool = False) -> None:
    """An OpenAI ``message`` (or stream ``delta``) with fields of the right types."""
    for field in ("content", "reasoning_content", "refusal"):
        if field in msg:
            assert msg[field] is None or isinstance(msg[field], str), msg
    for tc in msg.get("tool_calls") or []:
        assert isinstance(tc["index"] if delta else tc.get("index", 0), int)
        fn = tc["function"]
        if "name" in fn or not delta:
            assert isinstance(fn["name"], str) and fn["name"], tc
        assert isinstance(fn.get("arguments", ""), str), tc
        if "id" in tc or not delta:
            assert isinstance(tc["id"], str), tc


def check_completion(body: bytes) -> None:
    doc = orjson.loads(body)
    assert isinstance(doc["id"], str) and isinstance(doc["model"], str)
    for c in doc["choices"]:
        assert isinstance(c["index"], int) and isinstance(c["finish_reason"], str)
        check_message(c["message"])
    if "usage" in doc:
        assert all(isinstance(doc["usage"][k], int) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))


def check_chunks(data: bytes) -> None:
    """``data: {chunk}\\n\\n`` events (and ``data: [DONE]``), each chunk well typed."""
    assert data.endswith(b"\n\n")
    for block in data[:-2].split(b"\n\n"):
        assert block.startswith(b"data: "), block
        if block == b"data: [DONE]":
            continue
        doc = orjson.loads(block[6:])
        assert isinstance(doc["id"], str) and isinstance(doc["model"], str)
        for c in doc["choices"]:
            assert isinstance(c["index"], int)
            assert c["finish_reason"] is None or isinstance(c["finish_reason"], str)
            check_message(c["delta"], delta=True)


def run_request(provider, body: dict, op: str = "chat", stream: bool = False) -> None:
    model = MODELS[provider.name]
    try:
        if op == "chat":
            req = provider.chat_request(model, body, stream, {})
        else:
            req = provider.embeddings_request(model, body, {})
    except GatewayError as e:
        check_error(e, 400)
        return
    assert isinstance(req, UpstreamRequest)
    assert isinstance(orjson.loads(req.body), dict)


def run_response(fn, body: bytes) -> None:
    try:
        result = fn(body)
    except GatewayError as e:
        check_error(e, 502)
        return
    check_completion(result.body) if b'"choices"' in result.body else orjson.loads(result.body)


def run_stream(decoder, data: bytes) -> None:
    parser = SSEParser()
    for ev in parser.feed(data):
        out, kind = decoder.feed(ev)
        if kind & ERROR:
            check_error(decoder.error, 502)
            return
        if out is not None:
            check_chunks(out)
    end = decoder.end()
    if end is not None:
        check_chunks(end)


def run_error(provider, status: int, body: bytes) -> None:
    e = provider.error_from_response(status, {"retry-after": "1"} if status == 429 else {}, body)
    assert isinstance(e, GatewayError)
    check_error(e, status)


# -- valid input ------------------------------------------------------------------------------------
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_SCHEMA}}]
CHAT = {
    "model": "x", "temperature": 0.3, "top_p": 0.9, "max_tokens": 100, "stop": ["END"], "user": "u1", "n": 1,
    "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "parallel_tool_calls": False,
    "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}},
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "French."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                                     {"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "SF"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
        {"role": "user", "content": "thanks"},
    ],
}
EMBED = {"model": "x", "input": ["a", "bc"], "dimensions": 8, "encoding_format": "base64"}

ANTHROPIC_RESPONSE = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
    "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "Hi"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "SF"}}],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 10, "cache_creation_input_tokens": 1, "cache_read_input_tokens": 2, "output_tokens": 5},
}
ANTHROPIC_EVENTS = [
    {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x", "content": [],
                                          "usage": {"input_tokens": 10, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1",
                                                                   "name": "get_weather", "input": {}}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city"'}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ': "SF"}'}},
    {"type": "content_block_stop", "index": 1},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
    {"type": "message_stop"},
]
ANTHROPIC_ERROR = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}, "request_id": "r"}

GEMINI_RESPONSE = {
    "candidates": [
        {"content": {"role": "model", "parts": [{"text": "think", "thought": True}, {"text": "Hi"},
                                                {"functionCall": {"name": "get_weather", "args": {"city": "SF"}},
                                                 "thoughtSignature": "sig"}]},
         "finishReason": "STOP", "index": 0},
        {"content": {"role": "model", "parts": [{"text": "Other"}]}, "finishReason": "MAX_TOKENS", "index": 1}],
    "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 4, "thoughtsTokenCount": 2,
                      "cachedContentTokenCount": 1, "totalTokenCount": 14},
    "promptFeedback": {"blockReason": "SAFETY"},
    "modelVersion": "gemini-x", "responseId": "r1",
}
GEMINI_EVENTS = [
    {"candidates": [{"content": {"parts": [{"text": "Hi", "thought": True}]}, "index": 0}], "responseId": "r1",
     "modelVersion": "gemini-x", "usageMetadata": {"promptTokenCount": 3}},
    {"candidates": [{"content": {"parts": [{"text": " there"}, {"functionCall": {"name": "f", "args": {"a": 1}}}]},
                     "index": 0}]},
    {"candidates": [{"content": {"parts": [{"text": ""}]}, "finishReason": "STOP", "index": 0}],
     "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5}},
    {"promptFeedback": {"blockReason": "SAFETY"}},
]
GEMINI_ERROR = {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED", "details": [
    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "31.5s"}]}}
GEMINI_EMBEDDINGS = {"embeddings": [{"values": [0.5, -0.25, 1]}, {"values": [0.0, 2.0, 3.5]}]}


def _sse(events: list, named: bool) -> bytes:
    out = b""
    for e in events:
        name = e.get("type") if named and isinstance(e, dict) and isinstance(e.get("type"), str) else None
        out += (b"event: " + name.encode() + b"\n" if name else b"") + b"data: " + orjson.dumps(e) + b"\n\n"
    return out


# -- the fuzzing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["anthropic", "gemini"])
def test_fuzz_chat_request(name, seed):
    rng = random.Random(seed)
    provider = get_provider(name)
    run_request(provider, CHAT)
    for _ in range(TRIALS):
        run_request(provider, mutate(CHAT, rng), stream=rng.random() < 0.5)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_gemini_embeddings_request(seed):
    rng = random.Random(seed)
    run_request(GEMINI, EMBED, "embeddings")
    for _ in range(TRIALS):
        run_request(GEMINI, mutate(EMBED, rng), "embeddings")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name,valid", [("anthropic", ANTHROPIC_RESPONSE), ("gemini", GEMINI_RESPONSE)])
def test_fuzz_chat_response(name, valid, seed):
    rng = random.Random(seed)
    provider = get_provider(name)
    check_completion(provider.chat_response(orjson.dumps(valid)).body)
    for i in range(TRIALS):
        body = orjson.dumps(mutate(valid, rng, keep_root_dict=False))
        run_response(provider.chat_response, flip_bytes(body, rng) if i % 10 == 0 else body)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_gemini_embeddings_response(seed):
    rng = random.Random(seed)
    for fmt in ("float", "base64"):
        req = GEMINI.embeddings_request(MODELS["gemini"], {"input": ["a", "b"], "encoding_format": fmt}, {})
        GEMINI.embeddings_response(orjson.dumps(GEMINI_EMBEDDINGS), req)
        for i in range(TRIALS // 2):
            body = orjson.dumps(mutate(GEMINI_EMBEDDINGS, rng, keep_root_dict=False))
            run_response(lambda b: GEMINI.embeddings_response(b, req), flip_bytes(body, rng) if i % 10 == 0 else body)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name,events", [("anthropic", ANTHROPIC_EVENTS), ("gemini", GEMINI_EVENTS)])
def test_fuzz_stream(name, events, seed):
    rng = random.Random(seed)
    provider = get_provider(name)
    run_stream(provider.stream_decoder(True), _sse(events, name == "anthropic"))
    for _ in range(TRIALS):
        evs = copy.deepcopy(events)
        for _ in range(rng.randint(1, 2)):
            i = rng.randrange(len(evs))
            evs[i] = mutate(evs[i], rng, keep_root_dict=False)
        run_stream(provider.stream_decoder(rng.random() < 0.5), _sse(evs, name == "anthropic"))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name,valid", [("anthropic", ANTHROPIC_ERROR), ("gemini", GEMINI_ERROR)])
def test_fuzz_error_body(name, valid, seed):
    rng = random.Random(seed)
    provider = get_provider(name)
    for i in range(TRIALS):
        body = orjson.dumps(mutate(valid, rng, keep_root_dict=False))
        run_error(provider, rng.choice([400, 401, 429, 500, 503]), flip_bytes(body, rng) if i % 10 == 0 else body)


# -- what the fuzzing found ----------------------------------------------------------------------------
USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("name", ["anthropic", "gemini"])
@pytest.mark.parametrize("body,param", [
    ({"messages": [USER, {"role": "assistant", "content": "x", "tool_calls": True}]}, "messages[1].tool_calls"),
    ({"messages": [USER, {"role": "assistant", "content": "x", "tool_calls": 5}]}, "messages[1].tool_calls"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": {"id": "a"}}]}, "messages[1].tool_calls"),
    ({"messages": {"role": "user", "content": "hi"}}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [USER, "hi"]}, "messages[1]"),
    ({"messages": [{"role": "user", "content": [5]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content"),
    ({"messages": [USER], "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
     "tools[0].function.parameters"),
    ({"messages": [USER], "tools": TOOLS, "tool_choice": {"type": "function", "function": "get_weather"}},
     "tool_choice"),
])
def test_malformed_client_requests_are_400_naming_the_field(name, body, param):
    with pytest.raises(GatewayError) as e:
        get_provider(name).chat_request(MODELS[name], body, False, {})
    assert (e.value.status, e.value.type, e.value.param) == (400, "invalid_request_error", param), e.value.message


def test_gemini_json_schema_that_is_not_an_object_is_400():
    with pytest.raises(GatewayError) as e:
        GEMINI.chat_request(MODELS["gemini"], {"messages": [USER], "response_format": {
            "type": "json_schema", "json_schema": "nope"}}, False, {})
    assert (e.value.status, e.value.param) == (400, "response_format.json_schema")


def test_request_nested_too_deeply_to_encode_is_400():
    deep: dict = {}
    for _ in range(300):
        deep = {"a": deep}
    tools = [{"type": "function", "function": {"name": "f", "parameters": deep}}]
    for provider in (ANTHROPIC, GEMINI):
        with pytest.raises(GatewayError) as e:
            provider.chat_request(MODELS[provider.name], {"messages": [USER], "tools": tools}, False, {})
        assert e.value.status == 400


@pytest.mark.parametrize("body", [
    {"content": True}, {"content": 5}, {"content": [{"type": "text", "text": 5}]},
    {"content": [{"type": "thinking", "thinking": ["x"]}]}, {"content": [{"type": "tool_use", "input": {}}]},
    {"content": [{"type": "tool_use", "name": "f", "input": [1]}]},
])
def test_anthropic_malformed_response_is_502(body):
    with pytest.raises(GatewayError) as e:
        ANTHROPIC.chat_response(orjson.dumps(body))
    assert e.value.status == 502 and e.value.code == "upstream_malformed_response" and "malformed" in e.value.message


@pytest.mark.parametrize("body", [
    {"stop_reason": ["end_turn"], "content": []}, {"stop_reason": {}, "usage": [1], "id": 5, "model": 7},
    {"usage": "lots"}, {"content": [5, None, {"type": "text", "text": "ok"}]},
])
def test_anthropic_malformed_metadata_is_ignored(body):
    doc = orjson.loads(ANTHROPIC.chat_response(orjson.dumps(body)).body)
    check_completion(orjson.dumps(doc))
    assert doc["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("event", [
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": {"a": 1}}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": 1}},
    {"type": "content_block_delta", "index": 0, "delta": "text"},
    {"type": "content_block_start", "index": [1], "content_block": {"type": "tool_use", "id": "t", "name": "f"}},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "name": 5}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": 5}},
    {"type": "content_block_start", "index": 0, "content_block": 5},
    {"type": "message_delta", "delta": 5},
    {"type": "message_start", "message": []},
])
def test_anthropic_malformed_stream_event_is_a_502_error(event):
    d = ANTHROPIC.stream_decoder(False)
    first = _sse([ANTHROPIC_EVENTS[0]], True)
    data = first + _sse([event], True) + _sse(ANTHROPIC_EVENTS[-1:], True)
    outs = []
    for ev in SSEParser().feed(data):
        b, kind = d.feed(ev)
        outs.append(b)
        if d.error:
            break
    assert outs[0] is not None and outs[-1] is None and kind == ERROR
    assert d.error.status == 502 and "malformed" in d.error.message


@pytest.mark.parametrize("event", [
    {"type": "message_delta", "delta": {"stop_reason": ["end_turn"]}},
    {"type": "message_delta", "delta": {"stop_reason": {"x": 1}}, "usage": [5]},
])
def test_anthropic_stream_unhashable_stop_reason_is_stop(event):
    d = ANTHROPIC.stream_decoder(False)
    out, _ = d.feed(SSEParser().feed(_sse([event], True))[0])
    assert d.error is None and json.loads(out[6:])["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body", [
    {"candidates": True}, {"candidates": 5}, {"candidates": [{"content": {"parts": 5}}]},
    {"candidates": [{"content": 5}]}, {"candidates": [{"content": {"parts": [{"text": 5}]}}]},
    {"candidates": [{"content": {"parts": [{"functionCall": {"args": {}}}]}}]},
    {"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": [1]}}]}}]},
    {"candidates": [{"content": {"parts": [{"functionCall": "f"}]}}]},
])
def test_gemini_malformed_response_is_502(body):
    with pytest.raises(GatewayError) as e:
        GEMINI.chat_response(orjson.dumps(body))
    assert e.value.status == 502 and e.value.code == "upstream_malformed_response" and "malformed" in e.value.message


def test_gemini_malformed_metadata_is_ignored():
    body = {"candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": ["STOP"], "index": [0]},
                           {"content": {"parts": [{"text": "b"}]}, "finishReason": {"x": 1}, "index": "1"}],
            "responseId": {"id": 1}, "modelVersion": 5, "usageMetadata": [1]}
    doc = orjson.loads(GEMINI.chat_response(orjson.dumps(body)).body)
    check_completion(orjson.dumps(doc))
    assert [(c["index"], c["finish_reason"]) for c in doc["choices"]] == [(0, "stop"), (1, "stop")]
    assert doc["id"].startswith("chatcmpl-") and doc["model"] == ""


@pytest.mark.parametrize("event", [
    {"candidates": 5}, {"candidates": [{"index": [0], "content": {"parts": [{"text": "x"}]}}], "x": 1},
    {"candidates": [{"content": {"parts": [{"text": 5}]}}]},
    {"candidates": [{"content": {"parts": [{"functionCall": {"name": None}}]}}]},
    {"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": ["STOP"]}]},
])
def test_gemini_stream_never_crashes(event):
    d = GEMINI.stream_decoder(True)
    out, kind = d.feed(SSEParser().feed(_sse([event], False))[0])
    if kind & ERROR:
        assert d.error.status == 502 and out is None
    else:
        check_chunks(out)


@pytest.mark.parametrize("values", [["a"], [None], [[1.0]], [True], [1e300]])
def test_gemini_embedding_values_that_are_not_float32_are_502(values):
    req = GEMINI.embeddings_request(MODELS["gemini"], {"input": "a", "encoding_format": "base64"}, {})
    with pytest.raises(GatewayError) as e:
        GEMINI.embeddings_response(orjson.dumps({"embeddings": [{"values": values}]}), req)
    assert e.value.status == 502


@pytest.mark.parametrize("delay", ["nans", "infs", "-infs", "1e999s"])
def test_gemini_retry_delay_that_is_not_finite_is_ignored(delay):
    body = orjson.dumps({"error": {"code": 429, "message": "quota", "details": [{"retryDelay": delay}]}})
    e = GEMINI.error_from_response(429, {}, body)
    assert e.status == 429 and e.headers == {}


# -- error fields never carry Python reprs ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["anthropic", "gemini"])
@pytest.mark.parametrize("err,message,code", [
    ({"message": {"text": "busy"}, "code": {"reason": "x"}}, '{"text":"busy"}', '{"reason":"x"}'),
    ({"message": ["a", 1], "code": [1, 2]}, '["a",1]', "[1,2]"),
    ({"message": 5, "code": 503}, "5", "503"),
    ({"message": None, "code": True}, "upstream NAME answered HTTP 503", "true"),
])
def test_error_body_fields_that_are_not_strings_are_json_text(name, err, message, code):
    e = get_provider(name).error_from_response(503, {}, orjson.dumps({"error": err}))
    assert (e.status, e.message, e.code) == (503, message.replace("NAME", name), code)


@pytest.mark.parametrize("name,event", [
    ("anthropic", {"type": "error", "error": {"type": "overloaded_error", "message": {"detail": "busy"}}}),
    ("gemini", {"error": {"code": 503, "message": {"detail": "busy"}, "status": "UNAVAILABLE"}}),
])
def test_stream_error_message_that_is_not_a_string_is_json_text(name, event):
    d = get_provider(name).stream_decoder(False)
    d.feed(SSEParser().feed(_sse([event], name == "anthropic"))[0])
    assert d.error.status == 502 and d.error.message == '{"detail":"busy"}'
