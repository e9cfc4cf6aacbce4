"""Connections to upstream providers, pooled and kept alive.

``mock://`` URLs are answered in the process by :class:`~aisix.upstream.mock.MockTransport`;
``http://`` upstreams go through the raw asyncio + httptools client of
:mod:`aisix.upstream.raw` (measured lighter than aiohttp's client; see there); ``https://``
ones (and any URL it does not take) through one aiohttp session per base URL.
``AISIX_UPSTREAM_CLIENT=aiohttp`` sends everything through aiohttp.
Failures raise :mod:`aisix.upstream.errors` (transport terms; the proxy maps them).
Responses are read as raw bytes (``auto_decompress=False``, ``Accept-Encoding: identity``),
so streamed SSE bytes reach the client exactly as the upstream sent them.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import AsyncIterator, Mapping, Protocol
from urllib.parse import urlsplit

import aiohttp

from aisix.config.resources import ProviderConfig
from aisix.upstream.errors import ConnectError, ConnectTimeout, ReadTimeout, StreamBroken, body_too_large
from aisix.upstream.mock import MockTransport

try:
    from aisix.upstream.raw import RawPool
except ImportError:  # httptools missing: aiohttp only
    RawPool = None


@dataclass(slots=True)
class UpstreamRequest:
    """One HTTP call to a provider: ``POST url`` with ``headers`` and a JSON ``body`` (bytes)."""

    url: str
    headers: dict[str, str]
    body: bytes
    method: str = "POST"


class UpstreamResponse(Protocol):
    """What the proxy reads from a provider, whatever transport made it."""

    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes:
        """The whole body. Raises :class:`~aisix.upstream.errors.UpstreamError` (a broken
        connection, a read timeout, a body over ``max_response_bytes``)."""

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (one item per socket read). Raises
        :class:`~aisix.upstream.errors.StreamBroken` or ``ReadTimeout``."""

    def close(self) -> None:
        """Abort: close the connection now (used on client disconnect or error)."""

    def release(self) -> None:
        """The body was read to the end: return the connection to the pool."""


class _AiohttpResponse:
    __slots__ = ("_resp", "status", "headers", "_max_body", "_body")

    def __init__(self, resp: aiohttp.ClientResponse, max_body: int):
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers
        self._max_body = max_body
        self._body: bytes | None = None

    async def read(self) -> bytes:
        """The whole body, at most ``max_body`` bytes (502 ``upstream_response_too_large`` past it)."""
        if self._body is not None:
            return self._body
        limit = self._max_body
        if (self._resp.content_length or 0) > limit:
            self.close()
            raise body_too_large(limit)
        parts, size = [], 0
        try:
            while chunk := await self._resp.content.readany():
                size += len(chunk)
                if size > limit:
                    self.close()
                    raise body_too_large(limit)
                parts.append(chunk)
        except asyncio.TimeoutError as e:
            raise ReadTimeout("the upstream did not answer in time") from e
        except aiohttp.ClientError as e:
            raise StreamBroken(f"the upstream connection failed: {type(e).__name__}") from e
        self._body = b"".join(parts)
        return self._body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        content = self._resp.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except asyncio.TimeoutError as e:
            raise ReadTimeout("the upstream stream stalled (read timeout)") from e
        except aiohttp.ClientError as e:
            raise StreamBroken(f"the upstream connection broke mid-stream: {type(e).__name__}") from e

    def close(self) -> None:
        self._resp.close()

    def release(self) -> None:
        self._resp.release()


@dataclass
class UpstreamPool:
    """Keep-alive sessions keyed by ``scheme://host:port`` of the base URL."""

    sessions: dict[str, aiohttp.ClientSession] = field(default_factory=dict)
    mock: MockTransport = field(default_factory=MockTransport)
    raw: "RawPool | None" = None  # the http:// pool, made on first use (it needs the running loop)
    use_raw: bool = field(default_factory=lambda: RawPool is not None
                          and os.environ.get("AISIX_UPSTREAM_CLIENT", "raw") != "aiohttp")

    def _session(self, url: str) -> aiohttp.ClientSession:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        session = self.sessions.get(origin)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
            session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                            skip_auto_headers=("User-Agent",))
            self.sessions[origin] = session
        return session

    async def send(self, req: UpstreamRequest, cfg: ProviderConfig) -> UpstreamResponse:
        """Send ``req``; returns once the status line and headers are in.

        Raises :class:`~aisix.upstream.errors.ConnectError` when the upstream cannot be reached,
        ``ConnectTimeout`` past ``cfg.connect_timeout_ms``, ``ReadTimeout`` when it does not
        answer within ``cfg.read_timeout_ms``, ``RemoteProtocolError`` for a head that is not
        HTTP. ``read()`` of the response holds at most ``cfg.max_response_bytes``
        (``ResponseTooLarge`` past it); response heads are limited as aiohttp's client limits them
        (8190-byte header lines; the raw client also 100 fields, 64 KiB in all).
        """
        if req.url.startswith("mock://"):
            return await self.mock.send(req, cfg)
        if self.use_raw and req.method != "HEAD" and RawPool.handles(req.url):
            if self.raw is None:
                self.raw = RawPool()
            return await self.raw.send(req.method, req.url, req.headers, req.body,
                                       cfg.connect_timeout_ms / 1000, cfg.read_timeout_ms / 1000,
                                       cfg.max_response_bytes)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_ms / 1000,
                                        connect=cfg.connect_timeout_ms / 1000,
                                        sock_read=cfg.read_timeout_ms / 1000)
        try:
            resp = await self._session(req.url).request(
                req.method, req.url, data=req.body, headers=req.headers, timeout=timeout,
                allow_redirects=False)
        except aiohttp.ConnectionTimeoutError as e:
            raise ConnectTimeout(f"connecting to the upstream took over {cfg.connect_timeout_ms} ms") from e
        except asyncio.TimeoutError as e:
            raise ReadTimeout(f"the upstream did not answer within {cfg.read_timeout_ms} ms") from e
        except aiohttp.ClientError as e:
            raise ConnectError(f"the upstream could not be reached: {type(e).__name__}") from e
        return _AiohttpResponse(resp, cfg.max_response_bytes)

    async def close(self) -> None:
        if self.raw is not None:
            await self.raw.close()
        for session in self.sessions.values():
            await session.close()
        self.sessions.clear()


__all__ = ["UpstreamRequest", "UpstreamResponse", "UpstreamPool"]
