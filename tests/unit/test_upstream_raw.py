"""The raw upstream client (aisix/upstream/raw.py) against real servers on loopback: aiohttp.web
for well-behaved upstreams, small asyncio stream servers for the misbehaving ones.

Every test runs on both asyncio's own loop and uvloop (the gateway's).
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import time

import pytest
import uvloop
from aiohttp import web
from multidict import CIMultiDict

pytest.importorskip("httptools")  # without it UpstreamPool uses aiohttp only

from aisix.config.resources import ProviderConfig
from aisix.upstream.errors import (
    ConnectError,
    ConnectTimeout,
    ReadTimeout,
    RemoteProtocolError,
    ResponseTooLarge,
    StreamBroken,
    UpstreamError,
)
from aisix.upstream.pool import UpstreamPool, UpstreamRequest
from aisix.upstream.raw import HIGH_WATER, RawPool, RawResponse

HOST = "127.0.0.1"
LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}
BIG = bytes(range(256)) * 400  # 100 KiB


def both_loops(fn):
    """A sync test that runs the coroutine function ``fn`` on each loop (30 s bound); ``fn``'s own
    parameters (and ``parametrize`` marks) are kept."""
    names = list(inspect.signature(fn).parameters)

    def test(loop, **kw):
        LOOPS[loop](asyncio.wait_for(fn(**kw), 30))
    test.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("loop", *names)])
    test.pytestmark = [*getattr(fn, "pytestmark", []), pytest.mark.parametrize("loop", list(LOOPS))]
    test.__name__ = fn.__name__
    test.__doc__ = fn.__doc__
    return test


# -- an aiohttp upstream ---------------------------------------------------------------------
class State:
    def __init__(self):
        self.requests: list[dict] = []
        self.written = 0
        self.disconnected = asyncio.Event()


async def _chunked(request, state, parts, delay=0.05):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Request-Id": "abc"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for i, p in enumerate(parts):
        if i:
            await asyncio.sleep(delay)
        await resp.write(p)
    await resp.write_eof()
    return resp


def _app(state: State) -> web.Application:
    async def record(request):
        state.requests.append({"path": request.path, "headers": dict(request.headers),
                               "body": await request.read(),
                               "peer": request.transport.get_extra_info("peername")})

    async def chunked(request):
        await record(request)
        return await _chunked(request, state, [b"alpha", b"beta", b"gamma"])

    async def length(request):
        await record(request)
        return web.Response(body=BIG, content_type="application/octet-stream")

    async def close(request):
        await record(request)
        resp = web.Response(body=b"bye")
        resp.force_close()
        return resp

    async def slowhead(request):
        await record(request)
        await asyncio.sleep(2)
        return web.Response(body=b"late")

    async def stall(request):
        await record(request)
        return await _chunked(request, state, [b"first", b"late"], delay=2)

    async def done_late(request):
        await record(request)
        return await _chunked(request, state, [b"data: [DONE]\n\n", b""], delay=0.1)

    async def forever(request):
        await record(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for _ in range(500):
                await resp.write(b"tick\n")
                await asyncio.sleep(0.02)
        except (ConnectionError, asyncio.CancelledError):
            state.disconnected.set()
            raise
        return resp

    async def big(request):
        await record(request)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        block = b"x" * 65536
        for _ in range(1024):  # 64 MiB
            await resp.write(block)
            state.written += len(block)
        await resp.write_eof()
        return resp

    app = web.Application()
    for path, h in [("/chunked", chunked), ("/length", length), ("/close", close), ("/slowhead", slowhead),
                    ("/stall", stall), ("/done-late", done_late), ("/forever", forever), ("/big", big)]:
        app.router.add_post(path, h)
    return app


@contextlib.asynccontextmanager
async def aiohttp_upstream(**runner_kw):
    state = State()
    runner = web.AppRunner(_app(state), shutdown_timeout=0.1, **runner_kw)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    state.port = runner.addresses[0][1]
    state.url = f"http://{HOST}:{state.port}"
    try:
        yield state
    finally:
        await runner.cleanup()


# -- misbehaving upstreams on raw streams ------------------------------------------------------
async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(n)


@contextlib.asynccontextmanager
async def raw_upstream(answer):
    """``answer(conn_no, req_no_on_conn, writer)`` writes (or closes) per request; the server keeps
    reading requests on a connection until it is closed. ``.requests``: (conn_no, req_no) seen."""
    seen = []
    conns = [0]

    async def handle(reader, writer):
        conns[0] += 1
        c, i = conns[0], 0
        try:
            while not writer.is_closing():
                await _read_request(reader)
                i += 1
                seen.append((c, i))
                await answer(c, i, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{HOST}:{port}", seen
    finally:
        server.close()


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def send(pool: RawPool, url: str, body: bytes = b"{}", headers=None, connect=2.0, read=2.0) -> RawResponse:
    return await pool.send("POST", url, headers or {"Content-Type": "application/json"}, body, connect, read)


async def chunks(resp: RawResponse) -> list[bytes]:
    return [c async for c in resp.iter_chunks()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# -- bodies ----------------------------------------------------------------------------------
@both_loops
async def test_chunked_body_keeps_each_read_as_one_item():
    async with aiohttp_upstream() as up:
        pool = RawPool()
        r = await send(pool, up.url + "/chunked")
        assert r.status == 200
        assert isinstance(r.headers, CIMultiDict)
        assert r.headers["x-request-id"] == "abc" and r.headers["X-REQUEST-ID"] == "abc"
        assert r.headers["content-type"] == "text/event-stream"
        assert await chunks(r) == [b"alpha", b"beta", b"gamma"]  # de-chunked, one per write
        await pool.close()


@both_loops
async def test_content_length_body_read_and_iterated():
    async with aiohttp_upstream() as up:
        pool = RawPool()
        r = await send(pool, up.url + "/length")
        assert r.status == 200 and int(r.headers["content-length"]) == len(BIG)
        assert await r.read() == BIG
        assert await r.read() == BIG  # cached
        r.close()  # after a full read: a no-op, the connection is already back in the pool
        r = await send(pool, up.url + "/length")
        assert b"".join(await chunks(r)) == BIG
        r.release()
        assert up.requests[0]["peer"] == up.requests[1]["peer"]
        await pool.close()


@both_loops
async def test_request_carries_host_content_length_and_only_the_callers_headers():
    async with aiohttp_upstream() as up:
        pool = RawPool()
        body = b'{"model": "m", "x": "' + b"y" * 5000 + b'"}'
        r = await send(pool, up.url + "/length", body,
                       {"Content-Type": "application/json", "Authorization": "Bearer k", "traceparent": "00-1-2-01",
                        "content-length": "999"})
        await r.read()
        seen = up.requests[0]
        h = seen["headers"]
        assert seen["body"] == body
        assert h["Host"] == f"{HOST}:{up.port}"
        assert h["Content-Length"] == str(len(body))
        assert h["Authorization"] == "Bearer k" and h["traceparent"] == "00-1-2-01"
        assert "Accept-Encoding" not in h and "User-Agent" not in h and "Transfer-Encoding" not in h
        with pytest.raises(ValueError):
            await send(pool, up.url + "/length", headers={"X-Evil": "a\r\nInjected: 1"})
        await pool.close()


# -- keep-alive ------------------------------------------------------------------------------
@both_loops
async def test_sequential_requests_reuse_one_connection():
    async with aiohttp_upstream() as up:
        pool = RawPool()
        for path in ("/chunked", "/length", "/chunked"):
            r = await send(pool, up.url + path)
            await r.read()
        assert len({req["peer"] for req in up.requests}) == 1
        assert len(pool.conns) == 1
        await pool.close()


@both_loops
async def test_release_at_done_before_the_last_chunk_still_pools_the_connection():
    """The relay stops at ``data: [DONE]`` and releases; the terminating chunk comes 100 ms later."""
    async with aiohttp_upstream() as up:
        pool = RawPool()
        r = await send(pool, up.url + "/done-late")
        async for c in r.iter_chunks():
            assert c == b"data: [DONE]\n\n"
            break
        r.release()
        await asyncio.sleep(0.4)
        r = await send(pool, up.url + "/length")
        assert await r.read() == BIG
        assert up.requests[0]["peer"] == up.requests[1]["peer"]
        await pool.close()


@both_loops
async def test_connection_close_response_is_not_pooled():
    async with aiohttp_upstream() as up:
        pool = RawPool()
        r = await send(pool, up.url + "/close")
        assert await r.read() == b"bye"
        r.release()
        assert not any(pool.idle.values()) and not pool.conns
        r = await send(pool, up.url + "/close")
        assert await r.read() == b"bye"
        assert up.requests[0]["peer"] != up.requests[1]["peer"]
        await pool.close()


@both_loops
async def test_body_delimited_by_close():
    async def answer(c, i, w):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ")
        await asyncio.sleep(0.05)
        w.write(b"world")
        w.close()

    async with raw_upstream(answer) as (url, seen):
        pool = RawPool()
        r = await send(pool, url)
        assert await r.read() == b"hello world"
        assert not pool.conns
        await pool.close()


@both_loops
async def test_server_closing_an_idle_pooled_connection():
    async with aiohttp_upstream(keepalive_timeout=0.2) as up:
        pool = RawPool()
        r = await send(pool, up.url + "/length")
        await r.read()
        await asyncio.sleep(0.6)  # the server closed it meanwhile
        r = await send(pool, up.url + "/length")
        assert await r.read() == BIG
        assert up.requests[0]["peer"] != up.requests[1]["peer"]
        await pool.close()


@both_loops
async def test_reused_connection_closed_before_any_response_byte_is_retried_once_on_a_new_one():
    """The keep-alive race: the server drops the pooled connection as the second request arrives."""
    async def answer(c, i, w):
        if i == 1:
            w.write(ok(b"one"))
        else:
            w.close()

    async with raw_upstream(answer) as (url, seen):
        pool = RawPool()
        assert await (await send(pool, url)).read() == b"one"
        assert await (await send(pool, url)).read() == b"one"  # answered on a new connection
        assert seen == [(1, 1), (1, 2), (2, 1)]
        await pool.close()


@both_loops
async def test_no_retry_after_a_response_byte_or_on_a_new_connection():
    async def answer(c, i, w):
        if c == 1 and i == 1:
            w.write(ok(b"one"))
        elif c == 1:
            w.write(b"HTTP/1.1 200 OK\r\n")  # part of a response, then gone
            await asyncio.sleep(0.05)
            w.close()
        else:
            w.close()  # a new connection closed before answering

    async with raw_upstream(answer) as (url, seen):
        pool = RawPool()
        assert await (await send(pool, url)).read() == b"one"
        with pytest.raises(UpstreamError) as e:
            await send(pool, url)
        assert isinstance(e.value, ConnectError)
        assert seen == [(1, 1), (1, 2)]
        with pytest.raises(UpstreamError) as e:
            await send(pool, url)
        assert isinstance(e.value, ConnectError)
        assert seen == [(1, 1), (1, 2), (2, 1)]
        await pool.close()


# -- errors ----------------------------------------------------------------------------------
@both_loops
async def test_connection_refused_is_a_connect_error():
    pool = RawPool()
    with pytest.raises(UpstreamError) as e:
        await send(pool, f"http://{HOST}:{free_port()}/v1/chat/completions")
    assert isinstance(e.value, ConnectError)


@both_loops
async def test_connect_timeout_is_a_connect_timeout():
    lsock = socket.socket()
    lsock.bind((HOST, 0))
    lsock.listen(0)  # never accepted: once its queue is full, further SYNs are dropped
    port = lsock.getsockname()[1]
    fill = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect((HOST, port))
        fill.append(s)
    try:
        await asyncio.sleep(0.1)
        pool = RawPool()
        t = time.monotonic()
        with pytest.raises(UpstreamError) as e:
            await send(pool, f"http://{HOST}:{port}/", connect=0.3)
        assert isinstance(e.value, ConnectTimeout)
        assert 0.25 < time.monotonic() - t < 2
    finally:
        for s in fill:
            s.close()
        lsock.close()


@both_loops
async def test_slow_headers_is_a_read_timeout():
    async with aiohttp_upstream() as up:
        pool = RawPool()
        t = time.monotonic()
        with pytest.raises(UpstreamError) as e:
            await send(pool, up.url + "/slowhead", read=0.3)
        assert isinstance(e.value, ReadTimeout)
        assert 0.25 < time.monotonic() - t < 1.5
        assert not pool.conns  # the connection was dropped
        await pool.close()


@both_loops
async def test_read_stall_is_504():
    async with aiohttp_upstream() as up:
        pool = RawPool()
        r = await send(pool, up.url + "/stall", read=0.3)
        it = r.iter_chunks().__aiter__()
        assert await it.__anext__() == b"first"
        t = time.monotonic()
        with pytest.raises(UpstreamError) as e:
            await it.__anext__()
        assert isinstance(e.value, ReadTimeout)
        assert 0.25 < time.monotonic() - t < 1.5
        assert not pool.conns
        await pool.close()


@both_loops
async def test_broken_connection_mid_body_is_502():
    async def answer(c, i, w):
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npart\r\n")
        await asyncio.sleep(0.05)
        w.close()

    async with raw_upstream(answer) as (url, seen):
        pool = RawPool()
        r = await send(pool, url)
        it = r.iter_chunks().__aiter__()
        assert await it.__anext__() == b"part"
        with pytest.raises(UpstreamError) as e:
            await it.__anext__()
        assert isinstance(e.value, StreamBroken)
        await pool.close()


@both_loops
async def test_malformed_response_is_a_remote_protocol_error():
    async def answer(c, i, w):
        w.write(b"this is not http\r\n\r\n")

    async with raw_upstream(answer) as (url, seen):
        pool = RawPool()
        with pytest.raises(UpstreamError) as e:
            await send(pool, url)
        assert isinstance(e.value, RemoteProtocolError)
        await pool.close()


# -- close and backpressure -------------------------------------------------------------------
@both_loops
async def test_close_mid_body_closes_the_socket():
    async with aiohttp_upstream() as up:
        pool = RawPool()
        r = await send(pool, up.url + "/forever")
        async for c in r.iter_chunks():
            assert c.startswith(b"tick")
            break
        r.close()
        assert not pool.conns
        await asyncio.wait_for(up.disconnected.wait(), 3)  # the server's next write failed
        await pool.close()


@both_loops
async def test_a_consumer_that_does_not_read_blocks_the_servers_writes():
    async with aiohttp_upstream() as up:
        pool = RawPool()
        r = await send(pool, up.url + "/big")
        await asyncio.sleep(0.6)
        w1 = up.written
        await asyncio.sleep(0.4)
        w2 = up.written
        assert w1 == w2, "the server kept writing to a consumer that does not read"
        assert w1 < 32 * 2**20  # kernel buffers + HIGH_WATER + one read, far below 64 MiB
        conn = next(iter(pool.conns))
        assert conn.paused and conn.size >= HIGH_WATER
        total = 0
        async for c in r.iter_chunks():
            total += len(c)
        assert total == 64 * 2**20 and up.written == total
        await pool.close()


# -- through UpstreamPool ----------------------------------------------------------------------
@both_loops
async def test_upstream_pool_uses_the_raw_client_for_http():
    async with aiohttp_upstream() as up:
        pool = UpstreamPool(use_raw=True)
        cfg = ProviderConfig(read_timeout_ms=2000)
        r = await pool.send(UpstreamRequest(up.url + "/chunked", {"Content-Type": "application/json"}, b"{}"), cfg)
        assert isinstance(r, RawResponse) and await r.read() == b"alphabetagamma"
        assert pool.raw is not None and not pool.sessions
        pool.use_raw = False
        r = await pool.send(UpstreamRequest(up.url + "/chunked", {"Content-Type": "application/json"}, b"{}"), cfg)
        assert not isinstance(r, RawResponse) and await r.read() == b"alphabetagamma"
        r.release()
        await pool.close()


# -- hostile upstreams: bounded reads (issue 15 item 2) --------------------------------------
async def _endless(w, head: bytes, block: bytes, limit: int = 64 * 2**20):
    """Write ``head``, then ``block`` again and again (up to ``limit`` bytes) until the peer goes."""
    w.write(head)
    sent = 0
    while sent < limit and not w.is_closing():
        w.write(block)
        sent += len(block)
        await w.drain()


def _too_large(e: pytest.ExceptionInfo) -> bool:
    return isinstance(e.value, ResponseTooLarge)


@both_loops
async def test_endless_response_header_is_502_too_large():
    """An upstream that never ends its header line: the raw client kept every byte (an endless
    header grew RSS by gigabytes); now it gives up past the head limit and closes the connection."""
    async def answer(c, i, w):
        try:
            await _endless(w, b"HTTP/1.1 200 OK\r\nX-Endless: ", b"a" * 65536)
        except ConnectionError:
            pass

    async with raw_upstream(answer) as (url, _):
        pool = RawPool()
        with pytest.raises(UpstreamError) as e:
            await send(pool, url, read=10.0)
        assert _too_large(e), e.value.body()
        assert not pool.conns
        await pool.close()


@both_loops
@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 9000 + b"\r\nContent-Length: 2\r\n\r\nok",        # one line over 8190
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"Content-Length: 2\r\n\r\nok",
])
async def test_a_header_line_over_8190_bytes_or_over_100_fields_is_502(head):
    async def answer(c, i, w):
        w.write(head)

    async with raw_upstream(answer) as (url, _):
        pool = RawPool()
        with pytest.raises(UpstreamError) as e:
            await send(pool, url)
        assert _too_large(e), e.value.body()
        assert not pool.conns
        await pool.close()


@both_loops
async def test_a_hundred_header_fields_of_8190_bytes_pass():
    fields = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 8000) for i in range(7))
    async def answer(c, i, w):
        w.write(b"HTTP/1.1 200 OK\r\n" + fields + b"".join(b"X-S%d: v\r\n" % i for i in range(92))
                + b"Content-Length: 2\r\n\r\nok")

    async with raw_upstream(answer) as (url, _):
        pool = RawPool()
        r = await send(pool, url)
        assert r.headers["X-H6"] == "v" * 8000 and await r.read() == b"ok"
        await pool.close()


@both_loops
@pytest.mark.parametrize("framing", ["content-length", "chunked", "close"])
async def test_a_body_over_max_body_is_502_and_the_connection_closed(framing):
    """``read()`` stops at ``max_body`` bytes (a 300 MiB body took ~1 GB of RSS): 502
    ``upstream_response_too_large``, the connection aborted, never pooled."""
    size = 3 * 2**20
    heads = {"content-length": b"Content-Length: %d\r\n" % size, "chunked": b"Transfer-Encoding: chunked\r\n",
             "close": b"Connection: close\r\n"}
    block = b"x" * 65536
    frame = (lambda b: b"%x\r\n%s\r\n" % (len(b), b)) if framing == "chunked" else (lambda b: b)

    async def answer(c, i, w):
        try:
            await _endless(w, b"HTTP/1.1 200 OK\r\n" + heads[framing] + b"\r\n", frame(block), size)
        except ConnectionError:
            pass

    async with raw_upstream(answer) as (url, _):
        pool = RawPool()
        r = await pool.send("POST", url, {}, b"{}", 2.0, 5.0, max_body=2**20)
        with pytest.raises(UpstreamError) as e:
            await r.read()
        assert _too_large(e), e.value.body()
        assert not pool.conns and not any(pool.idle.values())
        r = await pool.send("POST", url, {}, b"{}", 2.0, 5.0, max_body=size)  # at the limit: fine
        if framing != "content-length":
            r.close()  # these never end by themselves here
        else:
            assert len(await r.read()) == size
        await pool.close()


@both_loops
async def test_an_aborted_connection_is_not_held_by_its_read_timeout_timer():
    """With a 600 s read timeout, an aborted connection (and the bytes it buffered) stayed
    referenced by the armed timer until it fired."""
    import gc
    import weakref

    async def answer(c, i, w):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"y" * 500_000)
        await asyncio.sleep(5)

    async with raw_upstream(answer) as (url, _):
        pool = RawPool()
        r = await send(pool, url, read=600.0)
        it = r.iter_chunks().__aiter__()
        await it.__anext__()
        conn = weakref.ref(r._conn)
        r.close()
        del r, it
        await asyncio.sleep(0.05)
        gc.collect()
        assert conn() is None, gc.get_referrers(conn())
        await pool.close()


# -- hostile upstreams: one response per request (issue 9 item 13) ---------------------------
SECOND = b"HTTP/1.1 500 Internal Server Error\r\nX-Second: 1\r\nContent-Length: 6\r\n\r\nsecond"


@both_loops
@pytest.mark.parametrize("first", [
    b"HTTP/1.1 200 OK\r\nX-First: 1\r\nContent-Length: 5\r\n\r\nfirst",
    b"HTTP/1.1 200 OK\r\nX-First: 1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-First: 1\r\nConnection: close\r\nContent-Length: 5\r\n\r\nfirst",
], ids=["content-length", "chunked", "connection-close"])
async def test_a_second_response_never_joins_the_first(first):
    """An unasked second response right behind the first, in the same write: its status and
    headers replaced the first's and its body joined the first's. The first response ends where
    its framing says; the connection is then unusable (a new one serves the next request)."""
    async def answer(c, i, w):
        w.write(first + SECOND)

    async with raw_upstream(answer) as (url, seen):
        pool = RawPool()
        for _ in range(2):
            r = await send(pool, url)
            assert r.status == 200 and "X-Second" not in r.headers and r.headers["X-First"] == "1"
            assert await r.read() == b"first"
            r.release()
            assert not any(pool.idle.values())
        assert [c for c, _ in seen] == [1, 2]
        await pool.close()


@both_loops
async def test_a_second_response_arriving_later_is_never_read_as_the_next_one():
    """The unasked second response arrives after the first was read: the pooled connection is
    dropped, and the next request goes out on a new connection and gets its own answer."""
    async def answer(c, i, w):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        await asyncio.sleep(0.1)
        w.write(SECOND)

    async with raw_upstream(answer) as (url, seen):
        pool = RawPool()
        r = await send(pool, url)
        assert await r.read() == b"first"
        await asyncio.sleep(0.3)
        r = await send(pool, url)
        assert r.status == 200 and await r.read() == b"first"
        assert [c for c, _ in seen] == [1, 2]
        await pool.close()


@both_loops
async def test_the_aiohttp_path_caps_bodies_read_whole_too():
    async with aiohttp_upstream() as up:
        pool = UpstreamPool(use_raw=False)
        cfg = ProviderConfig(read_timeout_ms=5000, max_response_bytes=2**20)
        for path in ("/big", "/length"):  # 64 MiB chunked; 100 KiB with Content-Length (over 50 KiB)
            if path == "/length":
                cfg = ProviderConfig(read_timeout_ms=5000, max_response_bytes=50_000)
            r = await pool.send(UpstreamRequest(up.url + path, {"Content-Type": "application/json"}, b"{}"), cfg)
            with pytest.raises(UpstreamError) as e:
                await r.read()
            assert _too_large(e), e.value.body()
        assert up.written < 64 * 2**20
        await pool.close()
