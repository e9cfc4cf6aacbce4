"""Hostile input: regression tests for bugs found by attacking a running gateway.

Every test here failed when it was written, each for a real bug (see its docstring). One gateway
process serves the module; a scriptable upstream on its own thread plays the misbehaving
provider (each test sets ``UP.handler``). Everything is on 127.0.0.1; processes are stopped by PID.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.harness import GatewayProcess, gateway_config
from tests.support.services import HOST, free_port

_B = '{"id":"c1","object":"chat.completion.chunk","created":1,"model":"up-1",'
ROLE = _B + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
STOP = _B + '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
TXT = _B + '"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}'


class Upstream:
    """Any path, any method: ``handler(request)`` (set by each test) answers."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.handler = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = None

    def start(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self):
        app = web.Application(client_max_size=1 << 26)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, HOST, self.port).start()

    async def _handle(self, request):
        await request.read()
        return await self.handler(request)

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def _sse(request, chunks, hold: float = 0.0):
    """Stream ``chunks`` (each written and flushed on its own, 50 ms apart), then hold, then end."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for c in chunks:
        await resp.write(c)
        await asyncio.sleep(0.05)
    if hold:
        await asyncio.sleep(hold)
    await resp.write_eof()
    return resp


UP: Upstream
GW: GatewayProcess


@pytest.fixture(scope="module", autouse=True)
def gateway(tmp_path_factory):
    global UP, GW
    UP = Upstream().start()
    models = [
        {"name": "m1", "model": "openai/up-1",
         "provider_config": {"api_key": "sk-upstream", "api_base": f"{UP.url}/v1",
                             "read_timeout_ms": 3000, "stream_idle_timeout_ms": 500}},
        {"name": "mock", "model": "mock/x", "provider_config": {"ttft_ms": 10, "tpot_ms": 1, "tokens": 3}},
        {"name": "gem", "model": "gemini/g-1", "provider_config": {"api_key": "k", "api_base": f"{UP.url}/v1beta"}},
        {"name": "claude", "model": "anthropic/c-1", "provider_config": {"api_key": "k", "api_base": f"{UP.url}/v1"}},
    ]
    cfg = gateway_config(f"{UP.url}/v1", models=models,
                         apikeys=[{"key": "sk-test", "allowed_models": ["m1", "mock", "gem", "claude"]}])
    GW = GatewayProcess(tmp_path_factory.mktemp("hostile"), cfg).start()
    try:
        yield GW
    finally:
        try:
            GW.stop()
        finally:
            GW.kill()
            UP.stop()


def _port(url_or_listen: str) -> int:
    return int(url_or_listen.rsplit(":", 1)[1].split("/")[0])


def _raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes on a fresh connection, return everything until the peer closes."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return out


def _post(path: str, body: bytes, *, extra: bytes = b"", auth: bytes = b"Bearer sk-test") -> bytes:
    port = _port(GW.listen)
    head = (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: " + auth + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n")
    return _raw(port, head + body)


def _split(resp: bytes) -> tuple[int, dict, bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            try:
                n = int(size, 16)
            except ValueError:  # not chunked framing any more: keep the rest as it came
                out += size + b"\r\n" + rest
                break
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return int(lines[0].split()[1]), headers, body


def _assert_envelope(status: int, headers: dict, body: bytes) -> dict:
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:200])
    err = json.loads(body)["error"]
    assert isinstance(err["message"], str) and "type" in err and "code" in err, err
    return err


def _chat(body: dict) -> tuple[int, dict, bytes]:
    return _split(_post("/v1/chat/completions", json.dumps(body).encode()))


def _msgs(text="hi"):
    return [{"role": "user", "content": text}]


# -- client input -------------------------------------------------------------------------------
def test_unauthenticated_gzip_bomb_does_not_stall_the_event_loop():
    """aiohttp inflates ``Content-Encoding: gzip`` request bodies inline on the event loop, and
    keeps inflating the rest of the body after the handler answered (401 or 413). A 2 MB request
    (2 GiB of zeros, gzipped), sent without a valid key, froze every other request and stream
    for ~2.4 s at a time (~5-7 s in all)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"0" * (1 << 20)
    bomb = comp.compress(b'{"model":"mock","messages":[],"x":"')
    for _ in range(2048):
        bomb += comp.compress(zeros)
    bomb += comp.compress(b'"}') + comp.flush()
    assert len(bomb) < 3 * 1024 * 1024

    lat: list[float] = []
    stop = threading.Event()

    def probe():
        req = urllib.request.Request(f"{GW.base_url}/models", headers={"Authorization": "Bearer sk-test"})
        while not stop.is_set():
            t = time.monotonic()
            urllib.request.urlopen(req, timeout=30).read()
            lat.append(time.monotonic() - t)
            time.sleep(0.01)

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    time.sleep(0.3)
    resp = _post("/v1/chat/completions", bomb, extra=b"Content-Encoding: gzip\r\n", auth=b"Bearer not-a-key")
    time.sleep(0.5)
    stop.set()
    th.join(30)
    assert resp.startswith(b"HTTP/1.1 4"), resp[:100]
    assert max(lat) < 0.5, f"event loop stalled {max(lat):.2f} s by one 2 MB unauthenticated request"


def test_corrupt_gzip_request_body_is_a_4xx_envelope_not_a_500():
    """``Content-Encoding: gzip`` (or deflate) with a body that is not gzip: 500 internal_error and
    a traceback in the log (aiohttp's RequestPayloadError escapes read_json_object). The gateway
    now refuses compressed request bodies outright: 415, RFC 9110 §15.5.16's status for an
    unsupported content coding."""
    status, headers, body = _split(_post("/v1/chat/completions", b"definitely not gzip",
                                         extra=b"Content-Encoding: gzip\r\n"))
    assert status == 415, (status, body)
    _assert_envelope(status, headers, body)


def test_a_transfer_coding_other_than_chunked_is_a_501_not_ignored():
    """Found by attacking a gateway: ``Transfer-Encoding: gzip, chunked`` was accepted and the
    gzip coding silently ignored. RFC 9112 §6.1: a coding the server does not understand is a 501."""
    body = b'{"model":"m1","messages":[{"role":"user","content":"hi"}]}'
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    for coding in (b"gzip, chunked", b"chunked"):
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Authorization: Bearer sk-test\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: " + coding + b"\r\n\r\n")
        status, headers, resp = _split(_raw(_port(GW.listen), head + chunked))
        if coding == b"chunked":
            assert status != 501, (status, resp)  # plain chunked bodies are fine
        else:
            assert status == 501 and b"unsupported_transfer_encoding" in resp, (status, resp)
            _assert_envelope(status, headers, resp)


def test_oversized_header_error_is_an_openai_envelope():
    """A header over 8190 bytes (or > 100 headers, or an over-long URL) is answered by aiohttp's
    parser with ``HTTP/1.0 400`` in text/plain that echoes the header; the README promises the
    OpenAI envelope for every error."""
    status, headers, body = _split(_post("/v1/chat/completions", b"{}", extra=b"X-Big: " + b"a" * 9000 + b"\r\n"))
    assert status in (400, 431)
    _assert_envelope(status, headers, body)


def test_malformed_request_does_not_write_the_api_key_to_the_log():
    """A request whose head aiohttp cannot parse (here LF-only line ends; also a NUL or other
    control char in a header, obs-fold) is logged by ``aiohttp.server`` at ERROR with a traceback
    whose message quotes the raw request head, ``Authorization: Bearer <key>`` included. The
    README: keys are never logged."""
    secret = b"sk-hostile-log-leak-7f3a9c"
    _raw(_port(GW.listen), b"GET /v1/models HTTP/1.1\nHost: x\nAuthorization: Bearer " + secret + b"\nConnection: close\n\n")
    _raw(_port(GW.listen), b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret + b"\x00\r\n\r\n")
    time.sleep(0.3)
    assert secret.decode() not in GW.output()


def test_mock_with_null_messages_is_not_a_500():
    """``{"model":"mock","messages":null}`` → 500 internal_error (TypeError in the mock provider)."""
    status, headers, body = _chat({"model": "mock", "messages": None})
    assert status != 500, body
    if status >= 400:
        _assert_envelope(status, headers, body)


def test_gemini_non_list_tool_calls_is_a_400():
    """``messages[i].tool_calls`` = ``true`` / a number on a gemini model → 500 internal_error
    (TypeError: 'bool' object is not iterable) instead of a 400 naming the field."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "tool_calls": True}]
    status, headers, body = _chat({"model": "gem", "messages": msgs})
    assert status == 400, (status, body)
    _assert_envelope(status, headers, body)


# -- upstreams that misbehave -------------------------------------------------------------------
def test_done_split_between_cr_and_lf_is_relayed_whole():
    """An upstream using CRLF whose last read ends between the ``\\r`` and ``\\n`` of
    ``data: [DONE]\\r\\n\\r\\n``: the client got ``data: [DONE]\\r\\n\\r`` (the final LF is never
    read, the stream stops at [DONE]), not the bytes the upstream sent."""
    events = b"".join(b"data: " + e.encode() + b"\r\n\r\n" for e in (ROLE, TXT, STOP))
    sent = [events + b"data: [DONE]\r\n\r", b"\n"]

    async def handler(request):
        return await _sse(request, sent)
    UP.handler = handler
    status, _, body = _chat({"model": "m1", "stream": True, "messages": _msgs()})
    assert status == 200
    assert body == b"".join(sent), body[-30:]


def test_stream_idle_timeout_ends_a_silent_upstream_cleanly_after_finish_reason():
    """README: a stream with no data event for ``stream_idle_timeout_ms`` is ended cleanly with
    [DONE] if a finish_reason was seen. The idle check only runs when some byte arrives, so an
    upstream that goes fully silent after its finish_reason is cut by the read timeout instead
    (here 3 s, not 0.5 s) with a 504 error event."""
    async def handler(request):
        return await _sse(request, [f"data: {ROLE}\n\ndata: {TXT}\n\ndata: {STOP}\n\n".encode()], hold=10)
    UP.handler = handler
    t = time.monotonic()
    status, _, body = _chat({"model": "m1", "stream": True, "messages": _msgs()})
    elapsed = time.monotonic() - t
    assert status == 200
    assert b'"error"' not in body, body[-200:]
    assert body.endswith(b"data: [DONE]\n\n")
    assert elapsed < 2.0, f"ended after {elapsed:.1f} s (idle timeout 0.5 s)"


def test_client_disconnect_mid_stream_logs_no_traceback():
    """A client that closes its connection while the gateway is writing a stream: the write
    raises ``ClientConnectionResetError: Cannot write to closing transport``, the middleware
    re-raises it and ``aiohttp.server`` logs "Error handling request" at ERROR with a full
    traceback, once per disconnect (20+ of them in a burst of 200 cut streams)."""
    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(f"data: {ROLE}\n\n".encode())
        for _ in range(400):
            await resp.write(f"data: {TXT}\n\n".encode() * 20)
            await asyncio.sleep(0.002)
        return resp
    UP.handler = handler
    before = len(GW.output())
    body = json.dumps({"model": "m1", "stream": True, "messages": _msgs()}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(60):
        with socket.create_connection((HOST, _port(GW.listen)), timeout=10) as s:
            s.sendall(head + body)
            s.recv(200 + 97 * i)
            if i % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    time.sleep(1)
    log = GW.output()[before:]
    assert "Traceback" not in log, log[:3000]


@pytest.mark.parametrize("status", [302, 600])
def test_upstream_status_that_is_neither_success_nor_error_is_not_relayed(status):
    """A 3xx is treated as success: with a JSON body the client gets **200** and the redirect's
    body. A status of 600 is passed to the client as HTTP 600. Both should be 502."""
    async def handler(request):
        return web.Response(status=status, body=b'{"redirected": true}', content_type="application/json",
                            headers={"Location": "http://127.0.0.1:1/"})
    UP.handler = handler
    got, headers, body = _chat({"model": "m1", "messages": _msgs()})
    assert got == 502, (got, body)
    _assert_envelope(got, headers, body)


def test_upstream_body_with_wrong_shape_is_a_502_not_a_500():
    """A 200 whose ``choices`` is ``true`` → 500 internal_error (TypeError in chat_response)."""
    async def handler(request):
        return web.json_response({"choices": True})
    UP.handler = handler
    status, headers, body = _chat({"model": "m1", "messages": _msgs()})
    assert status == 502, (status, body)
    _assert_envelope(status, headers, body)


def test_anthropic_malformed_stream_event_ends_with_an_error_event():
    """A ``text_delta`` whose ``text`` is a number makes the Anthropic decoder raise TypeError
    after the 200 went out. The middleware's catch-all then returns a fresh 500 response, which
    aiohttp writes *inside* the chunked stream (``...\r\n\r\nHTTP/1.1 500 Internal Server
    Error\r\n...``): a corrupt HTTP stream instead of the promised error event."""
    events = [
        {"type": "message_start", "message": {"id": "m", "model": "c-1", "usage": {"input_tokens": 3, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}},
        {"type": "message_stop"},
    ]
    raw = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]

    async def handler(request):
        return await _sse(request, raw)
    UP.handler = handler
    status, _, body = _chat({"model": "claude", "stream": True, "messages": _msgs()})
    assert status == 200
    assert b"HTTP/1.1 500" not in body, "a second HTTP response was written inside the chunked stream"
    assert body.rstrip().splitlines()[-1].startswith(b'data: {"error"'), body[-200:]


# -- Admin API ----------------------------------------------------------------------------------
def _admin(method: str, path: str, body: bytes = b"", auth: bytes = b"Bearer admin-test-key") -> tuple[int, dict, bytes]:
    port = _port(GW.admin_url.split("/aisix")[0])
    head = (method.encode() + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: " + auth + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    return _split(_raw(port, head + body))


def test_admin_non_utf8_authorization_is_a_401_not_a_500():
    """``Authorization: Bearer admin-test-key\\xe9`` → 500 internal_error (UnicodeEncodeError in
    _check_admin_key), reachable without any key."""
    status, headers, body = _admin("GET", "/aisix/admin/models", auth=b"Bearer admin-test-key\xe9")
    assert status == 401, (status, body)
    _assert_envelope(status, headers, body)


def test_admin_model_accepted_with_201_is_served():
    """``provider_config.api_base: "http://"`` passes validation, is normalised to ``"http:"``
    (rstrip of "/"), stored and answered 201; re-validated at publish it fails, so the model is
    silently skipped: listed by the Admin API, ``model_not_found`` on the proxy."""
    status, _, body = _admin("POST", "/aisix/admin/models",
                             b'{"name":"hostile-base","model":"openai/x","provider_config":{"api_base":"http://"}}')
    if status == 400:
        return  # refusing it is fine
    assert status == 201, body
    status, _, body = _admin("POST", "/aisix/admin/apikeys", b'{"key":"sk-hostile-base","allowed_models":["hostile-base"]}')
    assert status == 201, body
    req = urllib.request.Request(f"{GW.base_url}/models", headers={"Authorization": "Bearer sk-hostile-base"})
    served = [m["id"] for m in json.loads(urllib.request.urlopen(req, timeout=10).read())["data"]]
    assert served == ["hostile-base"], "the Admin API said 201 but the proxy does not serve the model"


# -- telemetry ----------------------------------------------------------------------------------
def test_upstream_usage_over_int64_does_not_stop_metric_export(tmp_path):
    """One upstream usage chunk with ``prompt_tokens`` >= 2**63 goes into the cumulative token
    counter; from then on every metrics export fails to encode (ValueError: Value out of range)
    and the gateway exports no metric at all until restarted."""
    posts: list[float] = []
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    mport = free_port()

    async def capture(request):
        await request.read()
        posts.append(time.monotonic())
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def start():
        app = web.Application(client_max_size=1 << 26)
        app.router.add_post("/v1/metrics", capture)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, mport).start()
        return runner
    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(10)

    big = 2 ** 63
    usage = _B + f'"choices":[],"usage":{{"prompt_tokens":{big},"completion_tokens":1,"total_tokens":{big + 1}}}}}'

    async def handler(request):
        return await _sse(request, [f"data: {ROLE}\n\ndata: {TXT}\n\ndata: {STOP}\n\ndata: {usage}\n\ndata: [DONE]\n\n".encode()])
    UP.handler = handler
    cfg = gateway_config(f"{UP.url}/v1", prom_otlp=f"http://{HOST}:{mport}/v1/metrics", export_interval_ms=200)
    gw = GatewayProcess(Path(tmp_path) / "gw", cfg).start()
    try:
        req = urllib.request.Request(f"{gw.base_url}/chat/completions", headers={"Authorization": "Bearer sk-test"},
                                     data=json.dumps({"model": "m1", "stream": True, "messages": _msgs()}).encode())
        urllib.request.urlopen(req, timeout=10).read()
        time.sleep(0.5)
        t = time.monotonic()
        time.sleep(2.0)
        after = [p for p in posts if p > t]
    finally:
        gw.stop()
        gw.kill()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
    assert len(after) >= 3, f"{len(after)} metric exports in 2 s after the bad usage (interval 200 ms)"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
                                  "/v1/responses"])
def test_json_nested_too_deep_to_send_on_is_a_400_not_a_500(path):
    """Found by attacking a gateway: a body nested 255-1023 levels deep parses (orjson reads up to
    1024) but can't be written again for the upstream (255): a 500 with a traceback on every
    route. Now a 400 before any upstream call; 240 levels still pass."""
    deep = b"[" * 300 + b"]" * 300
    body = b'{"model":"m1","prompt":"p","input":"hi","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"x":' \
        + deep + b"}"
    head, _, rest = _post(path, body).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"nested over 240 levels" in rest, head + rest[:300]

