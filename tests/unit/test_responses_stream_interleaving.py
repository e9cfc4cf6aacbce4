"""Chat streams whose tool calls interleave, re-encoded as the Responses API's events
(:class:`aisix.providers.responses_chat.ResponsesEncoder`).

A chat stream may send argument fragments of tool call 0 after call 1 began (parallel calls
interleaved, as vLLM-style servers do) or text and reasoning between calls. Responses deltas name
their item, so they go out live; an item closes (its ``.done`` events) only once nothing more can
come for it. Checked here: every event sequence is well formed (items added in output order, every
delta to an open item and before its ``.done``, each ``.done`` carrying the item's whole text or
arguments, ``response.completed`` agreeing), the official SDK's own stream state accepts it and
rebuilds exactly the calls, and fragments still leave in the chunk that brought them.
"""
from __future__ import annotations

import json
import random

import openai
import orjson
import pytest
from openai._models import construct_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from aisix.errors import GatewayError
from aisix.providers.responses_chat import ResponsesEncoder
from aisix.sse import SSEParser
from tests.unit.test_messages_stream_interleaving import (
    FINISH,
    _args,
    _chunk,
    _start,
    _text,
)
from tests.unit.test_messages_stream_interleaving import (
    _random_stream as messages_random_stream,
)

#: An item kind's delta event, its ``.done`` event and the field that carries the whole text there.
KINDS = {"message": ("response.output_text.delta", "response.output_text.done", "text"),
         "reasoning": ("response.reasoning_summary_text.delta", "response.reasoning_summary_text.done", "text"),
         "function_call": ("response.function_call_arguments.delta", "response.function_call_arguments.done",
                           "arguments")}
#: Events that only open or close a part of an item.
PARTS = ("response.content_part.added", "response.content_part.done", "response.reasoning_summary_part.added",
         "response.reasoning_summary_part.done")


def _reasoning(t: str) -> dict:
    return _chunk({"reasoning_content": t})


def _events(data: bytes) -> list[dict]:
    evs = [(e.event, orjson.loads(e.data)) for e in SSEParser().feed(data)]
    assert all(name == obj["type"] for name, obj in evs)
    return [obj for _, obj in evs]


def encode(chunks: list[dict]) -> tuple[list[bytes], bytes]:
    """Each chunk's output, and the whole stream (with the end)."""
    enc = ResponsesEncoder({"model": "m", "input": "x"})
    outs = [enc.chunk(c) for c in chunks]
    return outs, b"".join(outs) + enc.done()


def _item_event(e: dict, items: dict, closed: set) -> None:
    """One event inside an item: it names an added item, still open, of the right kind."""
    i = e["output_index"]
    assert i in items and i not in closed, e
    it = items[i]
    assert e["item_id"] == it["id"], e
    delta, done, field = KINDS[it["type"]]
    if e["type"] == delta:
        assert not it["closed_text"], e  # no delta after the item's .done
        it["text"] += e["delta"]
    elif e["type"] == done:
        assert not it["closed_text"] and e[field] == it["text"], e  # the whole text / arguments
        it["closed_text"] = True
    else:
        assert e["type"] in PARTS, e


def well_formed(evs: list[dict]) -> dict[int, dict]:
    """The Responses stream grammar, checked; returns output index → the item's final state."""
    assert [e["type"] for e in evs[:2]] == ["response.created", "response.in_progress"]
    assert evs[-1]["type"] in ("response.completed", "response.incomplete")
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    items, closed = {}, set()
    for e in evs[2:-1]:
        if e["type"] == "response.output_item.added":
            assert e["output_index"] == len(items), e  # numbered in the order they begin
            items[e["output_index"]] = {**e["item"], "text": "", "closed_text": False}
        elif e["type"] == "response.output_item.done":
            it = items[e["output_index"]]
            assert it["closed_text"] and e["output_index"] not in closed, e
            assert e["item"]["id"] == it["id"] and e["item"].get("arguments", it["text"]) == it["text"], e
            closed.add(e["output_index"])
            it["final"] = e["item"]
        else:
            _item_event(e, items, closed)
    assert closed == set(items)  # every item closed before the end
    assert evs[-1]["response"]["output"] == [items[i]["final"] for i in range(len(items))]
    return items


def sdk_state(evs: list[dict]) -> tuple[ResponseStreamState, dict[int, str], dict[int, str]]:
    """The official SDK's stream state fed every event (it raises on sequences it refuses), with
    per output index the arguments its accumulator built from the deltas (the last delta's
    ``snapshot``) and those its ``function_call_arguments.done`` event carried."""
    state = ResponseStreamState(input_tools=openai.omit, text_format=openai.omit)
    built, done = {}, {}
    for obj in evs:
        for ev in state.handle_event(construct_type(type_=ResponseStreamEvent, value=obj)):
            if ev.type == "response.function_call_arguments.delta":
                assert ev.output_index not in done, ev  # not after its .done
                built[ev.output_index] = ev.snapshot
            elif ev.type == "response.function_call_arguments.done":
                done[ev.output_index] = ev.arguments
    return state, built, done


def _kinds(outs: bytes) -> list[tuple[str, int | None]]:
    return [(e["type"], e.get("output_index")) for e in _events(outs)]


def test_parallel_calls_interleaved_round_robin():
    """Both calls open first, then fragments alternate: each goes out live to its own item; call 1
    closes when its arguments are whole (before call 0), call 0 at its own last fragment."""
    chunks = [_chunk({"role": "assistant", "content": ""}), _start(0, "get_weather"), _start(1, "get_time"),
              _args(0, '{"city":'), _args(1, '{"tz":'), _args(0, ' "Paris"'), _args(1, ' "CET"}'),
              _args(0, "}"), FINISH]
    outs, data = encode(chunks)
    evs = _events(data)
    items = well_formed(evs)
    assert [(it["type"], it["name"], it["call_id"]) for it in items.values()] == [
        ("function_call", "get_weather", "call_0"), ("function_call", "get_time", "call_1")]
    for i, k in ((3, 0), (4, 1), (5, 0)):
        assert _kinds(outs[i]) == [("response.function_call_arguments.delta", k)], i
    assert _kinds(outs[6]) == [("response.function_call_arguments.delta", 1),
                               ("response.function_call_arguments.done", 1), ("response.output_item.done", 1)]
    assert _kinds(outs[7]) == [("response.function_call_arguments.delta", 0),
                               ("response.function_call_arguments.done", 0), ("response.output_item.done", 0)]
    assert outs[8] == b""  # nothing left open at the finish
    state, built, done = sdk_state(evs)
    assert built == done == {0: '{"city": "Paris"}', 1: '{"tz": "CET"}'}
    final = state._completed_response
    assert [(o.name, json.loads(o.arguments)) for o in final.output] == [("get_weather", {"city": "Paris"}),
                                                                         ("get_time", {"tz": "CET"})]


def test_text_and_reasoning_between_incomplete_calls():
    """A call's fragments don't end a text run; a new call or the other kind of run does. Text while
    a call is open is its own item, streamed live, and the call still closes whole."""
    chunks = [_reasoning("Think."), _start(0, "f"), _args(0, '{"a":'), _text("Check"), _args(0, " 1"),
              _text("ing."), _reasoning(" More."), _args(0, "}"), _text(" Done."), _start(1, "g", "{}"), FINISH]
    outs, data = encode(chunks)
    evs = _events(data)
    items = well_formed(evs)
    assert [(it["type"], it["text"]) for it in items.values()] == [
        ("reasoning", "Think."), ("function_call", '{"a": 1}'), ("message", "Checking."), ("reasoning", " More."),
        ("message", " Done."), ("function_call", "{}")]
    assert _kinds(outs[3])[-1] == ("response.output_text.delta", 2) and \
        ("response.output_item.done", 1) not in _kinds(outs[3])  # text live, call 1 still open
    assert _kinds(outs[5]) == [("response.output_text.delta", 2)]  # the same message item
    assert ("response.output_item.done", 1) in _kinds(outs[7])
    state, built, done = sdk_state(evs)
    assert built == done == {1: '{"a": 1}', 5: "{}"}
    assert state._completed_response.output_text == "Checking. Done."


def test_sequential_calls_close_at_their_last_fragment():
    """OpenAI's own order: every fragment leaves in the chunk that brought it, and a call's
    ``.done`` events leave with its closing bracket, before the next call is added."""
    chunks = [_text("Both:"), _start(0, "f"), _args(0, '{"x":'), _args(0, "[1, 2]}"), _start(1, "g"),
              _args(1, '{"y"'), _args(1, ': "}"}'), FINISH]
    outs, data = encode(chunks)
    evs = _events(data)
    well_formed(evs)
    assert _kinds(outs[1])[:2] == [("response.output_text.done", 0), ("response.content_part.done", 0)]
    assert _kinds(outs[3])[-1] == ("response.output_item.done", 1)
    assert _kinds(outs[6])[-1] == ("response.output_item.done", 2)
    _, built, done = sdk_state(evs)
    assert built == done == {1: '{"x":[1, 2]}', 2: '{"y": "}"}'}


def test_calls_that_never_complete_close_at_the_finish_in_output_order():
    """A call without arguments, and one cut by the length limit: both stay open until the finish,
    which closes them in output order with what they got; the response is incomplete."""
    chunks = [_start(0, "noargs"), _start(1, "g", '{"k": [1,'), _text("between"), _args(1, " 2"),
              _chunk({}, "length")]
    outs, data = encode(chunks)
    evs = _events(data)
    items = well_formed(evs)
    assert [it["text"] for it in items.values()] == ["", '{"k": [1, 2', "between"]
    assert [(t, i) for t, i in _kinds(outs[4]) if t == "response.output_item.done"] == [
        ("response.output_item.done", 2), ("response.output_item.done", 0), ("response.output_item.done", 1)]
    assert evs[-1]["type"] == "response.incomplete"
    _, built, done = sdk_state(evs)
    assert built == {1: '{"k": [1, 2'} and done == {0: "", 1: '{"k": [1, 2'}


def test_whitespace_after_complete_arguments_is_dropped_anything_else_is_a_502():
    outs, data = encode([_start(0, "f", "{}"), _args(0, " \n"), FINISH])
    assert outs[1] == b"" and well_formed(_events(data))[0]["text"] == "{}"
    enc = ResponsesEncoder({"model": "m"})
    enc.chunk(_start(0, "f", '{"a": 1}'))
    with pytest.raises(GatewayError) as e:
        enc.chunk(_args(0, ', "b": 2}'))
    assert e.value.status == 502 and "after a complete JSON value" in e.value.message


def _random_stream(rng: random.Random) -> tuple[list[dict], list[str], str, str]:
    """The Messages tests' random interleavings (1-4 calls, fragments split anywhere, text between)
    with reasoning runs put in at random places; returns (chunks, the calls' arguments in index
    order, the text, the reasoning)."""
    chunks, inputs, text = messages_random_stream(rng)
    for _ in range(rng.randint(0, 3)):
        chunks.insert(rng.randint(0, len(chunks) - 1), _reasoning(rng.choice(["hm", " so"])))  # before the finish
    thought = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks)
    return chunks, [json.dumps(inp) for inp in inputs], text, thought


def test_random_interleavings_rebuild_every_call():
    rng = random.Random(1414)
    for _ in range(400):
        chunks, args, text, thought = _random_stream(rng)
        outs, data = encode(chunks)
        evs = _events(data)
        items = well_formed(evs)
        calls = [i for i, it in items.items() if it["type"] == "function_call"]
        assert [items[i]["name"] for i in calls] == [f"tool{k}" for k in range(len(args))]
        assert "".join(it["text"] for it in items.values() if it["type"] == "reasoning") == thought
        state, built, done = sdk_state(evs)
        assert [built[i] for i in calls] == [done[i] for i in calls] == args
        final = state._completed_response
        assert [o.arguments for o in final.output if o.type == "function_call"] == args
        assert final.output_text == text
        # live: every chunk with a fragment sends that fragment's delta in its own output
        for c, out in zip(chunks, outs):
            for tc in c["choices"][0]["delta"].get("tool_calls", ()):
                if tc["function"]["arguments"]:
                    assert b"response.function_call_arguments.delta" in out
