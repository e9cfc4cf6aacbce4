"""The stream relay, sans-IO: upstream bytes in, client bytes and an outcome out.

:class:`StreamRelay` holds every protocol decision of relaying one upstream SSE stream: framing
(:class:`~aisix.sse.SSEParser`), translation (a provider's :class:`~aisix.providers.StreamDecoder`),
the first-token stamp, the gateway's own count of completion events, what ends the stream
(``[DONE]``, an error event, a clean close, an idle timeout, a broken connection) and with what
status. It does no IO and reads no clock: the proxy's loop (:func:`aisix.proxy.handlers.relay_stream`)
feeds it each read with its arrival time and writes what it returns. The decoder answers each
SSE event with ``(bytes, kind)`` (:data:`~aisix.providers.base.TOKEN`, ``FINISH``, ``DONE``,
``ERROR``); the relay keeps what the kinds add up to.

Each complete event goes out in the same write as the others of its read, as the upstream's
bytes (or the provider's translation); nothing after ``[DONE]`` is relayed, whatever the reads.
"""
from __future__ import annotations

from array import array

from aisix.errors import GatewayError, upstream_malformed, upstream_stream_broken
from aisix.providers import StreamDecoder
from aisix.providers.base import DONE, ERROR, FINISH, TOKEN
from aisix.sse import SSEParser

#: An upstream event larger than this (bytes, still without its blank line) ends the stream (502).
MAX_EVENT_BYTES = 16 * 1024 * 1024

#: What a translator may raise on an event of a shape it did not expect.
_CHOKES = (TypeError, ValueError, KeyError, AttributeError, IndexError)


class StreamRelay:
    """One upstream stream's relay state.

    Feed it with :meth:`feed` (each read, with its arrival time in ``perf_counter_ns``), then end
    it with :meth:`eof` (the upstream closed), :meth:`idle_timeout` (no data event for too long)
    or :meth:`broken` (the transport failed); each returns the bytes to write to the client
    (``b""``: nothing). Afterwards: ``error`` (a :class:`GatewayError` the stream ends with, or
    None), ``ended`` (it ended as a stream should: ``[DONE]`` seen or added), ``finished`` (a
    finish reason came), ``clean`` (the
    upstream's framing ended where ``[DONE]`` did: its connection may be reused),
    ``first_token_ns`` (0: none), ``last_data_ns``, and ``completion_events`` (the gateway's own
    count of completion tokens: data events from the first token up to the finish).

    Inter-token gaps, for ``aisix_llm_inter_token_latency``: a *content event* is an event relayed
    to the client from the first token up to the finish, and the finish event if it carries output
    too (role-only openers, pings, comments, an empty finish chunk, usage chunks are not). Each read that relays content events appends, if an earlier
    read relayed content, the gap since that read to ``gaps_ns`` (ns; one array append per read);
    the other content events of the same read went out in the same write, so their gaps are 0 and
    only counted, in ``zero_gaps``. ``len(gaps_ns) + zero_gaps`` = content events − 1.
    """

    __slots__ = ("decoder", "parser", "provider", "error", "ended", "finished", "clean", "first_token_ns",
                 "last_data_ns", "completion_events", "last_content_ns", "gaps_ns", "zero_gaps")

    def __init__(self, decoder: StreamDecoder, provider: str, now_ns: int = 0):
        self.decoder = decoder
        self.parser = SSEParser()
        self.provider = provider
        self.error: GatewayError | None = None
        self.ended = False
        self.finished = False
        self.clean = False
        self.first_token_ns = 0
        self.last_data_ns = now_ns
        self.completion_events = 0
        self.last_content_ns = 0
        self.gaps_ns = array("q")
        self.zero_gaps = 0

    @property
    def over(self) -> bool:
        """Nothing more is to be read: ``[DONE]`` came or an error ends the stream."""
        return self.ended or self.error is not None

    def feed(self, chunk: bytes, now_ns: int) -> bytes:
        """One read from the upstream → the bytes to write for the events it completed."""
        dec = self.decoder
        parts = []
        content = 0  # content events relayed in this read
        events = self.parser.feed(chunk)
        try:
            for ev in events:
                b, kind = dec.feed(ev)
                if kind & FINISH:
                    self.finished = True
                if ev.data is not None:
                    self.last_data_ns = now_ns
                    if self.first_token_ns and not self.finished and not kind & DONE:
                        self.completion_events += 1
                        if b is not None:
                            content += 1
                    elif kind & TOKEN and self.first_token_ns:
                        content += 1  # the finish event carries the last token (Gemini's always does)
                if kind & TOKEN and not self.first_token_ns:
                    self.first_token_ns = now_ns
                    self.completion_events = content = 1
                if kind & ERROR:
                    self.error = dec.error
                    break
                if b is not None:
                    parts.append(b)
                if kind & DONE:
                    self.ended = True
                    self.clean = ev is events[-1] and not self.parser.pending
                    break
        except _CHOKES as e:
            self.error = upstream_malformed(f"upstream {self.provider} sent a malformed event ({type(e).__name__})")
        if content:
            if self.last_content_ns:
                self.gaps_ns.append(now_ns - self.last_content_ns)
            self.zero_gaps += content - 1
            self.last_content_ns = now_ns
        if not self.over and len(self.parser.pending) > MAX_EVENT_BYTES:
            self.error = upstream_malformed(f"upstream {self.provider} sent an event over {MAX_EVENT_BYTES} bytes")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @property
    def awaiting_lf(self) -> bool:
        """``[DONE]`` ended on a CR at the end of its read: the LF of its CRLF may be in the next read."""
        return self.ended and self.clean and self.parser.awaiting_lf

    def eof(self) -> bytes:
        """The upstream closed its stream. A last event without its blank line still counts; a
        stream that closes before a ``finish_reason`` is an error (502), one that finished without
        ``[DONE]`` gets it added."""
        out = b""
        tail = self.parser.close()
        if tail is not None:
            try:
                b, kind = self.decoder.feed(tail)
            except _CHOKES as e:
                self.error = upstream_malformed(f"upstream {self.provider} sent a malformed event ({type(e).__name__})")
                return b""
            if kind & ERROR:
                self.error = self.decoder.error
                return b""
            out = b or b""
            self.finished = self.finished or bool(kind & FINISH)
        if not self.finished:
            self.error = upstream_stream_broken("the upstream closed the stream before it finished")
            return out
        return out + self._finish()

    def idle_timeout(self, idle_ms: int) -> bytes:
        """No data event came for ``idle_ms`` and the upstream was closed for it (whatever that
        made the read raise is replaced): a stream that already finished ends cleanly, any other
        ends with 504 ``upstream_timeout``."""
        self.error = None
        if self.finished:
            return self._finish()
        self.error = GatewayError(504, f"upstream stream idle for over {idle_ms} ms", "timeout_error",
                                  "upstream_timeout")
        return b""

    def broken(self, error: GatewayError) -> None:
        """The transport failed mid-stream (reset, read timeout, bad framing): end with ``error``."""
        self.error = error

    def _finish(self) -> bytes:
        if self.ended:
            return b""
        self.ended = True
        return self.decoder.end() or b""
