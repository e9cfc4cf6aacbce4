"""A raw HTTP/1.1 upstream client for ``http://`` URLs: an asyncio Protocol per connection,
``httptools`` (llhttp) to parse responses, and a keep-alive pool per ``(scheme, host, port)``.

It does what :class:`aisix.upstream.pool.UpstreamPool` needs and no more: one request per
connection at a time (no pipelining), ``POST``/``GET`` with a body and ``Content-Length``,
responses framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or connection close.
It exists because aiohttp's client machinery (``ClientSession._request``,
``ClientRequest.send``, ``StreamReader``) was ~30 % of the gateway's CPU under streaming load.

What goes out: the request line, ``Host`` (the URL's ``host[:port]``, unless the caller gave
one), the caller's headers as they are (nothing added: no ``Accept-Encoding``, no
``User-Agent``; a caller's ``Content-Length``/``Transfer-Encoding``/``Connection`` are
replaced), ``Content-Length`` of the body, then the body, in one write.

What comes back (:class:`RawResponse`, the :class:`~aisix.upstream.pool.UpstreamResponse`
interface): ``status``, ``headers`` (a :class:`multidict.CIMultiDict`), ``await read()``,
``async for chunk in iter_chunks()`` (the de-chunked body bytes exactly as sent: one item per
socket read while the consumer keeps up; what arrived meanwhile, joined, when it falls
behind), ``close()`` (abort: the socket is closed now) and ``release()``.

Connection reuse: a response whose body was read to the end (``read()`` returned, or
``iter_chunks()`` ended) goes back to the pool by itself, and a later ``close()`` is a no-op
(as with aiohttp, whose ``close()`` after a full read releases nothing). ``release()`` on a
response whose last bytes have not arrived yet (a stream the caller stops reading at
``data: [DONE]``, before the upstream's terminating zero-length chunk) lets the connection
finish reading the message in the background: it returns to the pool when the message ends,
and is closed if that takes over ``DRAIN_TIMEOUT_S`` or ``DRAIN_MAX_BYTES``. A response that
does not allow keep-alive (``Connection: close``, HTTP/1.0, a body delimited by close) is
never pooled.

Errors, from :mod:`aisix.upstream.errors` (the proxy maps them to the client's error):
:class:`ConnectError` when the connection cannot be made or closes before any byte of an
answer; :class:`ConnectTimeout` when connecting takes over ``connect_timeout_ms``;
:class:`ReadTimeout` when no byte arrives for ``read_timeout_ms`` while the caller waits (for
the headers, or between reads); :class:`RemoteProtocolError` when the response cannot be
parsed; :class:`StreamBroken` when the connection breaks mid-body; :class:`ResponseTooLarge`
for a response head over ``MAX_HEAD_BYTES``, a header field over ``MAX_FIELD_BYTES`` or more
than ``MAX_FIELDS`` of them (aiohttp's client limits), and for a body that ``read()`` would hold
whole over ``max_body`` bytes. An aborted connection lets go
of everything at once: its read-timeout timer is cancelled and its unread bytes dropped.

One response per request: a response ends where its own framing says (``Content-Length``,
chunked, or the connection's end). Bytes after it (an unasked second response) are never parsed
into it: they are dropped, and the connection is closed instead of pooled.

Retry: a request is sent again, once, on a new connection only when it went out on a *reused*
pooled connection that broke before any byte of the response arrived: the server closed the
idle connection while the request was on its way (the keep-alive race). Requests are POSTs,
not idempotent in general; this case is safe because a server that closed an idle keep-alive
connection did not process a request on it. A failure on a new connection, or after any
response byte, is never retried.

Backpressure: body bytes the caller has not taken yet are buffered up to ``HIGH_WATER``
bytes; past it the socket is no longer read (``pause_reading``) until the caller takes them,
so a slow client slows the upstream through TCP flow control.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Mapping

import httptools
from multidict import CIMultiDict
from yarl import URL

from aisix.upstream.errors import (
    ConnectError,
    ConnectTimeout,
    ReadTimeout,
    RemoteProtocolError,
    ResponseTooLarge,
    StreamBroken,
    UpstreamError,
    body_too_large,
)

#: Body bytes buffered for a caller that does not read before the socket is paused (bytes).
HIGH_WATER = 64 * 1024
#: An idle pooled connection older than this is closed instead of reused (seconds).
KEEPALIVE_S = 60.0
#: After release() before the end of the message: the longest wait for it, and the most bytes read.
DRAIN_TIMEOUT_S = 2.0
DRAIN_MAX_BYTES = 256 * 1024
#: Response head limits: one header field (name + value, bytes), the number of fields (aiohttp's
#: client: 8190-byte lines), and the whole head, status line and interim responses included (bytes).
MAX_FIELD_BYTES = 8190
MAX_FIELDS = 100
MAX_HEAD_BYTES = 64 * 1024

_IDLE, _ACTIVE, _DRAINING, _CLOSED = 0, 1, 2, 3
_REPLACED = frozenset(("host", "content-length", "transfer-encoding", "connection"))


class _Lost(ConnectError):
    """The connection broke before the response headers were in (retried once on a reused one)."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time; holds the response's parse state."""

    __slots__ = ("loop", "pool", "key", "parser", "transport", "state", "reused", "idle_since",
                 "waiter", "want_body", "deadline", "timer_at", "timer", "status", "raw_headers",
                 "headers_done", "buf", "size", "complete", "keep", "got_bytes", "paused",
                 "lost", "extra", "drain_timer", "drained", "head_size", "__weakref__")

    def __init__(self, pool: "RawPool", key: tuple):
        self.loop = pool.loop
        self.pool = pool
        self.key = key
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.state = _IDLE
        self.reused = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future | None = None
        self.deadline = 0.0
        self.timer_at = 0.0  # when the armed read-timeout timer fires (0: none armed)
        self.timer: asyncio.TimerHandle | None = None
        self.drain_timer = None
        self.lost: BaseException | None = None
        self.paused = False
        self._reset()

    def _reset(self) -> None:
        self.want_body = False
        self.status = 0
        self.raw_headers: list = []
        self.headers_done = False
        self.buf: list[bytes] = []
        self.size = 0
        self.complete = False
        self.keep = False
        self.got_bytes = False
        self.extra = False  # bytes came after the response: dropped, the connection not reusable
        self.drained = 0
        self.head_size = 0  # bytes received before the final response's headers were complete

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state != _ACTIVE and state != _DRAINING:
            self.abort()  # bytes nobody asked for (on an idle connection): not reusable
            return
        if self.extra:
            return  # after the response's end: never parsed; the connection is closed at finish()
        self.got_bytes = True
        if not self.headers_done:
            self.head_size += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self.complete:  # e.g. bytes after a `Connection: close` response
                self._extra_bytes()
            else:
                self.lost = self.lost or RemoteProtocolError(f"the upstream sent a malformed HTTP response: {e}")
                self.abort()
                return
        if not self.headers_done and self.head_size > MAX_HEAD_BYTES and self.lost is None:
            self.lost = ResponseTooLarge(f"the upstream's response head is over {MAX_HEAD_BYTES} bytes")
        if self.lost is not None and not self.complete:
            self.abort()
            return
        if state == _DRAINING:
            self.drained += len(data)
            self.buf.clear()
            if self.complete:
                self._drain_done()
            elif self.drained > DRAIN_MAX_BYTES:
                self.abort()
            return
        w = self.waiter
        if w is not None and self.headers_done and (not self.want_body or self.buf or self.complete):
            self.waiter = None
            if not w.done():
                w.set_result(None)
        if self.size > HIGH_WATER and not self.paused and not self.complete:
            self.paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc) -> None:
        state = self.state
        self.state = _CLOSED
        self.pool.conns.discard(self)
        if self.drain_timer is not None:
            self.drain_timer.cancel()
            self.drain_timer = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.timer_at = 0.0
        if state == _IDLE:
            idle = self.pool.idle.get(self.key)
            if idle is not None:
                try:
                    idle.remove(self)
                except ValueError:
                    pass
            return
        if state != _ACTIVE:
            return
        if self.headers_done and not self.complete and self.lost is None and self._until_eof():
            self.complete = True  # a body delimited by the end of the connection ended
            self.keep = False
        elif not self.complete and self.lost is None:
            if self.headers_done:
                self.lost = StreamBroken("the upstream connection broke mid-body")
            else:
                self.lost = _Lost(f"the upstream closed the connection before answering: {exc or 'eof'}")
        self._wake()

    def _extra_bytes(self) -> None:
        """Bytes after the response's end: drop them (and what follows), never pool this connection."""
        self.extra = True
        self.keep = False
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    # -- httptools callbacks (they parse into the current response only) ----------------------
    def on_message_begin(self) -> None:
        if self.complete:
            self._extra_bytes()  # a second response to one request

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.extra or self.lost is not None:
            return
        if len(name) + len(value) > MAX_FIELD_BYTES:
            self.lost = ResponseTooLarge(f"the upstream sent a response header field over {MAX_FIELD_BYTES} bytes")
        elif len(self.raw_headers) >= MAX_FIELDS:
            self.lost = ResponseTooLarge(f"the upstream sent over {MAX_FIELDS} response header fields")
        else:
            self.raw_headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        if self.extra or self.lost is not None:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.raw_headers = []  # an interim response (100 Continue, 103): the real one follows
            return
        self.status = status
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if self.extra or self.lost is not None:
            return
        self.buf.append(body)
        self.size += len(body)

    def on_message_complete(self) -> None:
        if self.extra or self.lost is not None or not self.headers_done:
            return  # the end of an interim response (or of one that is not ours)
        self.complete = True
        self.keep = self.parser.should_keep_alive()

    # -- used by the pool and the response -----------------------------------------------------
    def _until_eof(self) -> bool:
        h = self.raw_headers
        if self.status in (204, 304):
            return False
        for name, _ in h:
            n = name.lower()
            if n == "content-length" or n == "transfer-encoding":
                return False
        return True

    def _wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def abort(self) -> None:
        t = self.transport
        if self.state != _CLOSED and t is not None:
            self.state = _CLOSED
            self.pool.conns.discard(self)
            t.abort()
            if self.lost is None and not self.complete:
                self.lost = ConnectError("the upstream connection was closed")
            self._wake()
        self._let_go()

    def _let_go(self) -> None:
        """A closed connection holds nothing: no armed timer (it would keep it referenced for up
        to ``read_timeout_ms``), no parser state, no bytes of an unfinished body."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.timer_at = 0.0
        if not self.complete:
            self.buf.clear()
            self.size = 0
        self.parser = None

    def start(self, data: bytes) -> None:
        """Send one request on this connection (idle or new)."""
        self._reset()
        self.state = _ACTIVE
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self.transport.write(data)

    async def wait(self, timeout: float) -> None:
        """Wait for the next event (headers, body bytes, end, loss). Raises 504 after ``timeout`` s.

        One lazily re-armed timer per connection serves every wait (a stream waits once per
        read): it fires at the earliest deadline and re-arms itself if the wait it found is
        younger than its deadline."""
        loop = self.loop
        w = self.waiter = loop.create_future()
        self.deadline = deadline = loop.time() + timeout
        if not self.timer_at or self.timer_at > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = deadline
            self.timer = loop.call_at(deadline, self._on_timer, deadline)
        await w
        if w.result() is not None:
            raise ReadTimeout(w.result())

    def _on_timer(self, at: float) -> None:
        if at != self.timer_at:
            return  # superseded by an earlier one
        self.timer_at = 0.0
        self.timer = None
        w = self.waiter
        if w is None or w.done() or self.state == _CLOSED:
            return
        if self.loop.time() >= self.deadline:
            self.waiter = None
            w.set_result("the upstream did not answer in time" if not self.headers_done
                         else "the upstream stream stalled (read timeout)")
        else:
            self.timer_at = self.deadline
            self.timer = self.loop.call_at(self.deadline, self._on_timer, self.deadline)

    def take(self) -> bytes:
        buf = self.buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        self.size = 0
        if self.paused and not self.extra:
            self.paused = False
            self.transport.resume_reading()
        return data

    def finish(self) -> None:
        """The caller is done with the response: pool, drain or close the connection."""
        if self.state != _ACTIVE:
            return
        if self.lost is not None:
            self.abort()
        elif self.complete:
            if self.keep:
                self.pool._put(self)
            else:
                self.abort()
        elif self.headers_done:
            self.state = _DRAINING
            self.buf.clear()
            self.size = 0
            if self.paused:
                self.paused = False
                self.transport.resume_reading()
            self.drain_timer = self.loop.call_later(DRAIN_TIMEOUT_S, self.abort)
        else:
            self.abort()

    def _drain_done(self) -> None:
        if self.drain_timer is not None:
            self.drain_timer.cancel()
            self.drain_timer = None
        if self.keep:
            self.state = _ACTIVE
            self.pool._put(self)
        else:
            self.abort()


class RawResponse:
    """An upstream response being read; see the module doc for ``close()``/``release()``.
    ``max_body``: the most bytes ``read()`` holds (None: no limit); streams are not limited."""

    __slots__ = ("_conn", "_timeout", "status", "headers", "_body", "_max_body")

    def __init__(self, conn: _Conn, timeout: float, max_body: int | None = None):
        self._conn: _Conn | None = conn
        self._timeout = timeout
        self._max_body = max_body
        self.status = conn.status
        self.headers: Mapping[str, str] = CIMultiDict(conn.raw_headers)
        self._body: bytes | None = None
        conn.want_body = True

    async def _next(self) -> bytes:
        """The next body bytes; ``b""`` at the end (the connection is then released)."""
        conn = self._conn
        if conn is None:
            return b""
        while True:
            if conn.buf:
                return conn.take()
            if conn.complete:
                self._conn = None
                conn.finish()
                return b""
            if conn.lost is not None:
                self._conn = None
                conn.abort()
                raise conn.lost if isinstance(conn.lost, UpstreamError) else ConnectError(str(conn.lost))
            try:
                await conn.wait(self._timeout)
            except BaseException:
                self._conn = None
                conn.abort()
                raise

    async def read(self) -> bytes:
        """The whole body. Raises :class:`ResponseTooLarge` past ``max_body`` bytes (the
        connection is closed; a ``Content-Length`` over it fails before any body byte is read)."""
        if self._body is not None:
            return self._body
        limit = self._max_body
        if limit is not None and _declared_length(self.headers) > limit:
            self.close()
            raise body_too_large(limit)
        parts, size = [], 0
        while True:
            chunk = await self._next()
            if not chunk:
                break
            size += len(chunk)
            if limit is not None and size > limit:
                self.close()
                raise body_too_large(limit)
            parts.append(chunk)
        self._body = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._body

    def iter_chunks(self) -> "RawResponse":
        return self

    def __aiter__(self) -> "RawResponse":
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._next()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    def close(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.abort()

    def release(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.finish()


def _declared_length(headers: Mapping[str, str]) -> int:
    """The response's ``Content-Length`` (-1 if absent or not a number)."""
    v = headers.get("content-length", "")
    return int(v) if v.isdigit() else -1


class RawPool:
    """Keep-alive connections per ``(scheme, host, port)``; ``send()`` as in ``UpstreamPool``."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.idle: dict[tuple, deque[_Conn]] = {}
        self.conns: set[_Conn] = set()
        self._targets: dict[tuple[str, str], tuple] = {}

    @staticmethod
    def handles(url: str) -> bool:
        """True for the URLs this client takes: ``http://`` without credentials in the netloc."""
        return url.startswith("http://") and "@" not in url.split("/", 3)[2]

    def _target(self, method: str, url: str) -> tuple:
        """``(pool key, host, port, request line + Host header bytes, request line bytes)``, cached."""
        t = self._targets.get((method, url))
        if t is None:
            u = URL(url)
            host, port = u.raw_host, u.port or 80
            if not host:
                raise ConnectError(f"the upstream URL has no host: {url!r}")
            line = f"{method} {u.raw_path_qs or '/'} HTTP/1.1\r\n".encode()
            t = ((u.scheme, host, port), host, port, line + f"Host: {u.raw_authority}\r\n".encode(), line)
            if len(self._targets) > 1024:
                self._targets.clear()
            self._targets[(method, url)] = t
        return t

    @staticmethod
    def _encode(head: bytes, line: bytes, headers: Mapping[str, str], body: bytes) -> bytes:
        lines = []
        for k, v in headers.items():
            kl = k.lower()
            if kl in _REPLACED:
                if kl == "host":
                    head = line + f"Host: {v}\r\n".encode()
                continue
            if "\n" in v or "\r" in v or "\n" in k or "\r" in k or ":" in k:
                raise ValueError(f"invalid character in upstream request header {k!r}")
            lines.append(f"{k}: {v}\r\n")
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        return head + "".join(lines).encode() + body

    async def _connect(self, key: tuple, host: str, port: int, timeout: float) -> _Conn:
        try:
            async with asyncio.timeout(timeout) as cm:
                _, conn = await self.loop.create_connection(lambda: _Conn(self, key), host, port)
        except TimeoutError as e:
            if cm.expired():
                raise ConnectTimeout(f"connecting to the upstream took over {timeout * 1000:.0f} ms") from e
            raise ConnectError(f"the upstream could not be reached: {type(e).__name__}") from e
        except OSError as e:
            raise ConnectError(f"the upstream could not be reached: {type(e).__name__}") from e
        self.conns.add(conn)
        return conn

    def _get_idle(self, key: tuple) -> _Conn | None:
        idle = self.idle.get(key)
        if not idle:
            return None
        oldest_ok = time.monotonic() - KEEPALIVE_S
        while idle:
            conn = idle.pop()
            if conn.state == _IDLE and conn.idle_since > oldest_ok and not conn.transport.is_closing():
                conn.reused = True
                return conn
            conn.abort()
        return None

    def _put(self, conn: _Conn) -> None:
        conn.state = _IDLE
        conn.buf.clear()
        conn.raw_headers = []
        if conn.paused:
            conn.paused = False
            conn.transport.resume_reading()  # an idle connection must see the server's close
        now = conn.idle_since = time.monotonic()
        idle = self.idle.get(conn.key)
        if idle is None:
            idle = self.idle[conn.key] = deque()
        while idle and idle[0].idle_since < now - KEEPALIVE_S:
            idle.popleft().abort()  # never reused for a minute: the pool shrinks after a burst
        idle.append(conn)

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes,
                   connect_timeout: float, read_timeout: float, max_body: int | None = None) -> RawResponse:
        """Send one request; returns once the status line and headers are in (timeouts in s;
        ``max_body``: see :class:`RawResponse`). Raises an :class:`UpstreamError` (see the module doc,
        also for the one retry)."""
        key, host, port, head, line = self._target(method, url)
        data = self._encode(head, line, headers, body)
        conn = self._get_idle(key)
        for attempt in (0, 1):
            if conn is None:
                conn = await self._connect(key, host, port, connect_timeout)
            conn.start(data)
            try:
                while not conn.headers_done:
                    if conn.lost is not None:
                        break
                    await conn.wait(read_timeout)
            except BaseException:
                conn.abort()  # a timeout or a cancelled caller: the response is unusable
                raise
            if conn.headers_done:
                return RawResponse(conn, read_timeout, max_body)
            lost = conn.lost
            conn.abort()
            if isinstance(lost, _Lost):
                if attempt == 0 and conn.reused and not conn.got_bytes:
                    conn = None  # the keep-alive race: the server closed it as the request went out
                    continue
                raise ConnectError(str(lost))
            raise lost
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for conn in list(self.conns):
            conn.abort()
        self.conns.clear()
        self.idle.clear()


__all__ = ["RawPool", "RawResponse", "HIGH_WATER", "MAX_FIELD_BYTES", "MAX_FIELDS", "MAX_HEAD_BYTES"]
