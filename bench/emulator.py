"""A fast OpenAI-compatible upstream on loopback: ``python -m bench.emulator --port P``.

Routes: ``POST /v1/chat/completions`` (streaming and not) and ``GET /v1/models``.
Written on a raw asyncio Protocol with httptools and responses pre-encoded per
shape (measured faster than aiohttp.web; see bench/README.md).

Per-request knobs, each from (first found wins) a request header, a marker in
the body (e.g. in a message's content, so that it crosses any gateway), then
the CLI default:

=====================  ======================  ======================
header                 body marker             meaning
=====================  ======================  ======================
``x-emu-chunks: 20``   ``emu-chunks=20``       content chunks (count)
``x-emu-ttft-ms: 5``   ``emu-ttft-ms=5``       time to first chunk (ms)
``x-emu-gap-ms: 20``   ``emu-gap-ms=20``       gap between chunks (ms)
=====================  ======================  ======================

A stream is N content chunks, the first at ``ttft`` and each next one ``gap``
later, then (with the last) a ``finish_reason: stop`` chunk, a usage chunk
(``choices: []``) when the request has ``stream_options.include_usage``, and
``data: [DONE]``. Framing is OpenAI's: ``content-type: text/event-stream``,
``transfer-encoding: chunked``, one ``data: {json}\\n\\n`` per event.
When ``gap > 0`` each content carries its send time (``ts=`` + ``time.monotonic_ns()``).
A non-streaming answer waits ``ttft + (N-1)*gap`` and carries N tokens of text.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import signal
import time

import httptools
import orjson

from bench._util import pin
from bench._util import run as aio_run

CREATED = 1_700_000_000
PROMPT_TOKENS = 8
RE_STREAM = re.compile(rb'"stream"\s*:\s*true')
RE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
RE_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{0,200})"')
RE_KNOB = re.compile(rb"emu-(chunks|ttft-ms|gap-ms)[=:]\s*(\d+(?:\.\d+)?)")
HDR_KNOBS = {b"x-emu-chunks": b"chunks", b"x-emu-ttft-ms": b"ttft-ms", b"x-emu-gap-ms": b"gap-ms"}
MAX_CHUNKS = 100_000
STAMP = b"ts=" + b"0" * 19


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage_obj(completion_tokens: int) -> dict:
    """OpenAI's usage object (token counts)."""
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion_tokens,
            "total_tokens": PROMPT_TOKENS + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def build_stream(model: str, chunks: int, usage: bool, stamp: bool = False) -> tuple[bytes, list[bytes], bytes]:
    """Pre-encode a stream: (response head, one HTTP chunk per content event, tail).

    The tail holds the finish chunk, the usage chunk (if asked) and ``[DONE]``,
    then the terminating zero-length HTTP chunk. With ``stamp``, each content
    ends in ``ts=`` and 19 digits, filled at send time with ``time.monotonic_ns()``
    (the load generator reads it back to time each chunk's trip).
    """
    cid = "chatcmpl-bench0000000000000000000000"
    base = {"id": cid, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "service_tier": "default", "system_fingerprint": "fp_bench"}
    extra = {"usage": None} if usage else {}
    events = []
    for i in range(chunks):
        delta = {"role": "assistant", "content": "", "refusal": None} if i == 0 else {}
        delta["content"] = ("tok%d " % i if i else "Hello ") + (STAMP.decode() + " " if stamp else "")
        events.append(_http_chunk(_sse({**base, "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}], **extra})))
    tail = _sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                 **extra})
    if usage:
        tail += _sse({**base, "choices": [], "usage": usage_obj(chunks)})
    tail = _http_chunk(tail + b"data: [DONE]\n\n") + b"0\r\n\r\n"
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n"
            b"x-request-id: req_bench\r\nopenai-processing-ms: 1\r\n\r\n")
    return head, events, tail


def build_json(model: str, chunks: int) -> bytes:
    """Pre-encode a whole non-streaming chat completion response (head + body)."""
    text = "Hello " + "".join("tok%d " % i for i in range(1, chunks))
    body = orjson.dumps({
        "id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion", "created": CREATED,
        "model": model, "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": usage_obj(chunks), "service_tier": "default"})
    return _plain(200, body)


def _plain(status: int, body: bytes, reason: bytes = b"OK") -> bytes:
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"x-request-id: req_bench\r\n\r\n%s" % (status, reason, len(body), body))


MODELS = _plain(200, orjson.dumps({"object": "list", "data": [
    {"id": "bench-upstream", "object": "model", "created": CREATED, "owned_by": "bench"}]}))
NOT_FOUND = _plain(404, orjson.dumps({"error": {"message": "not found", "type": "invalid_request_error",
                                                "code": "not_found"}}), b"Not Found")
BAD = _plain(400, b'{"error":{"message":"bad request","type":"invalid_request_error","code":null}}',
             b"Bad Request")


class Emulator:
    """Shared state: CLI defaults and the cache of pre-encoded responses."""

    def __init__(self, chunks: int = 20, ttft_ms: float = 0.0, gap_ms: float = 0.0):
        self.defaults = {b"chunks": chunks, b"ttft-ms": ttft_ms, b"gap-ms": gap_ms}
        self.cache: dict = {}
        self.requests = 0

    def stream(self, model: bytes, chunks: int, usage: bool, stamp: bool = False):
        key = (b"s", model, chunks, usage, stamp)
        r = self.cache.get(key)
        if r is None:
            head, events, tail = build_stream(model.decode("utf-8", "replace"), chunks, usage, stamp)
            r = self.cache[key] = (head, events, tail, head + b"".join(events) + tail)
        return r

    def json(self, model: bytes, chunks: int) -> bytes:
        key = (b"j", model, chunks)
        r = self.cache.get(key)
        if r is None:
            r = self.cache[key] = build_json(model.decode("utf-8", "replace"), chunks)
        return r


class EmuProtocol(asyncio.Protocol):
    """One client connection: parse with httptools, answer from the cache."""

    __slots__ = ("emu", "loop", "t", "parser", "url", "knobs", "body", "busy", "closed", "method")

    def __init__(self, emu: Emulator):
        self.emu = emu
        self.loop = asyncio.get_running_loop()
        self.t = None
        self.parser = httptools.HttpRequestParser(self)
        self.busy = False
        self.closed = False
        self._reset()

    def _reset(self):
        self.url = b""
        self.knobs = {}
        self.body = []

    def connection_made(self, transport):
        self.t = transport

    def connection_lost(self, exc):
        self.closed = True

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reply(BAD, close=True)
        except httptools.HttpParserError:
            self._reply(BAD, close=True)

    # httptools callbacks
    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        k = HDR_KNOBS.get(name.lower())
        if k is not None:
            self.knobs[k] = float(value)

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        self.method = self.parser.get_method()
        keep = self.parser.should_keep_alive()
        url, knobs, body = self.url, self.knobs, b"".join(self.body)
        self._reset()
        self.emu.requests += 1
        path = url.split(b"?", 1)[0]
        if path == b"/v1/chat/completions" and self.method == b"POST":
            self._chat(body, knobs, keep)
        elif path == b"/v1/models" and self.method == b"GET":
            self._reply(MODELS, not keep)
        else:
            self._reply(NOT_FOUND, not keep)

    def _reply(self, data: bytes, close: bool):
        if not self.closed:
            self.t.write(data)
            if close:
                self.t.close()

    def _chat(self, body: bytes, knobs: dict, keep: bool):
        d = self.emu.defaults
        for m in RE_KNOB.finditer(body):
            knobs.setdefault(m.group(1), float(m.group(2)))
        chunks = max(1, min(MAX_CHUNKS, int(knobs.get(b"chunks", d[b"chunks"]))))
        ttft = knobs.get(b"ttft-ms", d[b"ttft-ms"]) / 1000.0
        gap = knobs.get(b"gap-ms", d[b"gap-ms"]) / 1000.0
        m = RE_MODEL.search(body)
        model = m.group(1) if m else b"bench-upstream"
        if not RE_STREAM.search(body):
            data = self.emu.json(model, chunks)
            delay = ttft + gap * (chunks - 1)
            if delay <= 0:
                self._reply(data, not keep)
            else:
                self._pause()
                self.loop.call_later(delay, self._send_last, data, keep)
            return
        head, events, tail, whole = self.emu.stream(model, chunks, bool(RE_USAGE.search(body)), gap > 0)
        if ttft <= 0 and gap <= 0:
            self._reply(whole, not keep)
            return
        self._pause()
        self.t.write(head)
        if gap <= 0:
            self.loop.call_later(ttft, self._send_last, b"".join(events) + tail, keep)
        else:
            start = self.loop.time() + ttft
            self.loop.call_at(start, self._tick, events, tail, 0, start, gap, keep)

    def _tick(self, events, tail, i, start, gap, keep):
        if self.closed:
            return
        ev = events[i].replace(STAMP, b"ts=%019d" % time.monotonic_ns(), 1)
        if i == len(events) - 1:
            self._send_last(ev + tail, keep)
            return
        self.t.write(ev)
        self.loop.call_at(start + (i + 1) * gap, self._tick, events, tail, i + 1, start, gap, keep)

    def _pause(self):
        self.busy = True
        self.t.pause_reading()

    def _send_last(self, data: bytes, keep: bool):
        if self.closed:
            return
        self._reply(data, not keep)
        if self.busy:
            self.busy = False
            if not self.closed:
                self.t.resume_reading()


async def serve(host: str, port: int, emu: Emulator, backlog: int = 4096) -> asyncio.AbstractServer:
    """Start listening; returns the server (already serving)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: EmuProtocol(emu), host, port, backlog=backlog, reuse_address=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.emulator", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8099)
    ap.add_argument("--chunks", type=int, default=20, help="default content chunks per response")
    ap.add_argument("--ttft-ms", type=float, default=0.0, help="default time to first chunk (ms)")
    ap.add_argument("--gap-ms", type=float, default=0.0, help="default gap between chunks (ms)")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this CPU (sched_setaffinity)")
    a = ap.parse_args(argv)
    if a.cpu is not None:
        pin(0, {a.cpu})

    async def run():
        server = await serve(a.host, a.port, Emulator(a.chunks, a.ttft_ms, a.gap_ms))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, stop.set)
        print(f"emulator listening on http://{a.host}:{a.port}", flush=True)
        await stop.wait()
        server.close()

    aio_run(run())


if __name__ == "__main__":
    main()
