"""aisix.sse.SSEParser, sans-IO: byte by byte, at random split points, every line ending."""
from __future__ import annotations

import random

import pytest

from aisix.sse import SSEParser

STREAM = (b": PROCESSING\n\n"
          b"data: {\"a\":1}\n\n"
          b"event: message_start\ndata: {\"b\":2}\nid: 7\n\n"
          b"data: line1\ndata: line2\n\n"
          b": ping\n\n"
          b"data:nospace\nretry: 100\nunknown: x\n\n"
          b"data: [DONE]\n\n")
EXPECTED = [(None, None), (b'{"a":1}', None), (b'{"b":2}', "message_start"), (b"line1\nline2", None),
            (None, None), (b"nospace", None), (b"[DONE]", None)]


def with_eol(eol: bytes) -> bytes:
    return STREAM.replace(b"\n", eol)


def parse_in_pieces(data: bytes, cuts: list[int]):
    p = SSEParser()
    events, last = [], 0
    for c in sorted(cuts) + [len(data)]:
        events += p.feed(data[last:c])
        last = c
    return events, p


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_whole_feed(eol):
    data = with_eol(eol)
    events, p = parse_in_pieces(data, [])
    assert [(e.data, e.event) for e in events] == EXPECTED
    assert b"".join(e.raw for e in events) == data  # byte-faithful: the raw parts are the input
    assert events[2].id == "7" and events[0].comments and p.pending == b""


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_byte_by_byte_and_random_splits_give_the_same_events(eol):
    data = with_eol(eol)
    cut_sets = [list(range(1, len(data)))]
    rng = random.Random(1234)
    cut_sets += [rng.sample(range(1, len(data)), k=rng.randint(1, 12)) for _ in range(300)]
    for cuts in cut_sets:
        events, p = parse_in_pieces(data, cuts)
        assert [(e.data, e.event) for e in events] == EXPECTED, cuts
        # a final LF that arrives after the CR it belongs to waits, as pending, for the next event
        assert b"".join(e.raw for e in events) + p.pending == data, cuts


def test_crlf_split_between_cr_and_lf_dispatches_at_the_cr_without_an_empty_event():
    p = SSEParser()
    first = p.feed(b"data: a\r\n\r")
    assert [e.data for e in first] == [b"a"]  # dispatched before the \n arrives
    rest = p.feed(b"\ndata: b\r\n\r\n")
    assert [e.data for e in rest] == [b"b"]
    assert rest[0].raw.startswith(b"\n")  # the orphan \n is relayed with the next event


def test_close_returns_a_complete_but_unterminated_event_and_drops_a_partial_line():
    p = SSEParser()
    assert p.feed(b"data: [DONE]\n") == []
    tail = p.close()
    assert tail.data == b"[DONE]"
    p = SSEParser()
    assert p.feed(b'data: {"trunc') == [] and p.pending == b'data: {"trunc'
    assert p.close() is None


def test_random_bytes_never_raise_and_raw_covers_the_input():
    rng = random.Random(99)
    alphabet = b"data: \r\n:{}ev"
    for _ in range(500):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        events, p = parse_in_pieces(data, rng.sample(range(1, max(2, len(data))), k=min(3, max(0, len(data) - 1))))
        assert b"".join(e.raw for e in events) + p.pending == data


@pytest.mark.parametrize("cut", range(0, 6))
def test_leading_bom_is_stripped_wherever_the_read_splits(cut):
    """WHATWG SSE: one leading U+FEFF is ignored; it is not part of the first event's raw bytes."""
    data = b"\xef\xbb\xbf" + STREAM
    evs, _ = parse_in_pieces(data, [cut] if cut else [])
    assert [(e.data, e.event) for e in evs] == EXPECTED
    assert b"".join(e.raw for e in evs) == STREAM


def test_bom_only_at_the_start_and_a_partial_one_is_data():
    p = SSEParser()
    assert p.feed(b"\xef") == []
    evs = p.feed(b"x: y\n\ndata: \xef\xbb\xbfz\n\n")  # \xef then not a BOM: kept, a field named "\xefx"
    assert [e.raw for e in evs] == [b"\xefx: y\n\n", b"data: \xef\xbb\xbfz\n\n"]
    assert evs[1].data == b"\xef\xbb\xbfz"  # a BOM later in the stream is content
