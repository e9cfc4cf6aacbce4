"""aisix.providers.gemini, sans IO: the translators (request, response, ``alt=sse`` stream
decoder, embeddings, errors) byte by byte. End to end: :mod:`tests.e2e.test_gemini_provider`."""
from __future__ import annotations

import base64
import json
import struct

import pytest

from aisix.config.resources import Model
from aisix.errors import GatewayError
from aisix.providers import get_provider
from aisix.providers.base import TOKEN
from aisix.providers.gemini import GeminiStreamDecoder, generate_request
from aisix.providers.gemini_embed import EmbedRequest
from aisix.sse import SSEParser

P = get_provider("gemini")
USER = {"role": "user", "content": "hi"}


def model(**cfg) -> Model:
    return Model(name="g", model="gemini/gemini-2.5-flash", provider_config={"api_key": "AIza-k", **cfg})


# -- request ------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream,suffix", [(False, ":generateContent"), (True, ":streamGenerateContent?alt=sse")])
def test_request_url_and_headers(stream, suffix):
    req = P.chat_request(model(), {"model": "g", "messages": [USER], "stream": stream}, stream, {"traceparent": "00-x"})
    assert req.url == "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash" + suffix
    assert req.headers["x-goog-api-key"] == "AIza-k" and req.headers["traceparent"] == "00-x"
    assert "Authorization" not in req.headers
    assert req.body == b'{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}'


def test_request_api_base_and_prefixed_model():
    m = Model(name="g", model="gemini/models/gemini-2.0-flash", provider_config={"api_base": "http://127.0.0.1:9/v1beta"})
    assert P.chat_request(m, {"messages": [USER]}, False, {}).url == \
        "http://127.0.0.1:9/v1beta/models/gemini-2.0-flash:generateContent"


def test_roles_system_and_generation_config():
    doc = generate_request({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "developer", "content": "French."}, USER,
        {"role": "assistant", "content": "Salut"}, {"role": "user", "content": "encore"},
        {"role": "user", "content": [{"type": "text", "text": "!"}]}],
        "temperature": 0.3, "top_p": 0.8, "max_completion_tokens": 50, "stop": ["X", "Y"], "n": 2,
        "presence_penalty": 0.5, "frequency_penalty": 0.1, "seed": 42, "logprobs": True, "user": "u"})
    assert doc == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}, {"role": "model", "parts": [{"text": "Salut"}]},
                     {"role": "user", "parts": [{"text": "encore"}, {"text": "!"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "French."}]},
        "generationConfig": {"temperature": 0.3, "topP": 0.8, "presencePenalty": 0.5, "frequencyPenalty": 0.1,
                             "seed": 42, "maxOutputTokens": 50, "stopSequences": ["X", "Y"], "candidateCount": 2}}


@pytest.mark.parametrize("rf,cfg", [
    ({"type": "json_object"}, {"responseMimeType": "application/json"}),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
     {"responseMimeType": "application/json", "responseJsonSchema": {"type": "object"}}),
    ({"type": "text"}, None)])
def test_response_format(rf, cfg):
    assert generate_request({"messages": [USER], "response_format": rf}).get("generationConfig") == cfg


def test_tools_function_calls_and_responses():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                              "additionalProperties": False}}},
             {"type": "function", "function": {"name": "now"}}]
    doc = generate_request({"tools": tools, "tool_choice": "auto", "messages": [
        USER,
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_a~CiQBsig", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_a~CiQBsig", "content": '{"temp": -3}'},
        {"role": "tool", "tool_call_id": "call_b", "content": "noon"}]})
    assert doc["tools"] == [{"functionDeclarations": [
        {"name": "get_weather", "description": "Weather", "parametersJsonSchema": tools[0]["function"]["parameters"]},
        {"name": "now"}]}]
    assert doc["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    assert doc["contents"][1:] == [
        {"role": "model", "parts": [{"text": "Checking."},
                                    {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
                                     "thoughtSignature": "CiQBsig"},
                                    {"functionCall": {"name": "now", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": -3}}},
                                   {"functionResponse": {"name": "now", "response": {"output": "noon"}}}]}]


@pytest.mark.parametrize("choice,cfg", [
    ("none", {"mode": "NONE"}), ("required", {"mode": "ANY"}),
    ({"type": "function", "function": {"name": "f"}}, {"mode": "ANY", "allowedFunctionNames": ["f"]})])
def test_tool_choice(choice, cfg):
    doc = generate_request({"messages": [USER], "tools": [{"type": "function", "function": {"name": "f"}}],
                            "tool_choice": choice})
    assert doc["toolConfig"] == {"functionCallingConfig": cfg}


def test_images():
    doc = generate_request({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png?x=1"}},
        {"type": "text", "text": "what?"}]}]})
    assert doc["contents"][0]["parts"] == [{"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
                                           {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/a.png?x=1"}},
                                           {"text": "what?"}]


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0]"),
    ({"messages": [USER], "tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tool_choice")])
def test_requests_gemini_cannot_express_are_400(body, param):
    with pytest.raises(GatewayError) as e:
        generate_request(body)
    assert e.value.status == 400 and e.value.param == param


# -- whole response -------------------------------------------------------------------------------
def test_response_text_and_usage():
    body = b"""{
  "candidates": [
    {
      "content": {"parts": [{"text": "Let me think", "thought": true}, {"text": "Hello"}, {"text": " world"}], "role": "model"},
      "finishReason": "STOP",
      "index": 0
    }
  ],
  "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 11, "totalTokenCount": 1122,
                    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 8}], "thoughtsTokenCount": 1103},
  "modelVersion": "gemini-2.5-flash",
  "responseId": "65E2aavdMaiU1e8P246LmAc"
}
"""
    r = P.chat_response(body)
    doc = json.loads(r.body)
    assert doc["id"] == "65E2aavdMaiU1e8P246LmAc" and doc["model"] == "gemini-2.5-flash"
    assert doc["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello world", "refusal": None,
                                                       "reasoning_content": "Let me think"},
                               "logprobs": None, "finish_reason": "stop"}]
    assert doc["usage"] == {"prompt_tokens": 8, "completion_tokens": 1114, "total_tokens": 1122,
                            "completion_tokens_details": {"reasoning_tokens": 1103}}
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (8, 1114, 1122)
    assert r.response_model == "gemini-2.5-flash" and r.finish_reasons == ("stop",)


def test_response_function_call_cached_and_tool_prompt_tokens():
    body = json.dumps({"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"name": "getWeather", "args": {"location": "Tokyo"}}, "thoughtSignature": "CikBcsj+/="}]},
        "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 83, "candidatesTokenCount": 14, "toolUsePromptTokenCount": 5,
                          "cachedContentTokenCount": 60, "totalTokenCount": 102},
        "modelVersion": "gemini-2.5-flash", "responseId": "qpc2"}).encode()
    doc = json.loads(P.chat_response(body).body)
    ch = doc["choices"][0]
    call = ch["message"]["tool_calls"][0]
    assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] is None
    assert call["id"].startswith("call_") and call["id"].endswith("~CikBcsj+/=")
    assert (call["index"], call["type"], call["function"]) == (0, "function", {"name": "getWeather",
                                                                              "arguments": '{"location":"Tokyo"}'})
    assert doc["usage"] == {"prompt_tokens": 88, "completion_tokens": 14, "total_tokens": 102,
                            "prompt_tokens_details": {"cached_tokens": 60}}


@pytest.mark.parametrize("reason,finish", [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("BLOCKLIST", "content_filter"), ("PROHIBITED_CONTENT", "content_filter"), ("SPII", "content_filter"),
    ("OTHER", "stop"), ("MALFORMED_FUNCTION_CALL", "stop"), ("LANGUAGE", "stop")])
def test_finish_reasons(reason, finish):
    body = json.dumps({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": reason}]}).encode()
    assert P.chat_response(body).finish_reasons == (finish,)


def test_response_several_candidates_and_blocked_prompt():
    body = json.dumps({"candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP", "index": 0},
                                      {"content": {"parts": [{"text": "b"}]}, "finishReason": "MAX_TOKENS", "index": 1}]}).encode()
    doc = json.loads(P.chat_response(body).body)
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in doc["choices"]] == [
        (0, "a", "stop"), (1, "b", "length")]
    assert "usage" not in doc
    blocked = P.chat_response(b'{"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 4, "totalTokenCount": 4}}')
    assert json.loads(blocked.body)["choices"][0]["finish_reason"] == "content_filter"
    assert (blocked.usage.prompt_tokens, blocked.usage.completion_tokens) == (4, 0)


# -- stream (alt=sse: CRLF framing, no terminator) -----------------------------------------------
def ev(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ": ")).encode() + b"\r\n\r\n"


def usage(c, total):
    return {"promptTokenCount": 4, "candidatesTokenCount": c, "totalTokenCount": total,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 4}], "thoughtsTokenCount": 20}


def cand(parts, finish=None):
    c = {"content": {"parts": parts, "role": "model"}}
    if finish:
        c["finishReason"] = finish
    c["index"] = 0
    return c


STREAM = (ev({"candidates": [cand([{"text": "Okay, "}])], "usageMetadata": usage(2, 26), "modelVersion": "gemini-2.5-flash",
              "responseId": "IZI2"})
          + ev({"candidates": [cand([{"text": "let's go"}])], "usageMetadata": usage(5, 29), "modelVersion": "gemini-2.5-flash",
                "responseId": "IZI2"})
          + ev({"candidates": [cand([{"text": ""}], "STOP")], "usageMetadata": usage(6, 30),
                "modelVersion": "gemini-2.5-flash", "responseId": "IZI2"}))


def run(data: bytes, include_usage: bool, step: int = 1):
    d = GeminiStreamDecoder(include_usage)
    parser, outs = SSEParser(), []
    for i in range(0, len(data), step):
        for e in parser.feed(data[i:i + step]):
            b, kind = d.feed(e)
            outs.append((b, bool(kind & TOKEN)))
    return d, outs


def chunk(d, choices, u=False) -> bytes:
    return (f'data: {{"id":"IZI2","object":"chat.completion.chunk","created":{d.created},"model":"gemini-2.5-flash",'
            f'"choices":{json.dumps(choices, separators=(",", ":"))}' + (',"usage":null' if u else "") + "}\n\n").encode()


def ch(delta, finish=None):
    return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_byte_by_byte(include_usage):
    d, outs = run(STREAM, include_usage)
    u = include_usage
    assert outs == [(chunk(d, ch({"role": "assistant", "content": "Okay, "}), u), True),
                    (chunk(d, ch({"content": "let's go"}), u), True),
                    (chunk(d, ch({}, "stop"), u), False)]
    assert (d.usage.prompt_tokens, d.usage.completion_tokens, d.usage.total_tokens) == (4, 26, 30)
    assert d.finished and not d.done and d.finish_reasons == ["stop"] and d.response_model == "gemini-2.5-flash"
    usage_obj = {"prompt_tokens": 4, "completion_tokens": 26, "total_tokens": 30,
                 "completion_tokens_details": {"reasoning_tokens": 20}}
    tail = (b'data: {"id":"IZI2","object":"chat.completion.chunk","created":%d,"model":"gemini-2.5-flash","choices":[],'
            b'"usage":%s}\n\n' % (d.created, json.dumps(usage_obj, separators=(",", ":")).encode()) if u else b"")
    assert d.end() == tail + b"data: [DONE]\n\n"
    assert d.end() is None


def test_stream_in_one_read_gives_the_same_bytes():
    _, slow = run(STREAM, True)
    _, fast = run(STREAM, True, step=len(STREAM))
    assert slow == fast


def test_stream_text_and_finish_in_one_event_and_function_calls():
    data = (ev({"candidates": [cand([{"text": "Hmm", "thought": True}])], "responseId": "r"})
            + ev({"candidates": [cand([{"functionCall": {"name": "a", "args": {"x": 1}}, "thoughtSignature": "sig"},
                                       {"functionCall": {"name": "b", "args": {}}}])]})
            + ev({"candidates": [cand([{"functionCall": {"name": "c", "args": {"y": "z"}}}], "STOP")],
                  "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 9, "totalTokenCount": 12}}))
    d, outs = run(data, False)
    docs = [[json.loads(e[6:]) for e in o.split(b"\n\n") if e] for o, _ in outs]
    assert docs[0][0]["choices"][0]["delta"] == {"role": "assistant", "reasoning_content": "Hmm", "content": ""}
    calls = docs[1][0]["choices"][0]["delta"]["tool_calls"]
    assert [(c["index"], c["type"], c["function"]) for c in calls] == [
        (0, "function", {"name": "a", "arguments": '{"x":1}'}), (1, "function", {"name": "b", "arguments": "{}"})]
    assert calls[0]["id"].endswith("~sig") and "~" not in calls[1]["id"]
    assert [c["choices"][0] for c in docs[2]] == [
        {"index": 0, "delta": {"tool_calls": [{"index": 2, "id": docs[2][0]["choices"][0]["delta"]["tool_calls"][0]["id"],
                                               "type": "function", "function": {"name": "c", "arguments": '{"y":"z"}'}}]},
         "logprobs": None, "finish_reason": None},
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]
    assert [t for _, t in outs] == [True, True, True]
    assert d.finish_reasons == ["tool_calls"] and d.usage.total_tokens == 12


def test_stream_error_event():
    data = ev({"candidates": [cand([{"text": "one"}])], "responseId": "r"}) + ev(
        {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}})
    d, outs = run(data, False)
    assert outs[1] == (None, False)
    assert d.error.status == 502 and d.error.body() == {
        "error": {"message": "The model is overloaded.", "type": "api_error", "code": "UNAVAILABLE"}}


def test_stream_blocked_prompt_and_lf_framing():
    d, outs = run(b'data: {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 3}}\n\n', False)
    assert json.loads(outs[0][0][6:])["choices"] == ch({}, "content_filter") and d.finished


# -- embeddings -----------------------------------------------------------------------------------
def test_embeddings_request():
    req = P.embeddings_request(model(), {"model": "g", "input": ["hello", "wörld!!"], "dimensions": 4}, {})
    assert req.url == "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:batchEmbedContents"
    assert req.headers["x-goog-api-key"] == "AIza-k"
    assert json.loads(req.body) == {"requests": [
        {"model": "models/gemini-2.5-flash", "content": {"parts": [{"text": "hello"}]}, "outputDimensionality": 4},
        {"model": "models/gemini-2.5-flash", "content": {"parts": [{"text": "wörld!!"}]}, "outputDimensionality": 4}]}
    assert isinstance(req, EmbedRequest) and (req.inputs, req.estimated_tokens, req.encode_base64) == (2, 4, False)


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_embeddings_response(fmt):
    req = P.embeddings_request(model(), {"input": "abcdefghi", "encoding_format": fmt}, {})
    r = P.embeddings_response(b'{\n  "embeddings": [\n    {\n      "values": [0.5, -0.25, 0.125]\n    }\n  ]\n}\n', req)
    doc = json.loads(r.body)
    emb = doc["data"][0]["embedding"]
    if fmt == "base64":
        emb = list(struct.unpack("<3f", base64.b64decode(emb)))
    assert emb == [0.5, -0.25, 0.125]
    assert doc["object"] == "list" and doc["model"] == "gemini-2.5-flash" and doc["data"][0]["index"] == 0
    assert doc["usage"] == {"prompt_tokens": 3, "total_tokens": 3}  # ceil(9 chars / 4)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 0, 3)


@pytest.mark.parametrize("body", [{"input": [1, 2, 3]}, {"input": []}, {"input": "x", "encoding_format": "int8"},
                                  {"input": "x", "dimensions": 0}])
def test_embeddings_bad_requests_are_400(body):
    with pytest.raises(GatewayError) as e:
        P.embeddings_request(model(), body, {})
    assert e.value.status == 400


def test_embeddings_count_mismatch_is_502():
    req = P.embeddings_request(model(), {"input": ["a", "b"]}, {})
    with pytest.raises(GatewayError) as e:
        P.embeddings_response(b'{"embeddings": [{"values": [1]}]}', req)
    assert e.value.status == 502


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("status,gstatus,otype", [
    (400, "INVALID_ARGUMENT", "invalid_request_error"), (401, "UNAUTHENTICATED", "authentication_error"),
    (403, "PERMISSION_DENIED", "permission_error"), (404, "NOT_FOUND", "not_found_error"),
    (429, "RESOURCE_EXHAUSTED", "rate_limit_error"), (500, "INTERNAL", "api_error"), (503, "UNAVAILABLE", "api_error")])
def test_error_envelope(status, gstatus, otype):
    body = json.dumps({"error": {"code": status, "message": f"m{status}", "status": gstatus}}, indent=2).encode()
    e = P.error_from_response(status, {}, body)
    assert (e.status, e.body(), e.headers) == (status, {"error": {"message": f"m{status}", "type": otype,
                                                                  "code": gstatus}}, {})


def test_error_retry_info_and_header():
    body = json.dumps({"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure"},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "31.5s"}]}}).encode()
    assert P.error_from_response(429, {}, body).headers == {"Retry-After": "32"}
    assert P.error_from_response(429, {"retry-after": "3"}, body).headers == {"Retry-After": "3"}
    assert P.error_from_response(502, {}, b"<html>bad gateway</html>").status == 502
