"""W3C trace context on the hot path: parse ``traceparent``, make ids, format the header.

https://www.w3.org/TR/trace-context/#traceparent-header — ``00-{trace-id:32 hex}-{parent-id:16 hex}-{flags:2 hex}``.
"""
from __future__ import annotations

import random
import re
from typing import NamedTuple

_rand = random.Random()  # ids need uniqueness, not secrecy: the fast generator


class TraceContext(NamedTuple):
    trace_id: int
    parent_span_id: int  # 0 when the request started a new trace
    flags: int


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def parse_traceparent(value: str | None) -> TraceContext | None:
    """The incoming context, or None if the header is absent or invalid (then a new trace starts).
    Lowercase hex only, version ``ff`` invalid, all-zero ids invalid, and a version ``00`` header
    has exactly four fields (W3C Trace Context §3.2)."""
    if not value:
        return None
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace, span, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return TraceContext(trace_id, span_id, int(flags, 16))


def new_trace_id() -> int:
    return _rand.getrandbits(128) or 1


def new_span_id() -> int:
    return _rand.getrandbits(64) or 1


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def request_context(traceparent: str | None, sample_bound: int) -> TraceContext:
    """The trace context a request runs in: the incoming ``traceparent``'s (its sampled flag is
    honoured, ParentBased), else a new trace, sampled as the OTel SDK's ``TraceIdRatioBased``
    sampler decides it: the trace id's low 64 bits under ``sample_bound`` (2**64 × ratio).
    The parent span id is 0 for a new trace."""
    ctx = parse_traceparent(traceparent)
    if ctx is not None:
        return ctx
    trace_id = new_trace_id()
    return TraceContext(trace_id, 0, 1 if (trace_id & 0xFFFFFFFFFFFFFFFF) < sample_bound else 0)
