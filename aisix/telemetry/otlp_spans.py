"""OTLP spans encoded straight from :class:`~aisix.telemetry.records.RequestRecord` s, in protobuf
wire format, without SDK ``ReadableSpan`` s or the SDK's generic encoder.

Profiled under load, the SDK path (a ``ReadableSpan`` per span, then
``opentelemetry.exporter.otlp.proto.common``'s encoder building a message object per attribute on
the exporter thread) cost ~35 µs per request, most of the telemetry's CPU, and its exporter
thread held the GIL for milliseconds per batch. Here a span is a few byte strings joined: the
key/value pairs that repeat (method, route, model, provider, …) are encoded once and cached, only
ids, times and counts are encoded per span. The bytes decode to the same spans the SDK would send
(``tests/unit/test_otlp_spans.py`` checks it against the SDK encoder and a real gRPC receiver).

Wire format: https://protobuf.dev/programming-guides/encoding/ ; messages:
``opentelemetry/proto/trace/v1/trace.proto`` and ``common/v1/common.proto`` of
https://github.com/open-telemetry/opentelemetry-proto (v1.x), field numbers as noted below.
"""
from __future__ import annotations

import struct

from aisix.telemetry.records import Attempt, RequestRecord

#: ``gen_ai.provider.name`` values of the GenAI semantic conventions' registry for our providers.
GEN_AI_PROVIDER = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini", "deepseek": "deepseek"}

_SMALL = [bytes((n,)) if n < 0x80 else bytes(((n & 0x7F) | 0x80, n >> 7)) for n in range(1 << 14)]
_TIMES = struct.Struct("<BQBQ")  # Span.start_time_unix_nano = 7, end_time_unix_nano = 8 (fixed64)
_DOUBLE = struct.Struct("<Bd")
_EVENT_TIME = struct.Struct("<BQ")
_FIRST_TOKEN = b"\x12\x12gen_ai.first_token"  # Event.name = 2 (18 bytes)
_FIRST_TOKEN_EVENT = b"\x5a" + bytes((9 + len(_FIRST_TOKEN),))  # Span.events = 11, that Event's length
_FLAGS_LOCAL = b"\x85\x01" + struct.pack("<I", 0x100)  # Span.flags = 16 (fixed32): HAS_IS_REMOTE
_FLAGS_REMOTE = b"\x85\x01" + struct.pack("<I", 0x300)  # … | IS_REMOTE (the parent came from the client)
_KIND_SERVER, _KIND_CLIENT = b"\x30\x02", b"\x30\x03"  # Span.kind = 6: SPAN_KIND_SERVER / _CLIENT
_STATUS_UNSET = b"\x7a\x00"  # Span.status = 15: an empty Status (code UNSET), as the SDK sends it
_CACHE_MAX = 4096  # cached key/value pairs; the cache starts over past this (values from upstreams vary)


def varint(n: int) -> bytes:
    """``n`` (an int ≥ 0, < 2**64) as a protobuf base-128 varint."""
    if n < 16384:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its ``tag`` byte(s), the length, ``payload``."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 16384 else varint(n)) + payload


def any_value(value) -> bytes:
    """``value`` as an ``AnyValue`` message (string_value = 1, bool_value = 2, int_value = 3,
    double_value = 4, array_value = 5), typed as the SDK's encoder types it. Raises TypeError
    for other types."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return field(b"\x0a", value.encode())
    if isinstance(value, int):
        return b"\x18" + varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement
    if isinstance(value, float):
        return _DOUBLE.pack(0x21, value)
    if isinstance(value, (list, tuple)):
        return field(b"\x2a", b"".join(field(b"\x0a", any_value(v)) for v in value))
    raise TypeError(f"no OTLP attribute value for {type(value).__name__}")


def key_value(key: str, value) -> bytes:
    """One attribute as a ``Span.attributes`` field (9) holding a ``KeyValue``. Raises TypeError
    for a value :func:`any_value` can't encode."""
    return field(b"\x4a", _kv_body(key, value))


def _kv_body(key: str, value) -> bytes:
    """A ``KeyValue`` message's body: key = 1, value = 2."""
    return field(b"\x0a", key.encode()) + field(b"\x12", any_value(value))


def request_prefix(resource_attrs: dict, schema_url: str, scope_name: str, scope_version: str) -> tuple[bytes, bytes]:
    """The constant parts of an ``ExportTraceServiceRequest`` with one ``ResourceSpans`` (field 1;
    its resource = 1, scope_spans = 2, schema_url = 3) holding one ``ScopeSpans`` (scope = 1,
    spans = 2): ``(resource part, scope part)`` for :func:`export_request`."""
    resource = field(b"\x0a", b"".join(field(b"\x0a", _kv_body(k, v)) for k, v in resource_attrs.items()))
    if schema_url:
        resource += field(b"\x1a", schema_url.encode())
    body = field(b"\x0a", scope_name.encode())
    if scope_version:
        body += field(b"\x12", scope_version.encode())
    scope = field(b"\x0a", body)
    return resource, scope


def export_request(prefix: tuple[bytes, bytes], spans: list[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest`` (serialized) of ``spans`` (each an encoded ``Span``
    field from :class:`SpanEncoder`) under the resource and scope of ``prefix``; one copy of the bytes."""
    resource, scope = prefix
    scope_spans = len(scope) + sum(map(len, spans))
    resource_spans = len(resource) + 1 + len(varint(scope_spans)) + scope_spans
    return b"".join((b"\x0a", varint(resource_spans), resource, b"\x12", varint(scope_spans), scope, *spans))


def int_attribute(key: str):
    """An encoder of the int attribute ``key``: ``f(n)`` == ``key_value(key, n)``, with the bytes
    around the value prepared for each varint length."""
    key_field = field(b"\x0a", key.encode())
    heads = [b""] + [b"\x4a" + _SMALL[len(key_field) + 3 + n] + key_field + b"\x12" + _SMALL[n + 1] + b"\x18"
                     for n in range(1, 11)]

    def encode(n: int) -> bytes:
        v = _SMALL[n] if 0 <= n < 16384 else varint(n & 0xFFFFFFFFFFFFFFFF)
        return heads[len(v)] + v
    return encode


_input_tokens = int_attribute("gen_ai.usage.input_tokens")
_output_tokens = int_attribute("gen_ai.usage.output_tokens")
_cache_read_tokens = int_attribute("gen_ai.usage.cache_read.input_tokens")
_cache_creation_tokens = int_attribute("gen_ai.usage.cache_creation.input_tokens")


def usage_attributes(r: RequestRecord) -> tuple[bytes, ...]:
    """The usage on a span, in the GenAI semantic conventions' names
    (https://opentelemetry.io/docs/specs/semconv/registry/attributes/gen-ai/): ``input_tokens``
    (every prompt token, cached and cache-written ones included, as the conventions ask),
    ``output_tokens``, and the part of the input read from the provider's prompt cache
    (``gen_ai.usage.cache_read.input_tokens``) and written to it
    (``gen_ai.usage.cache_creation.input_tokens``), each when the upstream reported some."""
    out = (_input_tokens(r.prompt_tokens), _output_tokens(r.completion_tokens))
    if r.cached_tokens:
        out += (_cache_read_tokens(r.cached_tokens),)
    if r.cache_write_tokens:
        out += (_cache_creation_tokens(r.cache_write_tokens),)
    return out


class SpanEncoder:
    """Encodes a record's spans: one SERVER span for the request, one CLIENT span per upstream
    attempt (GenAI semantic conventions, https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/;
    HTTP server spans, https://opentelemetry.io/docs/specs/semconv/http/http-spans/). Each span
    comes out as the bytes of a ``ScopeSpans.spans`` field (2), ready for :func:`export_request`.

    The attributes that repeat from request to request come in blocks (name, kind and the
    attributes of a method/route/status; of a model; of a deployment's attempt), each encoded once
    and cached by the values it holds (at most ``_CACHE_MAX`` blocks; then the cache starts over).
    Times: the record's ``perf_counter_ns`` stamps are placed on the epoch through its
    ``start_wall_ns``. Not thread-safe (the batcher calls it, on the event loop)."""

    def __init__(self) -> None:
        self._blocks: dict[tuple, bytes] = {}

    def _block(self, key: tuple, build, *args) -> bytes:
        b = self._blocks.get(key)
        if b is None:
            if len(self._blocks) >= _CACHE_MAX:
                self._blocks.clear()
            b = self._blocks[key] = b"".join(build(*args))
        return b

    def encode(self, r: RequestRecord) -> list[bytes]:
        """The spans of ``r`` (a sampled record): ``[server, *attempts]``."""
        wall = r.start_wall_ns - r.start_ns  # perf_counter ns → epoch ns
        trace = b"\x0a\x10" + r.trace_id.to_bytes(16, "big")  # Span.trace_id = 1
        server_id = r.span_id.to_bytes(8, "big")
        parts = [trace, b"\x12\x08", server_id]  # Span.span_id = 2
        if r.parent_span_id:
            parts += (b"\x22\x08", r.parent_span_id.to_bytes(8, "big"))  # Span.parent_span_id = 4
        parts += (_TIMES.pack(0x39, r.start_wall_ns, 0x41, r.end_ns + wall),
                  self._block(("s", r.method, r.endpoint, r.path, r.status), _server_block, r.method, r.endpoint,
                              r.path, r.status))
        if r.model is not None:
            self._model_attributes(r, parts)
        if r.status >= 500:  # server errors only: a 4xx is the client's (OTel HTTP semantic conventions)
            parts += (key_value("error.type", str(r.status)), _status(2, r.error))
        else:
            parts.append(_STATUS_UNSET)
        if r.first_token_ns:  # Span.events = 11: Event{time_unix_nano = 1 (fixed64), name = 2}
            parts += (_FIRST_TOKEN_EVENT, _EVENT_TIME.pack(0x09, r.first_token_ns + wall), _FIRST_TOKEN)
        parts.append(_FLAGS_REMOTE if r.parent_span_id else _FLAGS_LOCAL)
        spans = [field(b"\x12", b"".join(parts))]
        for a in r.attempts:
            spans.append(self._attempt(r, a, trace, server_id, wall))
        return spans

    def _model_attributes(self, r: RequestRecord, parts: list) -> None:
        parts.append(self._block(("m", r.operation, r.provider, r.request_model, r.model, r.stream, r.response_model),
                                 _model_block, r))
        if r.total_tokens is not None or r.usage_estimated:
            parts += usage_attributes(r)
        if r.usage_estimated or r.finish_reasons or r.upstream_status is not None:
            parts.append(self._block(("t", r.usage_estimated, r.finish_reasons, r.upstream_status), _model_tail, r))
        if r.cost_usd is not None:
            parts.append(key_value("aisix.cost_usd", r.cost_usd))

    def _attempt(self, r: RequestRecord, a: Attempt, trace: bytes, server_id: bytes, wall: int) -> bytes:
        """One CLIENT span per upstream attempt, child of the request's SERVER span, named
        ``{operation} {upstream model}``; the successful attempt carries the response model and usage."""
        response_model = r.response_model if a.ok else None
        parts = [trace, b"\x12\x08", a.span_id.to_bytes(8, "big"), b"\x22\x08", server_id,
                 _TIMES.pack(0x39, a.start_ns + wall, 0x41, a.end_ns + wall),
                 self._block(("a", r.operation, a.provider, a.upstream_model, a.server_address, a.model, a.deployment,
                              a.ok, a.status, response_model), _attempt_block, r.operation, a, response_model)]
        if a.ok:
            if r.total_tokens is not None:
                parts += usage_attributes(r)
            parts.append(_STATUS_UNSET)
        else:
            parts.append(_status(2, a.error))
        parts.append(_FLAGS_LOCAL)
        return field(b"\x12", b"".join(parts))


def _server_block(method: str, endpoint: str, path: str, status: int):
    return (field(b"\x2a", f"{method} {endpoint}".encode()), _KIND_SERVER,  # Span.name = 5, kind = 6
            key_value("http.request.method", method), key_value("url.path", path),
            key_value("http.route", endpoint), key_value("http.response.status_code", status))


def _model_block(r: RequestRecord):
    yield key_value("gen_ai.operation.name", r.operation)
    yield key_value("gen_ai.provider.name", GEN_AI_PROVIDER.get(r.provider, r.provider or ""))
    yield key_value("gen_ai.request.model", r.request_model or "")
    yield key_value("aisix.model", r.model)
    yield key_value("aisix.stream", r.stream)
    if r.response_model:
        yield key_value("gen_ai.response.model", r.response_model)


def _model_tail(r: RequestRecord):
    if r.usage_estimated:
        yield key_value("aisix.usage.estimated", True)
    if r.finish_reasons:
        yield key_value("gen_ai.response.finish_reasons", list(r.finish_reasons))
    if r.upstream_status is not None:
        yield key_value("aisix.upstream.status_code", r.upstream_status)


def _attempt_block(operation: str, a: Attempt, response_model: str | None):
    yield field(b"\x2a", f"{operation} {a.upstream_model}".encode())  # Span.name = 5
    yield _KIND_CLIENT
    yield key_value("gen_ai.operation.name", operation)
    yield key_value("gen_ai.provider.name", GEN_AI_PROVIDER.get(a.provider, a.provider))
    yield key_value("gen_ai.request.model", a.upstream_model)
    yield key_value("server.address", a.server_address)
    yield key_value("aisix.model", a.model)
    yield key_value("aisix.deployment", a.deployment)
    if not a.ok:
        yield key_value("error.type", a.status)
    if a.status.isdigit():
        yield key_value("http.response.status_code", int(a.status))
    if response_model:
        yield key_value("gen_ai.response.model", response_model)


def _status(code: int, message: str | None) -> bytes:
    """``Span.status`` (15): a ``Status`` with ``message`` (2) and ``code`` (3; 2 = ERROR)."""
    body = field(b"\x12", message.encode()) if message else b""
    return field(b"\x7a", body + b"\x18" + _SMALL[code])
