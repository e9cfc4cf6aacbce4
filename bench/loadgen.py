"""Load generator: N requests at concurrency C, bounded in count AND time.

Raw asyncio Protocol + httptools over keep-alive connections (one per
concurrent slot), pre-encoded request bytes; measured lighter than aiohttp's
client (``--client aiohttp`` runs the same load through aiohttp for
comparison). Per request it records:

* ``lat_ms``   latency, request written -> response complete (ms)
* ``ttfb_ms``  time to first byte of the response *body* (ms) -- for a stream,
  the first token's arrival
* with ``record_chunks``: ``gaps_ms``, the time between consecutive content
  chunks (SSE events) as they arrive at the client (ms); when the upstream
  stamps its chunks (the emulator does when paced), ``delay_ms``, each
  chunk's trip from the upstream's write to the client's read (ms), and
  ``gap_err_ms``, the client's gap minus the upstream's gap (ms)
* errors: non-200, broken stream (no ``data: [DONE]``, fewer events than
  asked), connection errors, timeouts

and its own CPU time (``cpu_s``, user + system seconds of this process) over
the wall time (``wall_s``). CLI: ``python -m bench.loadgen --url
http://127.0.0.1:P -n 1000 -c 32 --stream --chunks 20``.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import re
import resource
import time
from urllib.parse import urlsplit

import httptools
import orjson

from bench._util import pin
from bench._util import run as aio_run

perf = time.perf_counter
DONE = b"data: [DONE]\n\n"
RE_TS = re.compile(rb"ts=(\d{19})")


def cpu_now() -> float:
    """User + system CPU seconds of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def chat_body(stream: bool, chunks: int, ttft_ms: float = 0, gap_ms: float = 0,
              model: str = "bench-model", usage: bool = True) -> bytes:
    """A chat completion request; the emulator knobs ride in the message text."""
    body = {"model": model, "messages": [
        {"role": "user", "content": f"Say hello. emu-chunks={chunks} emu-ttft-ms={ttft_ms:g} emu-gap-ms={gap_ms:g}"}]}
    if stream:
        body["stream"] = True
        if usage:
            body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def raw_request(host: str, port: int, path: str, body: bytes | None, headers: dict) -> bytes:
    """Pre-encode one HTTP/1.1 request (POST when there is a body, else GET)."""
    lines = [f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1", f"host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Conn(asyncio.Protocol):
    """One keep-alive client connection; one request in flight at a time."""

    def __init__(self, record: bool):
        self.parser = httptools.HttpResponseParser(self)
        self.record = record
        self.t = None
        self.fut = None
        self.closed = False
        self.t0 = 0.0

    def connection_made(self, transport):
        self.t = transport

    def connection_lost(self, exc):
        self.closed = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError(f"connection lost: {exc or 'closed by peer'}"))

    def send(self, req: bytes, fut: asyncio.Future) -> None:
        self.fut = fut
        self.status = 0
        self.first = 0.0
        self.events = 0
        self.nl = False
        self.tail = b""
        self.nbytes = 0
        self.times = [] if self.record else None
        self.t0 = perf()
        self.t.write(req)

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self.fut is not None and not self.fut.done():
                self.fut.set_exception(e)
            self.t.abort()

    def on_headers_complete(self):
        self.status = self.parser.get_status_code()

    def on_body(self, b: bytes):
        if not self.first:
            self.first = perf()
        n = b.count(b"\n\n")
        if self.nl and b[:1] == b"\n":
            n += 1
        self.nl = b[-1:] == b"\n"
        self.events += n
        self.nbytes += len(b)
        self.tail = (self.tail + b)[-16:] if len(b) < 16 else b[-16:]
        if self.times is not None and n:
            self.times.append((time.monotonic_ns(), n, RE_TS.findall(b)))

    def on_message_complete(self):
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(self.parser.should_keep_alive())


@dataclasses.dataclass
class Job:
    """What to run. Times in seconds unless the name ends in ``_ms``; ``warmup`` requests are not recorded."""

    host: str
    port: int
    path: str = "/v1/chat/completions"
    body: bytes | None = None
    stream: bool = False
    chunks: int = 20
    n: int = 1000
    concurrency: int = 1
    duration_s: float = 10.0
    timeout_s: float = 10.0
    record_chunks: bool = False
    headers: dict = dataclasses.field(default_factory=lambda: {"authorization": "Bearer sk-bench-client"})
    warmup: int = 0
    stagger_s: float = 0.0  # slot i starts i * stagger_s after the measured part begins (s)


def _check(job: Job, c: Conn) -> str | None:
    """None when the response is whole and right, else the error's kind."""
    if c.status != 200:
        return f"http {c.status}"
    if job.stream:
        if not c.tail.endswith(DONE):
            return "stream without data: [DONE]"
        if c.events < job.chunks + 1:
            return f"stream with {c.events} events < {job.chunks + 1}"
    elif not c.nbytes:
        return "empty body"
    return None


async def run_load(job: Job, on_warm=None) -> dict:
    """Run the job; return raw per-request samples and totals (see module doc).

    ``on_warm()``, when given, is called (blocking) between the warm-up and
    the measured part, with every connection still open.
    """
    loop = asyncio.get_running_loop()
    req = raw_request(job.host, job.port, job.path, job.body, job.headers)
    lat, ttfb, gaps, delays, gap_err, errors = [], [], [], [], [], collections.Counter()
    state = {"issued": 0, "chunks": 0}
    inflight: dict[int, Conn] = {}

    async def connect() -> Conn:
        _, c = await loop.create_connection(lambda: Conn(job.record_chunks), job.host, job.port)
        return c

    conns: list[Conn | None] = [None] * job.concurrency

    async def worker(wid: int, deadline: float, limit: int, keep: bool):
        conn = conns[wid]
        if keep and job.stagger_s:
            await asyncio.sleep(wid * job.stagger_s)
        while state["issued"] < limit and perf() < deadline:
            state["issued"] += 1
            try:
                if conn is None or conn.closed:
                    conn = await connect()
                fut = loop.create_future()
                conn.send(req, fut)
                inflight[wid] = conn
                alive = await fut
            except (OSError, ConnectionError, httptools.HttpParserError, asyncio.TimeoutError) as e:
                if keep:
                    errors[type(e).__name__ + ": " + str(e)[:80]] += 1
                if conn is not None and conn.t is not None:
                    conn.t.abort()
                conn = None
                await asyncio.sleep(0.005)
                continue
            finally:
                inflight.pop(wid, None)
            end = perf()
            err = _check(job, conn)
            if keep:
                if err:
                    errors[err] += 1
                else:
                    lat.append((end - conn.t0) * 1e3)
                    ttfb.append((conn.first - conn.t0) * 1e3)
                    if job.stream:
                        state["chunks"] += job.chunks
                    if conn.times:
                        _gaps(conn.times, job.chunks, gaps, delays, gap_err)
            if not alive or err:
                conn.t.close()
                conn = None
        conns[wid] = conn

    async def watchdog():
        while True:
            await asyncio.sleep(0.25)
            now = perf()
            for c in list(inflight.values()):
                if now - c.t0 > job.timeout_s and c.fut is not None and not c.fut.done():
                    c.fut.set_exception(asyncio.TimeoutError(f"no complete response in {job.timeout_s:g} s"))

    wd = asyncio.ensure_future(watchdog())
    try:
        if job.warmup:
            await asyncio.gather(*(worker(i, perf() + job.duration_s, job.warmup, False)
                                   for i in range(job.concurrency)))
            state["issued"] = 0
        if on_warm is not None:
            on_warm()
        cpu0, t0 = cpu_now(), perf()
        deadline = t0 + job.duration_s
        await asyncio.gather(*(worker(i, deadline, job.n, True) for i in range(job.concurrency)))
        wall, cpu = perf() - t0, cpu_now() - cpu0
    finally:
        wd.cancel()
        for c in conns:
            if c is not None and c.t is not None:
                c.t.close()
    return {"lat_ms": lat, "ttfb_ms": ttfb, "gaps_ms": gaps, "delay_ms": delays, "gap_err_ms": gap_err,
            "ok": len(lat), "errors": sum(errors.values()),
            "error_kinds": dict(errors.most_common(5)), "issued": state["issued"], "chunks": state["chunks"],
            "wall_s": wall, "cpu_s": cpu, "time_capped": state["issued"] < job.n}


def _gaps(times: list, chunks: int, gaps: list, delays: list, gap_err: list) -> None:
    """From one response's (arrival ns, events, send stamps) pieces, append (all in ms):
    the gaps between its first ``chunks`` events at the client; for each stamped chunk,
    its trip (arrival - upstream send); for each pair of stamped chunks, client gap -
    upstream gap."""
    prev, seen = None, 0
    for t, n, _ in times:
        for _ in range(n):
            if seen >= chunks:
                break
            if prev is not None:
                gaps.append((t - prev) / 1e6)
            prev = t
            seen += 1
    last = None
    for t, _, stamps in times:
        for st in stamps:
            sent = int(st)
            if not sent:
                continue
            delays.append((t - sent) / 1e6)
            if last is not None:
                gap_err.append(((t - last[0]) - (sent - last[1])) / 1e6)
            last = (t, sent)


async def run_load_aiohttp(job: Job) -> dict:
    """The same load through aiohttp's client (for comparing client cost only)."""
    import aiohttp
    url = f"http://{job.host}:{job.port}{job.path}"
    lat, ttfb, errors = [], [], collections.Counter()
    state = {"issued": 0}
    conn = aiohttp.TCPConnector(limit=job.concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=job.timeout_s)) as s:
        async def worker(deadline):
            while state["issued"] < job.n and perf() < deadline:
                state["issued"] += 1
                t0 = perf()
                first = 0.0
                try:
                    async with s.post(url, data=job.body, headers={**job.headers, "content-type": "application/json"}) as r:
                        async for _ in r.content.iter_any():
                            if not first:
                                first = perf()
                        st = r.status
                except Exception as e:  # noqa: BLE001 -- every failure is a counted error here
                    errors[type(e).__name__] += 1
                    continue
                if st != 200:
                    errors[f"http {st}"] += 1
                    continue
                lat.append((perf() - t0) * 1e3)
                ttfb.append((first - t0) * 1e3)
        cpu0, t0 = cpu_now(), perf()
        await asyncio.gather(*(worker(t0 + job.duration_s) for _ in range(job.concurrency)))
        wall, cpu = perf() - t0, cpu_now() - cpu0
    return {"lat_ms": lat, "ttfb_ms": ttfb, "gaps_ms": [], "delay_ms": [], "gap_err_ms": [],
            "ok": len(lat), "errors": sum(errors.values()),
            "error_kinds": dict(errors), "issued": state["issued"], "chunks": len(lat) * job.chunks * job.stream,
            "wall_s": wall, "cpu_s": cpu, "time_capped": state["issued"] < job.n}


def serve_jobs(conn, cpus) -> None:
    """Body of the driver's load-generator process: for each Job received on the pipe, run the warm-up, send
    ``"warm"`` and wait for any reply, run the measured part, send back its result. ``None`` ends it."""
    pin(0, cpus)
    while True:
        job = conn.recv()
        if job is None:
            return
        def warm():
            conn.send("warm")
            conn.recv()

        try:
            conn.send(aio_run(run_load(job, warm)))
        except Exception as e:  # noqa: BLE001 -- reported to the driver, which goes on
            conn.send({"fatal": f"{type(e).__name__}: {e}"})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen", description="bounded HTTP load against a chat endpoint")
    ap.add_argument("--url", default="http://127.0.0.1:8099")
    ap.add_argument("-n", type=int, default=2000, help="requests (count bound)")
    ap.add_argument("-c", type=int, default=32, help="concurrency")
    ap.add_argument("--duration", type=float, default=10.0, help="time bound (s)")
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--ttft-ms", type=float, default=0)
    ap.add_argument("--gap-ms", type=float, default=0)
    ap.add_argument("--client", choices=("raw", "aiohttp"), default="raw")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    a = ap.parse_args(argv)
    u = urlsplit(a.url)
    pin(0, {a.cpu} if a.cpu is not None else None)
    job = Job(u.hostname, u.port or 80, body=chat_body(a.stream, a.chunks, a.ttft_ms, a.gap_ms), stream=a.stream,
              chunks=a.chunks, n=a.n, concurrency=a.c, duration_s=a.duration, record_chunks=a.gap_ms > 0,
              warmup=min(a.n // 10, 200))
    r = aio_run((run_load_aiohttp if a.client == "aiohttp" else run_load)(job))
    from bench.stats import pct
    print(f"ok={r['ok']} errors={r['errors']} {r['error_kinds'] or ''} wall={r['wall_s']:.2f}s "
          f"req/s={r['ok'] / r['wall_s']:.0f} lat p50={pct(r['lat_ms'], 50):.3f} p99={pct(r['lat_ms'], 99):.3f} ms "
          f"ttfb p50={pct(r['ttfb_ms'], 50):.3f} ms client cpu={r['cpu_s']:.2f}s "
          f"({1e3 * r['cpu_s'] / max(1, r['ok']):.3f} ms/req)"
          + (f" gaps p50={pct(r['gaps_ms'], 50):.2f} p99={pct(r['gaps_ms'], 99):.2f} ms" if r["gaps_ms"] else ""))


if __name__ == "__main__":
    main()
