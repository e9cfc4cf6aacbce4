"""One long-lived, pipelined connection to Redis for the rate limiter (:mod:`aisix.hooks.ratelimit_redis`).

Why not redis-py's asyncio client for each call: its path per command (connection pool acquire
and release, retry wrapper, argument encoding, ``asyncio.timeout`` per read) cost ~80 µs of CPU
per round trip here, twice a bare socket's ~35 µs, and the limiter makes one or two per request.
This keeps what a limiter needs and nothing else:

- **one connection per process**, opened on first use and again after it was lost (no pool, no
  retry: a command whose connection died may have run, so it is never sent twice);
- **pipelining**: a command is written at once; replies come back in order and are matched to a
  FIFO of futures, so concurrent calls share the connection without waiting on each other;
- **hiredis** (redis-py's C reply parser) reads the replies; commands are packed as RESP2 bytes by
  the caller (:func:`bulk`, :func:`command`), which keeps its prebuilt parts (key names, the script
  SHA) from one request to the next;
- **scripts** are loaded (``SCRIPT LOAD``) when the connection opens, with ``AUTH``/``SELECT`` in
  the same round trip; an ``EVALSHA`` answered ``NOSCRIPT`` (the server's script cache was flushed)
  is sent again once as ``EVAL`` with the script's text;
- **timeouts** without a timer per call: one watchdog, armed while replies are awaited, fails the
  connection (every waiting call gets :class:`TimeoutError`) when the oldest call has waited
  ``timeout_s``.

URLs as redis-py parses them (``redis.connection.parse_url``): ``redis://[[user]:password@]host:port/db``,
``rediss://`` (TLS; ``?ssl_cert_reqs=none`` skips verification, ``ssl_ca_certs=FILE``) and
``unix:///path?db=0``. RESP2 only; one server (no Cluster, no Sentinel).
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import socket
import ssl
import time
from collections.abc import Callable

import hiredis
from redis.connection import parse_url
from redis.exceptions import InvalidResponse, ResponseError

_NOSCRIPT = "NOSCRIPT"
#: A bare PING, for probes.
PING = b"*1\r\n$4\r\nPING\r\n"


def bulk(value: bytes | str | int) -> bytes:
    """One RESP2 bulk string: ``$<len>\\r\\n<bytes>\\r\\n`` (str as UTF-8, int in decimal)."""
    b = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(b), b)


def command(parts: list[bytes]) -> bytes:
    """A RESP2 command from its arguments, each already a :func:`bulk`."""
    return b"*%d\r\n%s" % (len(parts), b"".join(parts))


class Script:
    """A Lua script known by its SHA-1: ``.head`` is the packed ``EVALSHA <sha>`` start of a call."""

    def __init__(self, text: str):
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()
        self.head = bulk("EVALSHA") + bulk(self.sha)

    def call(self, keys: list[bytes], args: list[bytes]) -> bytes:
        """The packed ``EVALSHA sha numkeys KEYS... ARGV...`` (``keys`` and ``args`` already :func:`bulk`)."""
        return b"*%d\r\n%s%s%s%s" % (3 + len(keys) + len(args), self.head, bulk(len(keys)),
                                     b"".join(keys), b"".join(args))


class RedisPipe:
    """The connection (see the module doc). ``scripts`` are loaded on every (re)connect.

    :meth:`send` is the only call: it returns a future of the reply (an int, bytes, or a list of
    them); the future fails with :class:`~redis.exceptions.ResponseError` for an error reply,
    :class:`ConnectionError` (an OSError) when the connection could not be opened or was lost, and
    :class:`TimeoutError` when the reply took longer than ``timeout_s``.
    """

    def __init__(self, url: str, timeout_s: float, scripts: tuple[Script, ...] = ()):
        self.timeout = timeout_s
        self.scripts = {s.sha.encode(): s for s in scripts}
        p = parse_url(url)
        self._path = p.get("path")
        self._host, self._port = p.get("host", "localhost"), p.get("port", 6379)
        self._ssl = _ssl_context(p) if url.startswith("rediss://") else None
        self._hello = []  # sent first on every connection
        if p.get("password") is not None:
            self._hello.append(command([bulk("AUTH"), *([bulk(p["username"])] if p.get("username") else []),
                                        bulk(p["password"])]))
        if p.get("db"):
            self._hello.append(command([bulk("SELECT"), bulk(p["db"])]))
        self._hello += [command([bulk("SCRIPT"), bulk("LOAD"), bulk(s.text)]) for s in scripts]
        self._conn: _Conn | None = None
        self._opening: asyncio.Task | None = None
        self.closed = False

    def send(self, packed: bytes, done: Callable[[object, BaseException | None], None] | None = None
             ) -> asyncio.Future | None:
        """Write one packed command (opening the connection first when there is none). Without
        ``done``, returns a future of the reply; with it, returns None and calls
        ``done(reply, None)`` or ``done(None, error)`` exactly once, from the read of the reply (no
        future, no extra loop pass: the rate limiter's hot path)."""
        c = self._conn
        if c is not None and c.alive:
            return c.send(packed, done)
        fut = asyncio.ensure_future(self._open_then_send(packed))
        if done is None:
            return fut
        fut.add_done_callback(lambda f: _hand_on(f, done))
        return None

    async def _open_then_send(self, packed: bytes):
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        c = await asyncio.shield(self._opening)
        return await c.send(packed)

    async def _open(self) -> _Conn:
        try:
            if self.closed:
                raise ConnectionError("the rate-limit store connection is closed")
            loop = asyncio.get_running_loop()
            make = lambda: _Conn(self)
            opening = loop.create_unix_connection(make, self._path) if self._path else \
                loop.create_connection(make, self._host, self._port, ssl=self._ssl)
            try:
                _, conn = await asyncio.wait_for(opening, self.timeout)
            except TimeoutError:
                raise TimeoutError(f"connecting to Redis took longer than {self.timeout}s") from None
            hello = [conn.send(cmd) for cmd in self._hello]
            try:
                await asyncio.gather(*hello)
            except ResponseError as e:  # AUTH or SELECT refused: this connection is unusable
                conn.close()
                raise ConnectionError(f"Redis refused the connection's setup (AUTH, SELECT, SCRIPT LOAD): {e}") from None
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            return conn
        finally:
            self._opening = None

    def lost(self, conn: _Conn) -> None:
        if self._conn is conn:
            self._conn = None

    async def aclose(self) -> None:
        """Close the connection; calls still waiting fail with ConnectionError."""
        self.closed = True
        if self._opening is not None:
            self._opening.cancel()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _ssl_context(p: dict) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=p.get("ssl_ca_certs"))
    if str(p.get("ssl_cert_reqs", "required")).lower() == "none":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _Conn(asyncio.Protocol):
    """The protocol of one connection: writes, a FIFO of (future or callback, packed, sent at), hiredis reads."""

    def __init__(self, pipe: RedisPipe):
        self.pipe = pipe
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self.waiting: collections.deque = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.alive = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport) -> None:
        self.transport, self.alive = transport, True
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a command is one small write

    def send(self, packed: bytes, done=None) -> asyncio.Future | None:
        """Write ``packed``; the reply goes to ``done`` (see :meth:`RedisPipe.send`) or to the future returned."""
        to = self._loop.create_future() if done is None else done
        if not self.alive:
            _deliver(to, None, ConnectionError("the connection to Redis was lost"))
            return to if done is None else None
        self.transport.write(packed)
        self.waiting.append((to, packed, time.monotonic()))
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self.pipe.timeout, self._check)
        return to if done is None else None

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            to, packed, _ = self.waiting.popleft()
            if type(reply) is ResponseError:
                if str(reply).startswith(_NOSCRIPT) and (again := self._as_eval(packed)) is not None:
                    self.transport.write(again)
                    self.waiting.append((to, None, time.monotonic()))
                    continue
                _deliver(to, None, reply)
            else:
                _deliver(to, reply, None)

    def _as_eval(self, packed: bytes | None) -> bytes | None:
        """``packed`` (an EVALSHA of a known script) as the same EVAL with the script's text."""
        if packed is None:
            return None
        head_end = packed.index(b"\r\n") + 2  # after *N
        sha_at = head_end + len(b"$7\r\nEVALSHA\r\n$40\r\n")
        script = self.pipe.scripts.get(packed[sha_at:sha_at + 40])
        if script is None:
            return None
        return packed[:head_end] + bulk("EVAL") + bulk(script.text) + packed[sha_at + 42:]

    def _check(self) -> None:
        """The watchdog: fail the connection when the oldest call waited too long, else look again later."""
        self._watchdog = None
        if not self.waiting or not self.alive:
            return
        late = self.waiting[0][2] + self.pipe.timeout - time.monotonic()
        if late <= 0:
            self._fail(TimeoutError(f"Redis did not answer within {self.pipe.timeout}s"))
            return
        self._watchdog = self._loop.call_later(late, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"the connection to Redis was lost ({exc or 'closed by the server'})"))

    def close(self) -> None:
        self._fail(ConnectionError("the connection to Redis was closed"))

    def _fail(self, err: BaseException) -> None:
        was_alive, self.alive = self.alive, False
        self.pipe.lost(self)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.waiting:
            _deliver(self.waiting.popleft()[0], None, err)
        if was_alive and self.transport is not None:
            self.transport.abort()


def _deliver(to, reply, err: BaseException | None) -> None:
    """A reply (or ``err``) to its waiter: a future (skipped when its caller went away) or a callback."""
    if isinstance(to, asyncio.Future):
        if not to.done():
            to.set_result(reply) if err is None else to.set_exception(err)
    else:
        to(reply, err)


def _hand_on(f: asyncio.Future, done) -> None:
    """The outcome of future ``f`` to callback ``done(reply, error)``."""
    if f.cancelled():
        done(None, asyncio.CancelledError())
    elif (err := f.exception()) is not None:
        done(None, err)
    else:
        done(f.result(), None)
