"""The entry translators under malformed input, fuzzed as the providers are (tests/unit/test_provider_translators_fuzz.py).

Messages and Responses requests, chat answers and chat chunk streams, and the native streams the
pass-through decoders read, each fed seeded random mutations of valid input. What comes out is
a normal result of the client API's shape or a :class:`GatewayError` (400 for a client request,
502 for an upstream body or event), never another exception.
"""
from __future__ import annotations

import copy
import random

import orjson
import pytest

from aisix.errors import GatewayError
from aisix.providers.base import ERROR, ChatResult
from aisix.providers.messages_chat import MessagesEncoder, message_result
from aisix.providers.messages_chat import chat_body as messages_chat_body
from aisix.providers.openai import OpenAIStreamDecoder
from aisix.providers.passthrough import (
    AnthropicEventsDecoder,
    ResponsesEventsDecoder,
    anthropic_result,
    responses_result,
)
from aisix.providers.reencode import ReencodingDecoder
from aisix.providers.responses_chat import ResponsesEncoder, response_result
from aisix.providers.responses_chat import chat_body as responses_chat_body
from aisix.sse import SSEParser
from tests.unit.test_messages_translation import CHAT_CHUNKS, CHAT_RESPONSE
from tests.unit.test_provider_translators_fuzz import (
    ANTHROPIC_EVENTS,
    ANTHROPIC_RESPONSE,
    SEEDS,
    TRIALS,
    _sse,
    check_error,
    flip_bytes,
    mutate,
)

MESSAGES_REQUEST = {
    "model": "m", "max_tokens": 100, "system": [{"type": "text", "text": "Brief."}], "temperature": 0.2,
    "stop_sequences": ["END"], "metadata": {"user_id": "u"}, "tool_choice": {"type": "tool", "name": "f"},
    "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x"}}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                          {"type": "text", "text": "ok"},
                                          {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"},
                                     {"type": "text", "text": "thanks"}]}]}
RESPONSES_REQUEST = {
    "model": "m", "instructions": "Brief.", "max_output_tokens": 50, "reasoning": {"effort": "low"},
    "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
    "tool_choice": {"type": "function", "name": "f"}, "text": {"format": {"type": "json_schema", "name": "s",
                                                                          "schema": {"type": "object"}}},
    "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"},
                                           {"type": "input_image", "image_url": "https://x/y.png"}]},
              {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
              {"type": "function_call_output", "call_id": "c1", "output": "r"}]}
RESPONSES_EVENTS = [
    {"type": "response.created", "sequence_number": 0, "response": {"id": "r", "status": "in_progress"}},
    {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "m", "output_index": 0, "delta": "Hi"},
    {"type": "response.completed", "sequence_number": 2, "response": {
        "id": "r", "status": "completed", "model": "gpt", "usage": {"input_tokens": 3, "output_tokens": 1,
                                                                  "total_tokens": 4}}}]
RESPONSE = {"id": "r", "object": "response", "status": "completed", "model": "gpt", "output": [],
            "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}}


def run_request(fn, body) -> None:
    try:
        out = fn(body)
    except GatewayError as e:
        check_error(e, 400)
        return
    assert isinstance(orjson.loads(orjson.dumps(out)), dict)


def run_result(fn, body: bytes) -> None:
    try:
        r = fn(body)
    except GatewayError as e:
        check_error(e, 502)
        return
    assert isinstance(orjson.loads(r.body), dict)


def check_events(data: bytes) -> None:
    """Named SSE events whose data is a JSON object of that ``type`` (comments pass as they are)."""
    for ev in SSEParser().feed(data):
        if ev.data is not None:
            obj = orjson.loads(ev.data)
            assert ev.event == obj["type"], ev


def run_stream(decoder, data: bytes, check=check_events) -> None:
    for ev in SSEParser().feed(data):
        out, kind = decoder.feed(ev)
        if kind & ERROR:
            check_error(decoder.error, decoder.error.status)
            assert decoder.error.status in (400, 401, 403, 404, 429, 500, 502, 503, 504, 529)
            return
        if out:
            check(out)
    end = decoder.end()
    if end:
        check(end)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn,valid", [(messages_chat_body, MESSAGES_REQUEST), (responses_chat_body, RESPONSES_REQUEST)])
def test_fuzz_requests(fn, valid, seed):
    rng = random.Random(seed)
    run_request(fn, valid)
    for _ in range(TRIALS):
        run_request(fn, mutate(valid, rng))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn", [lambda b: message_result(ChatResult(b, None)),
                                lambda b: response_result(ChatResult(b, None), {"model": "m"})])
def test_fuzz_chat_answers(fn, seed):
    rng = random.Random(seed)
    run_result(fn, orjson.dumps(CHAT_RESPONSE))
    for i in range(TRIALS):
        body = orjson.dumps(mutate(CHAT_RESPONSE, rng, keep_root_dict=False))
        run_result(fn, flip_bytes(body, rng) if i % 10 == 0 else body)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn,valid", [(anthropic_result, ANTHROPIC_RESPONSE), (responses_result, RESPONSE)])
def test_fuzz_native_answers(fn, valid, seed):
    rng = random.Random(seed)
    for i in range(TRIALS):
        body = orjson.dumps(mutate(valid, rng, keep_root_dict=False))
        run_result(fn, flip_bytes(body, rng) if i % 10 == 0 else body)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("encoder", [MessagesEncoder, lambda: ResponsesEncoder({"model": "m"})])
def test_fuzz_reencoded_chat_stream(encoder, seed):
    rng = random.Random(seed)
    run_stream(ReencodingDecoder(OpenAIStreamDecoder(True), encoder()), _sse(CHAT_CHUNKS, False) + b"data: [DONE]\n\n")
    for _ in range(TRIALS):
        evs = copy.deepcopy(CHAT_CHUNKS)
        for _ in range(rng.randint(1, 2)):
            i = rng.randrange(len(evs))
            evs[i] = mutate(evs[i], rng, keep_root_dict=False)
        run_stream(ReencodingDecoder(OpenAIStreamDecoder(True), encoder()), _sse(evs, False) + b"data: [DONE]\n\n")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("decoder,events", [(AnthropicEventsDecoder, ANTHROPIC_EVENTS),
                                            (ResponsesEventsDecoder, RESPONSES_EVENTS)])
def test_fuzz_passthrough_streams_relay_every_event_as_sent(decoder, events, seed):
    rng = random.Random(seed)
    for _ in range(TRIALS):
        evs = copy.deepcopy(events)
        for _ in range(rng.randint(1, 2)):
            i = rng.randrange(len(evs))
            evs[i] = mutate(evs[i], rng, keep_root_dict=False)
        data = _sse(evs, True)
        d, out = decoder(), []
        for ev in SSEParser().feed(data):
            b, kind = d.feed(ev)
            if kind & ERROR:
                check_error(d.error, d.error.status)
                break
            out.append(b)
        else:
            assert b"".join(out) == data  # whatever the events hold, they pass as sent
