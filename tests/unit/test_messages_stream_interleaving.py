"""Chat streams whose tool calls interleave, re-encoded as the Messages API's sequential blocks
(:class:`aisix.providers.messages_chat.MessagesEncoder`).

A chat stream may send argument fragments of tool call 0 after call 1 began (parallel calls
interleaved, as vLLM-style servers do: every call's opening chunk first, then fragments round
robin) or text between calls; Messages blocks can't be reopened. Checked here: every event
sequence is well formed (one block open at a time, indexes in order, no delta to a closed
block), the official SDK's own accumulator rebuilds exactly the calls' inputs and the text, and
calls sent one after another still stream live (each fragment out in the chunk that brought it).
"""
from __future__ import annotations

import json
import random

import orjson
import pytest

from aisix.errors import GatewayError
from aisix.providers.messages_chat import MessagesEncoder, _ToolCall
from aisix.sse import SSEParser


def _chunk(delta: dict, finish=None) -> dict:
    return {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _start(k: int, name: str, args: str = "") -> dict:
    return _chunk({"tool_calls": [{"index": k, "id": f"call_{k}", "type": "function",
                                   "function": {"name": name, "arguments": args}}]})


def _args(k: int, frag: str) -> dict:
    return _chunk({"tool_calls": [{"index": k, "function": {"arguments": frag}}]})


def _text(t: str) -> dict:
    return _chunk({"content": t})


FINISH = _chunk({}, "tool_calls")


def _events(data: bytes) -> list[dict]:
    return [orjson.loads(e.data) for e in SSEParser().feed(data)]


def well_formed(evs: list[dict]) -> None:
    """The Messages stream grammar: message_start, then blocks one at a time (start i, deltas to i,
    stop i, with i = 0, 1, 2, ...), then message_delta and message_stop."""
    assert evs[0]["type"] == "message_start" and [e["type"] for e in evs[-2:]] == ["message_delta", "message_stop"]
    open_, nxt = None, 0
    for e in evs[1:-2]:
        if e["type"] == "content_block_start":
            assert open_ is None and e["index"] == nxt, e
            open_, nxt = nxt, nxt + 1
        elif e["type"] == "content_block_delta":
            assert e["index"] == open_, e
        else:
            assert e["type"] == "content_block_stop" and e["index"] == open_, e
            open_ = None
    assert open_ is None


def encode(chunks: list[dict]) -> tuple[list[bytes], bytes]:
    """Each chunk's output, and the whole stream (with the end)."""
    enc = MessagesEncoder()
    outs = [enc.chunk(c) for c in chunks]
    return outs, b"".join(outs) + enc.done()


def accumulate(data: bytes):
    """The Message the official SDK's stream accumulator builds from the events."""
    from anthropic._models import construct_type
    from anthropic.lib.streaming._messages import accumulate_event
    from anthropic.types import RawMessageStreamEvent
    snap, bufs = None, {}
    for obj in _events(data):
        snap = accumulate_event(event=construct_type(type_=RawMessageStreamEvent, value=obj),
                                current_snapshot=snap, json_bufs=bufs)
    return snap


def test_parallel_calls_interleaved_round_robin():
    """Both calls open first, then fragments alternate: call 0 streams live, call 1 is held and
    sent, its fragments as one delta, when call 0's arguments close."""
    chunks = [_chunk({"role": "assistant", "content": ""}), _start(0, "get_weather"), _start(1, "get_time"),
              _args(0, '{"city":'), _args(1, '{"tz":'), _args(0, ' "Paris"'), _args(1, ' "CET"}'),
              _args(0, "}"), FINISH]
    outs, data = encode(chunks)
    evs = _events(data)
    well_formed(evs)
    msg = accumulate(data)
    assert [(b.type, b.name, b.input) for b in msg.content] == [
        ("tool_use", "get_weather", {"city": "Paris"}), ("tool_use", "get_time", {"tz": "CET"})]
    assert [b.id for b in msg.content] == ["call_0", "call_1"]
    assert _events(outs[3]) == [{"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "input_json_delta", "partial_json": '{"city":'}}]
    assert outs[4] == outs[6] == b""  # call 1 held while call 0 is incomplete
    assert [(e["type"], e.get("index")) for e in _events(outs[7])] == [
        ("content_block_delta", 0), ("content_block_stop", 0), ("content_block_start", 1),
        ("content_block_delta", 1), ("content_block_stop", 1)]
    assert _events(outs[7])[3]["delta"]["partial_json"] == '{"tz": "CET"}'


def test_text_after_an_incomplete_call_waits_for_it():
    chunks = [_text("Checking"), _start(0, "f"), _args(0, '{"a":'), _text(" both."), _args(0, "1}"),
              _text(" Done."), FINISH]
    outs, data = encode(chunks)
    well_formed(_events(data))
    msg = accumulate(data)
    assert [(b.type, getattr(b, "text", None) or getattr(b, "input", None)) for b in msg.content] == [
        ("text", "Checking"), ("tool_use", {"a": 1}), ("text", " both. Done.")]
    assert outs[3] == b"" and _events(outs[5]) == [{"type": "content_block_delta", "index": 2,
                                                   "delta": {"type": "text_delta", "text": " Done."}}]


def test_sequential_calls_stream_live():
    """OpenAI's own order (one call after another): every fragment leaves in the chunk that brought it."""
    chunks = [_start(0, "f"), _args(0, '{"x":'), _args(0, "[1, 2]}"), _start(1, "g"), _args(1, '{"y"'),
              _args(1, ': "}"}'), FINISH]
    outs, data = encode(chunks)
    well_formed(_events(data))
    for i in (1, 2, 4, 5):
        assert any(e["type"] == "content_block_delta" for e in _events(outs[i])), i
    assert [e["type"] for e in _events(outs[2])][-1] == "content_block_stop"  # closed once its JSON is whole
    assert [b.input for b in accumulate(data).content] == [{"x": [1, 2]}, {"y": "}"}]


def test_calls_held_until_the_finish_when_the_first_never_completes():
    """A call whose arguments never close (none at all, here) holds the rest until the finish,
    which sends them in order."""
    chunks = [_start(0, "noargs"), _start(1, "g", '{"k":'), _text("between"), _args(1, "true}"), FINISH]
    outs, data = encode(chunks)
    assert outs[1] == outs[2] == outs[3] == b""
    well_formed(_events(data))
    msg = accumulate(data)
    assert [(b.type, getattr(b, "input", None)) for b in msg.content] == [
        ("tool_use", {}), ("tool_use", {"k": True}), ("text", None)]
    assert msg.content[2].text == "between"


def test_whitespace_after_complete_arguments_is_dropped_anything_else_is_a_502():
    outs, data = encode([_start(0, "f", "{}"), _args(0, " \n"), FINISH])
    assert outs[1] == b"" and accumulate(data).content[0].input == {}
    enc = MessagesEncoder()
    enc.chunk(_start(0, "f", '{"a": 1}'))
    with pytest.raises(GatewayError) as e:
        enc.chunk(_args(0, ', "b": 2}'))
    assert e.value.status == 502 and "after a complete JSON value" in e.value.message


@pytest.mark.parametrize("frags", [
    ['{"s": "a\\', '"}', '"}'],              # a backslash ends a fragment: the quote after it is escaped
    ['{"s": "[{\\\\"', ', "t": 1}'],         # an escaped backslash, then a real closing quote
    ['{"s": "}]{["', ', "n": {"m": []}}'],   # brackets inside strings don't count
])
def test_completeness_reads_strings_and_escapes(frags):
    call = _ToolCall("c", "f")
    for f in frags[:-1]:
        call.feed(f)
        assert not call.complete
    call.feed(frags[-1])
    assert call.complete and isinstance(json.loads("".join(frags)), dict)


def _random_stream(rng: random.Random) -> tuple[list[dict], list[dict], str]:
    """Chunks of 1-4 tool calls whose fragments (split anywhere) interleave at random, text runs
    between them; returns (chunks, the calls' inputs in index order, the text)."""
    n = rng.randint(1, 4)
    inputs = [{"q": "".join(rng.choice('ab"\\{}[] ') for _ in range(rng.randint(0, 12))),
               "n": [rng.randint(0, 9) for _ in range(rng.randint(0, 3))]} for _ in range(n)]
    pending = []
    for k, inp in enumerate(inputs):
        s = json.dumps(inp)
        cuts = sorted(rng.sample(range(1, len(s)), min(len(s) - 1, rng.randint(0, 5))))
        pending.append([s[a:b] for a, b in zip([0, *cuts], [*cuts, len(s)])])
    chunks, text, started = [], "", 0
    while started < n or any(pending):
        r = rng.random()
        if r < 0.15:
            t = rng.choice(["x", " y", "z."])
            text += t
            chunks.append(_text(t))
        elif started < n and (r < 0.4 or not any(pending[:started])):
            chunks.append(_start(started, f"tool{started}"))
            started += 1
        else:
            k = rng.choice([i for i in range(started) if pending[i]])
            chunks.append(_args(k, pending[k].pop(0)))
    return chunks + [FINISH], inputs, text


def test_random_interleavings_rebuild_every_input():
    rng = random.Random(1414)
    for _ in range(400):
        chunks, inputs, text = _random_stream(rng)
        _, data = encode(chunks)
        well_formed(_events(data))
        msg = accumulate(data)
        calls = [b for b in msg.content if b.type == "tool_use"]
        assert [b.name for b in calls] == [f"tool{k}" for k in range(len(inputs))]
        assert [b.input for b in calls] == inputs
        assert "".join(b.text for b in msg.content if b.type == "text") == text
