"""Measurement and concurrency: regression tests for bugs found by loading a running gateway.

Every test here failed when it was written, each for a real bug (see its docstring). Real parts
only: ``python -m aisix serve`` as a child process, the harness's scripted upstream, the
session's real Prometheus. Everything is on 127.0.0.1; processes are stopped by PID.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import aiohttp

from tests.support.harness import ROLE, STOP, TXT, USAGE, GatewayProcess, ScriptedUpstream, ev, gateway_config, post_raw

CHAT = "/v1/chat/completions"
DONE = b"data: [DONE]\n\n"


def _chat(content: str) -> dict:
    return {"model": "m1", "stream": True, "messages": [{"role": "user", "content": content}]}


async def test_stream_cut_by_the_client_is_charged_tokens(tmp_path):
    """README, Rate limits: "A call that ends without usage but produced output (a stream the client
    cut, ...) is charged the gateway's own count". It is charged nothing: on a client disconnect
    ``relay_stream`` unwinds with CancelledError before it sets ``call.estimated_completion_tokens``,
    so ``post_call`` sees 0. A client that hangs up before the final usage chunk is never charged:
    ``tpm``/``tpd`` can be bypassed without limit."""
    up = ScriptedUpstream().start()
    up.script("cut", writes=[(0, ev(ROLE))] + [(0.002, ev(TXT("tok"))) for _ in range(20)]
              + [(3.0, ev(STOP)), (0, ev(USAGE(10, 20))), (0, DONE)])
    up.script("probe", writes=[(0, ev(ROLE)), (0, ev(TXT("a"))), (0, ev(STOP)), (0, DONE)])
    cfg = gateway_config(up.base_url, apikeys=[{"key": "sk-test", "allowed_models": ["m1"],
                                                "rate_limit": {"tpd": 1_000_000}}])
    try:
        with GatewayProcess(tmp_path, cfg) as gw:
            url = gw.url + CHAT
            await post_raw(url, _chat("probe"))  # charged its estimate (no usage chunk)
            await asyncio.sleep(0.3)
            before = int((await post_raw(url, _chat("probe"))).headers["x-ratelimit-remaining-tokens"])
            probe_cost = 1_000_000 - before  # what one probe costs
            for _ in range(5):  # role + 20 content events relayed, then the client hangs up
                cut = await post_raw(url, _chat("cut"), max_events=21)
                assert cut.status == 200 and cut.closed_at
            await asyncio.sleep(0.5)
            after = int((await post_raw(url, _chat("probe"))).headers["x-ratelimit-remaining-tokens"])
            charged_for_cuts = before - after - probe_cost
            assert charged_for_cuts >= 5 * 20, f"5 cut streams of 20 relayed tokens were charged {charged_for_cuts}"
    finally:
        up.stop()


async def test_stream_cut_by_the_shutdown_grace_is_not_measured_as_client_closed(tmp_path, prometheus):
    """A stream still running when ``shutdown_grace_ms`` runs out is cut by the gateway (the client
    gets a truncated chunked body: no error event, no ``[DONE]``), yet it is measured as 499,
    "client closed request", with an unset span status: the gateway's own failure is blamed on
    a client that never hung up, and no 5xx shows on the dashboard for streams lost at a restart."""
    up = ScriptedUpstream().start()
    up.script("long", writes=[(0, ev(ROLE))] + [(0.1, ev(TXT("x"))) for _ in range(40)]
              + [(0, ev(STOP)), (0, ev(USAGE(7, 40))), (0, DONE)])
    cfg = gateway_config(up.base_url, prom_otlp=prometheus.otlp_url)
    cfg["server"]["shutdown_grace_ms"] = 1000
    gw = GatewayProcess(tmp_path, cfg).start()
    try:
        got: dict = {}

        async def client():
            async with aiohttp.ClientSession() as s:
                async with s.post(gw.url + CHAT, json=_chat("long"), headers={"Authorization": "Bearer sk-test"}) as r:
                    got["status"] = r.status
                    try:
                        got["body"] = await r.read()
                    except aiohttp.ClientPayloadError as e:
                        got["cut_by_server"] = repr(e)

        task = asyncio.create_task(client())
        await asyncio.sleep(0.4)  # the stream is under way (40 tokens x 100 ms)
        assert await asyncio.get_running_loop().run_in_executor(None, gw.stop) == 0
        await task
        assert got["status"] == 200 and "cut_by_server" in got  # the client never hung up
        sel = f'instance="{gw.instance}",endpoint="{CHAT}"'
        deadline = time.monotonic() + 15
        while not prometheus.query(f"aisix_request_count_total{{{sel}}}") and time.monotonic() < deadline:
            time.sleep(0.2)
        by_status = {r["metric"]["status_code"]: float(r["value"][1])
                     for r in prometheus.query(f"sum by (status_code) (aisix_request_count_total{{{sel}}})")}
        assert by_status.get("499", 0) == 0, f"a stream cut by the gateway's shutdown was measured {by_status}"
        assert sum(v for k, v in by_status.items() if k.startswith("5")) == 1, by_status
    finally:
        gw.kill()
        up.stop()


def _processes_with(arg: str) -> list[int]:
    """PIDs of the processes (ours: the test started them) whose command line holds ``arg``."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if arg.encode() in cmd and b"--worker-index" in cmd:
            pids.append(int(p))
    return pids


def test_sigterm_to_the_supervisor_during_start_up_leaves_no_worker_behind(tmp_path):
    """``serve --workers N`` installs its SIGTERM forwarder only once every worker is ready. A
    SIGTERM before that (a restart or stop during start-up) kills the supervisor outright (exit
    -15) and leaves the workers already started running as orphans: still listening on the proxy
    port and holding the file store's lock, so the next start fails."""
    gw = GatewayProcess(tmp_path, gateway_config("http://127.0.0.1:9/v1"), args=["--workers", "4"])
    orphans: list[int] = []
    try:
        gw.start()  # returns as soon as worker 0 answers; workers 1-3 are still starting
        assert "all 4 workers ready" not in gw.output(), "start-up was over before the signal"
        gw.proc.send_signal(signal.SIGTERM)
        gw.proc.wait(15)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            orphans = _processes_with(str(gw.config_path))
            if not orphans:
                break
            time.sleep(0.2)
        host, port = gw.listen.rsplit(":", 1)
        with socket.socket() as s:
            listening = s.connect_ex((host, int(port))) == 0
        assert not orphans and not listening, (
            f"supervisor exited {gw.proc.returncode}; workers still running: {orphans}, proxy port open: {listening}")
    finally:
        for pid in orphans or _processes_with(str(gw.config_path)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        gw.kill()
        gw._logf.close()


async def test_metrics_flush_at_sigterm_is_not_held_up_by_a_hung_trace_collector(tmp_path, prometheus):
    """On SIGTERM, ``Telemetry.stop`` shuts the tracer provider down first and the meter provider
    only after it, and bounds the pair with ``wait_for(timeout + 1)`` = 6 s. With a trace collector
    that accepts connections but never answers, the span flush (a full BatchSpanProcessor queue,
    2 s per batch) takes ~9 s; the bound only logs "did not flush within 5.0 s" and "stopped",
    then the process keeps running (the loop's executor waits for the thread) and the metrics go
    out last. Idle gateway, 3,000 requests: exit 9.4 s after SIGTERM; a supervisor that kills at
    8 s (docker's stop timeout is 10 s) gets none of the final metrics into Prometheus."""
    up = ScriptedUpstream().start()
    up.script("default", writes=[(0, ev(ROLE)), (0, ev(TXT("a"))), (0, ev(STOP)), (0, ev(USAGE(3, 1))), (0, DONE)])
    hung = socket.socket()  # a collector that never answers: the kernel accepts, nobody reads
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    cfg = gateway_config(up.base_url, prom_otlp=prometheus.otlp_url, traces=f"http://127.0.0.1:{hung.getsockname()[1]}",
                         export_interval_ms=60_000)  # only the flush at SIGTERM exports
    gw = GatewayProcess(tmp_path, cfg).start()
    n = 3000
    try:
        sem = asyncio.Semaphore(64)
        async with aiohttp.ClientSession() as s:
            async def one():
                async with sem:
                    async with s.post(gw.url + CHAT, json=_chat("x"), headers={"Authorization": "Bearer sk-test"}) as r:
                        await r.read()
                        return r.status
            assert await asyncio.gather(*(one() for _ in range(n))) == [200] * n
        start = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        try:
            gw.proc.wait(7)  # no request in flight: drain + the 6 s telemetry bound
        except Exception:
            pass
        took = time.monotonic() - start
        gw.kill()
        assert took < 7, f"the gateway was still running {took:.1f} s after SIGTERM"
        sel = f'instance="{gw.instance}"'
        deadline = time.monotonic() + 5
        while True:
            res = prometheus.query(f"sum(aisix_request_count_total{{{sel}}})")
            count = float(res[0]["value"][1]) if res else 0.0
            if count == n + 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert count == n + 1  # + the harness's readiness probe
    finally:
        gw.kill()
        hung.close()
        up.stop()
