"""Server-sent events framing, sans-IO: bytes in, events out (each with its exact raw bytes).

Follows the HTML Living Standard, "Parsing an event stream"
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
lines end with CRLF, LF or a bare CR; a blank line dispatches; lines starting with ``:`` are
comments; ``data`` lines are joined with LF. A CR at the end of one read followed by an LF at
the start of the next is one line end, not two (so no empty event appears).

Unlike a browser, every dispatched block is returned, comment-only blocks included, with the
raw bytes it was made of, so a proxy can relay events byte for byte. A UTF-8 byte order mark at
the start of the stream is stripped (the standard's "One leading U+FEFF BYTE ORDER MARK character
must be ignored"), even when it is split across reads; it is not part of the first event's raw bytes.
"""
from __future__ import annotations

__all__ = ["SSEEvent", "SSEParser"]

BOM = b"\xef\xbb\xbf"


class SSEEvent:
    """One block of the stream up to and including its blank line.

    ``raw``: the exact bytes (for relaying). ``data``: the joined ``data`` field (bytes),
    or ``None`` when the block had no data line (comments only). ``event``/``id``: field
    values or ``None``. ``comments``: True if any ``:`` line was seen.
    """

    __slots__ = ("raw", "data", "event", "id", "comments")

    def __init__(self, raw: bytes, data: bytes | None, event: str | None, id: str | None, comments: bool):
        self.raw = raw
        self.data = data
        self.event = event
        self.id = id
        self.comments = comments

    def __repr__(self) -> str:
        return f"SSEEvent(raw={self.raw!r}, data={self.data!r}, event={self.event!r})"


class SSEParser:
    """Incremental parser. ``feed(bytes) -> list[SSEEvent]``; ``close() -> SSEEvent | None`` at EOF."""

    __slots__ = ("_buf", "_pos", "_skip_lf", "_data", "_event", "_id", "_comments", "_head")

    def __init__(self) -> None:
        self._buf = b""        # raw bytes of the event in progress (from its first byte)
        self._pos = 0          # where the next unparsed line starts within _buf
        self._skip_lf = False  # the last read ended on CR: an LF first in the next read belongs to it
        self._head: bytes | None = b""  # the stream's first bytes while a BOM may still be arriving; then None
        self._reset_fields()

    def _reset_fields(self) -> None:
        self._data: list[bytes] | None = None
        self._event: str | None = None
        self._id: str | None = None
        self._comments = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add bytes; return the events completed by them (possibly none)."""
        if self._head is not None:
            chunk = self._head + chunk
            if len(chunk) < 3 and BOM.startswith(chunk):
                self._head = chunk  # maybe a BOM split across reads: wait for more
                return []
            self._head = None
            if chunk.startswith(BOM):
                chunk = chunk[3:]
        buf = self._buf + chunk if self._buf else chunk
        pos = self._pos
        if self._skip_lf and pos < len(buf):
            if buf[pos] == 10:  # \n
                pos += 1
            self._skip_lf = False
        events: list[SSEEvent] = []
        start = 0
        n = len(buf)
        find = buf.find
        while pos < n:
            lf = find(b"\n", pos)
            cr = find(b"\r", pos, lf if lf >= 0 else n)
            if cr >= 0:
                end = cr
                if cr + 1 < n:
                    nxt = cr + 2 if buf[cr + 1] == 10 else cr + 1
                else:
                    nxt = n
                    self._skip_lf = True
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            if end == pos:  # blank line: dispatch
                data = self._data
                events.append(SSEEvent(buf[start:nxt], b"\n".join(data) if data is not None else None,
                                       self._event, self._id, self._comments))
                self._reset_fields()
                start = nxt
            else:
                self._line(buf[pos:end])
            pos = nxt
        self._buf = buf[start:] if start < n else b""
        self._pos = pos - start
        return events

    def _line(self, line: bytes) -> None:
        if line[0] == 58:  # ':' comment
            self._comments = True
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            if self._data is None:
                self._data = [value]
            else:
                self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            self._id = value.decode("utf-8", "replace")
        # `retry` and unknown fields are ignored, as the standard says

    @property
    def awaiting_lf(self) -> bool:
        """The last read ended on a CR that ended an event: an LF may follow in the next read."""
        return self._skip_lf and not self._buf

    @property
    def pending(self) -> bytes:
        """Bytes received that are not yet part of a complete event."""
        return self._buf

    def close(self) -> SSEEvent | None:
        """At end of stream: an event whose lines were complete but whose blank line never came
        (lenient, as many upstreams end that way), else None. A partial line is dropped."""
        if self._data is None and self._event is None:
            return None
        data = self._data
        ev = SSEEvent(self._buf[: self._pos], b"\n".join(data) if data is not None else None,
                      self._event, self._id, self._comments)
        self._buf, self._pos = b"", 0
        self._reset_fields()
        return ev
