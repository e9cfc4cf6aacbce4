"""W3C trace context on the hot path: parse ``traceparent``, make ids, format the header.

https://www.w3.org/TR/trace-context/#traceparent-header — ``00-{trace-id:32 hex}-{parent-id:16 hex}-{flags:2 hex}``.
"""
from __future__ import annotations

import random
from typing import NamedTuple

_rand = random.Random()  # ids need uniqueness, not secrecy: the fast generator


class TraceContext(NamedTuple):
    trace_id: int
    parent_span_id: int  # 0 when the request started a new trace
    flags: int


def parse_traceparent(value: str | None) -> TraceContext | None:
    """The incoming context, or None if the header is absent or invalid (then a new trace starts)."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    if parts[0] == "ff" or (parts[0] == "00" and len(parts) != 4):
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if trace_id == 0 or span_id == 0:
        return None
    return TraceContext(trace_id, span_id, flags)


def new_trace_id() -> int:
    return _rand.getrandbits(128) or 1


def new_span_id() -> int:
    return _rand.getrandbits(64) or 1


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"
