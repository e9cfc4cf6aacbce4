"""The structured access log: one JSON object per line per request, written off the request path.

The batcher turns each record into a line (:func:`access_line`) and hands a drain's lines to
:class:`AccessLog`, whose own thread writes them, so a slow reader of the log (a full pipe, a slow
disk) never stalls the event loop: when its queue is full the lines are dropped and counted
(``aisix_telemetry_dropped_total{reason="access_log_full"}``). Writes are at most ``PIPE_BUF``
bytes and end on a line, so workers writing to one pipe or ``O_APPEND`` file never interleave
inside a line. A line holds no key, no prompt and no completion.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from datetime import UTC, datetime

import orjson

from aisix.telemetry.records import RequestRecord, request_id

log = logging.getLogger("aisix.telemetry")

#: Drains' worth of lines waiting for the writer thread; more are dropped (and counted).
QUEUE_DRAINS = 256
_PIPE_BUF = 4096


def access_line(r: RequestRecord) -> bytes:
    """One request as a JSON line (bytes, ``\\n``-terminated). Fields: ``time`` (request start, RFC 3339
    UTC, ms), ``method``, ``route`` (the route template, as ``http.route``), ``status``, ``model``
    (the configured alias, or null), ``deployment`` (the last attempt's, as ``x-aisix-deployment``: ``alias/id``; or null),
    ``attempts``, ``stream``, ``prompt_tokens``/``completion_tokens``/``total_tokens`` (the upstream's
    usage, or the gateway's estimate with ``usage_estimated: true``; null when none), ``cost_usd``
    (null when no price is known), ``latency_ms`` (request received → body fully sent),
    ``first_token_ms`` (request start → first token; null when none), ``trace_id`` (32 hex digits),
    ``request_id`` (the gateway's own, as ``x-aisix-request-id``)."""
    start = datetime.fromtimestamp(r.start_wall_ns / 1e9, UTC)
    doc = {
        "time": start.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "method": r.method, "route": r.endpoint, "status": r.status,
        "model": r.model, "deployment": f"{r.attempts[-1].model}/{r.attempts[-1].deployment}" if r.attempts else None, "attempts": len(r.attempts),
        "stream": r.stream, "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
        "total_tokens": r.total_tokens if not r.usage_estimated else r.prompt_tokens + r.completion_tokens,
        "usage_estimated": r.usage_estimated, "cost_usd": r.cost_usd,
        "latency_ms": round((r.end_ns - r.start_ns) / 1e6, 3),
        "first_token_ms": round((r.first_token_ns - r.start_ns) / 1e6, 3) if r.first_token_ns else None,
        "trace_id": f"{r.trace_id:032x}", "request_id": request_id(r),
    }
    return orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)


def _writes(lines: list[bytes]) -> list[bytes]:
    """``lines`` joined into writes of at most ``PIPE_BUF`` bytes each, cut only between lines
    (a longer line is a write of its own)."""
    out, cur, size = [], [], 0
    for line in lines:
        if cur and size + len(line) > _PIPE_BUF:
            out.append(b"".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        out.append(b"".join(cur))
    return out


class AccessLog:
    """Writes access lines to ``path`` (``"-"``: standard output; else a file opened for append,
    created with mode 0644) from a daemon thread. Raises OSError when the file can't be opened."""

    def __init__(self, path: str):
        self.path = path
        if path == "-":
            self.fd, self._own_fd = 1, False
        else:
            self.fd, self._own_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), True
        self.dropped = 0  # lines not written: the queue was full, or the write failed
        self.pending = 0  # drains' worth of lines queued and not yet written (or failed)
        self._queue: queue.Queue = queue.Queue(QUEUE_DRAINS)
        self._thread = threading.Thread(target=self._run, name="aisix-access-log", daemon=True)
        self._thread.start()

    def write(self, lines: list[bytes]) -> None:
        """Queue a drain's lines (never blocks; drops and counts them when the queue is full)."""
        if not lines:
            return
        try:
            self._queue.put_nowait(lines)
            self.pending += 1
        except queue.Full:
            self.dropped += len(lines)

    def _run(self) -> None:
        failed = False
        while (lines := self._queue.get()) is not None:
            try:
                for chunk in _writes(lines):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(self.fd, view):]
            except OSError as e:
                self.dropped += len(lines)
                if not failed:
                    log.warning("access log %s: write failed (%s); lines are dropped while it fails", self.path, e)
                failed = True
            self.pending -= 1

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (waiting at most ``timeout`` s), then close the file."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._own_fd and not self._thread.is_alive():
            os.close(self.fd)
