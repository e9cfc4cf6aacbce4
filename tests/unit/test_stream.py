"""aisix.proxy.stream.StreamRelay, sans-IO: every provider's decoder fed byte by byte, at random split
points and whole; what ends a stream and with which status; nothing after ``[DONE]``."""
from __future__ import annotations

import json
import random

import pytest

from aisix.providers import get_provider
from aisix.proxy import stream as relay_mod
from aisix.proxy.stream import StreamRelay
from aisix.sse import SSEParser
from tests.support.harness import ROLE, STOP, TXT, USAGE, ev

DONE = b"data: [DONE]\n\n"
OPENAI = ev(ROLE) + b": keep-alive\n\n" + ev(TXT("a")) + ev(TXT("b")) + ev(STOP) + ev(USAGE(3, 2)) + DONE


def anthropic_event(name: str, obj: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


ANTHROPIC = b"".join([
    anthropic_event("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
        "usage": {"input_tokens": 7, "output_tokens": 1}}}),
    anthropic_event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}}),
    b'event: ping\ndata: {"type": "ping"}\n\n',
    anthropic_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": "Hi"}}),
    anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
    anthropic_event("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}}),
    anthropic_event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                            "delta": {"type": "input_json_delta", "partial_json": ""}}),
    anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 1}),
    anthropic_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                                      "usage": {"output_tokens": 5}}),
    anthropic_event("message_stop", {"type": "message_stop"}),
])

GEMINI = b"".join(
    b"data: " + json.dumps(o).encode() + b"\r\n\r\n" for o in (
        {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hel"}]}}], "modelVersion": "gemini-x",
         "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 1}},
        {"candidates": [{"content": {"role": "model", "parts": [{"text": "lo"}]}, "finishReason": "STOP"}],
         "modelVersion": "gemini-x", "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2,
                                                       "totalTokenCount": 6}}))

STREAMS = {"openai": OPENAI, "anthropic": ANTHROPIC, "gemini": GEMINI}


def run(provider: str, data: bytes, cuts: list[int], include_usage: bool = False):
    """Feed ``data`` cut at ``cuts`` (read i arrives at time i+1); eof at the end unless over."""
    r = StreamRelay(get_provider(provider).stream_decoder(include_usage), provider)
    out, last = [], 0
    for i, c in enumerate(sorted(set(cuts)) + [len(data)]):
        if c > last:
            out.append(r.feed(data[last:c], i + 1))
            last = c
        if r.over:
            break
    else:
        out.append(r.eof())
    return r, b"".join(out)


def normalized(body: bytes) -> list:
    """The client's events, with the per-stream ``created`` stamp (and Gemini's generated id) taken out."""
    evs = []
    for e in SSEParser().feed(body):
        if e.data is None or e.data == b"[DONE]":
            evs.append(e.data)
            continue
        obj = json.loads(e.data)
        obj.pop("created", None)
        if obj.get("id", "").startswith("chatcmpl-"):
            obj["id"] = "chatcmpl-*"
        evs.append(obj)
    return evs


def content(body: bytes) -> tuple[str, list]:
    text, tools = "", {}
    for obj in normalized(body):
        if isinstance(obj, dict):
            for ch in obj["choices"]:
                text += ch["delta"].get("content") or ""
                for tc in ch["delta"].get("tool_calls") or ():
                    tools[tc["index"]] = tools.get(tc["index"], "") + (tc["function"].get("arguments") or "")
    return text, [tools[i] for i in sorted(tools)]


@pytest.mark.parametrize("provider", sorted(STREAMS))
def test_byte_by_byte_random_and_whole_give_the_same_client_stream(provider):
    data = STREAMS[provider]
    whole, body = run(provider, data, [])
    assert whole.ended and whole.error is None and body.endswith(DONE)
    assert whole.first_token_ns == 1 and whole.decoder.usage is not None
    rnd = random.Random(7)
    for cuts in [list(range(1, len(data))), *(rnd.sample(range(1, len(data)), 12) for _ in range(20))]:
        r, got = run(provider, data, cuts)
        assert normalized(got) == normalized(body)
        assert (r.ended, r.error, r.completion_events) == (True, None, whole.completion_events)
        assert r.decoder.usage == whole.decoder.usage and r.decoder.finish_reasons == whole.decoder.finish_reasons


def test_openai_bytes_pass_through_and_first_token_is_the_read_that_completed_it():
    token_end = OPENAI.index(ev(TXT("a"))) + len(ev(TXT("a")))
    cuts = list(range(1, len(OPENAI)))  # read i (1-based) ends at byte i
    r, got = run("openai", OPENAI, cuts)
    assert got == OPENAI.replace(ev(USAGE(3, 2)), b"")  # byte for byte; the usage chunk we asked for dropped
    assert r.first_token_ns == token_end
    assert r.completion_events == 2 and r.clean
    _, with_usage = run("openai", OPENAI, [], include_usage=True)
    assert with_usage == OPENAI


def test_provider_translations_add_up():
    assert content(run("anthropic", ANTHROPIC, [])[1]) == ("Hi", ["{}"])
    assert content(run("gemini", GEMINI, [])[1]) == ("Hello", [])


@pytest.mark.parametrize("cut", [0, 10, "done"])
def test_nothing_after_done_whatever_the_reads(cut):
    extra = ev(TXT("after")) + ev(USAGE(100, 100)) + DONE
    data = OPENAI + extra
    cuts = [len(OPENAI)] if cut == "done" else ([cut] if cut else [])
    r, got = run("openai", data, cuts, include_usage=True)
    assert got == OPENAI and r.decoder.usage.total_tokens == 5
    assert r.clean == (cut == "done")  # extra bytes in [DONE]'s read: the connection is not reused


def test_error_as_first_event_keeps_its_status_and_writes_nothing():
    data = ev(json.dumps({"error": {"message": "too long", "type": "invalid_request_error",
                                    "code": "context_length_exceeded"}}))
    r, got = run("openai", data + ev(TXT("x")), [])
    assert got == b"" and r.error.status == 400 and r.error.code == "context_length_exceeded"


def test_close_before_finish_is_502_and_a_finish_without_done_gets_one():
    r, got = run("openai", ev(ROLE) + ev(TXT("a")), [])
    assert r.error.status == 502 and r.error.code == "upstream_stream_broken" and not r.ended
    r, got = run("openai", ev(ROLE) + ev(TXT("a")) + ev(STOP) + b"data: {\"choices\":[]}", [])  # no blank line
    assert r.error is None and r.ended and got.endswith(DONE) and not r.clean


def test_idle_timeout_ends_cleanly_after_a_finish_else_504():
    r = StreamRelay(get_provider("openai").stream_decoder(False), "openai")
    r.feed(ev(ROLE) + ev(TXT("a")), 1)
    assert r.idle_timeout(500) == b"" and r.error.status == 504 and r.error.code == "upstream_timeout"
    r = StreamRelay(get_provider("openai").stream_decoder(False), "openai")
    r.feed(ev(TXT("a")) + ev(STOP), 1)
    assert r.idle_timeout(500) == DONE and r.error is None and r.ended
    assert r.idle_timeout(500) == b""  # [DONE] added once


def test_oversized_event_and_malformed_translation_are_502(monkeypatch):
    monkeypatch.setattr(relay_mod, "MAX_EVENT_BYTES", 64)
    r, _ = run("openai", b"data: " + b"x" * 100, [])
    assert r.error.status == 502 and "over 64 bytes" in r.error.message
    bad = anthropic_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": "nope"})
    r, got = run("anthropic", ANTHROPIC.split(b"event: content_block_start")[0] + bad, [])
    assert r.error.status == 502 and got  # the role chunk went out before the malformed event


def test_broken_transport_ends_with_its_error():
    from aisix.errors import upstream_unreachable
    r = StreamRelay(get_provider("openai").stream_decoder(False), "openai")
    assert r.feed(ev(TXT("a")), 1) == ev(TXT("a"))
    r.broken(upstream_unreachable("reset"))
    assert r.over and r.error.message == "reset"


def test_inter_token_gaps_per_content_event_at_known_read_times():
    """Reads at known times: the first content event has no gap; each later read's first content
    event gets the gap since the last read that relayed content; the others of its read get 0.
    Role-only openers, comments, the finish and the usage chunk are not content events."""
    r = StreamRelay(get_provider("openai").stream_decoder(False), "openai")
    reads = [(10, ev(ROLE) + ev(TXT("a"))), (25, ev(TXT("b")) + ev(TXT("c"))), (40, b": keep-alive\n\n"),
             (100, ev(TXT("d"))), (130, ev(STOP) + ev(USAGE(3, 4)) + DONE)]
    for t, data in reads:
        r.feed(data, t)
    assert r.ended and r.first_token_ns == 10
    assert list(r.gaps_ns) == [15, 75] and r.zero_gaps == 1  # 4 content events → 3 samples: 15, 0, 75


@pytest.mark.parametrize("provider", sorted(STREAMS))
def test_inter_token_samples_are_content_events_less_one_whatever_the_reads(provider):
    """Byte by byte (read i at time i), every content event comes in its own read: the gaps add up
    to last content − first token. Whole, they are all in one read: every gap is 0. Either way
    there is one sample per content event after the first (Anthropic's ping is none)."""
    data = STREAMS[provider]
    whole, body = run(provider, data, [])
    content = len(whole.gaps_ns) + whole.zero_gaps + 1
    assert list(whole.gaps_ns) == [] and content >= 2
    chunks = [e for e in normalized(body) if isinstance(e, dict) and any(
        ch["delta"].get("content") or ch["delta"].get("tool_calls") or ch["delta"].get("reasoning_content")
        for ch in e["choices"])]
    assert content == len(chunks)  # the client's content chunks, counted independently
    bytewise, _ = run(provider, data, list(range(1, len(data))))
    assert bytewise.zero_gaps == 0 and len(bytewise.gaps_ns) == content - 1
    assert sum(bytewise.gaps_ns) == bytewise.last_content_ns - bytewise.first_token_ns > 0
