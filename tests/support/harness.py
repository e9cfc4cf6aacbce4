"""Test harness: the gateway as a real subprocess, and a scripted OpenAI-compatible upstream.

    up = ScriptedUpstream(); up.start()
    up.script("C01", writes=[(0, b"data: ...\\n\\n"), (0.02, b"...")])   # keyed by the last user message
    gw = GatewayProcess(tmp_path, gateway_config(up.base_url, prom=prometheus.otlp_url)); gw.start()
    client = openai.OpenAI(base_url=gw.base_url, api_key="sk-test")
    ...; gw.stop()   # SIGTERM: the gateway drains and flushes telemetry

Everything listens on 127.0.0.1 with free ports; processes are stopped by PID.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from aiohttp import web

from tests.support.services import HOST, free_port

# -- the case shorthands of tests/e2e/test_public_bug_cases.py (C01-C11) --------------------------------------
_BASE = '{"id":"c1","object":"chat.completion.chunk","created":1,"model":"up-1",'
ROLE = _BASE + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
STOP = _BASE + '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'


def TXT(s: str) -> str:
    return _BASE + '"choices":[{"index":0,"delta":{"content":' + json.dumps(s) + '},"finish_reason":null}]}'


def USAGE(p: int, c: int) -> str:
    return _BASE + f'"choices":[],"usage":{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{p + c}}}}}'


def ev(payload: str) -> bytes:
    """One SSE data event with LF line ends."""
    return f"data: {payload}\n\n".encode()


# -- scripted upstream ------------------------------------------------------------------------
@dataclass
class Script:
    """What the upstream does for one request: ``status``, ``headers``, then each ``(delay_s, bytes)``
    write flushed on its own; then ``end``: "eof" (clean end), "reset" (drop the connection) or
    "hold" (keep it open until the peer closes)."""

    status: int = 200
    headers: dict = field(default_factory=lambda: {"Content-Type": "text/event-stream"})
    writes: list = field(default_factory=list)
    end: str = "eof"
    body: bytes | None = None  # a plain (non-streamed) body instead of writes
    head_delay: float = 0.0    # seconds before the status line and headers go out
    refuse_field: str | None = None  # a strict server: a body with this field gets a 400 naming it


@dataclass
class Seen:
    """One request the upstream received, and when its connection was closed by the gateway."""

    path: str
    headers: dict
    body: dict
    raw: bytes
    started: float
    closed_by_peer: float | None = None
    write_times: list = field(default_factory=list)
    finished: float | None = None


class ScriptedUpstream:
    """An OpenAI-compatible upstream on its own thread and loop (so sync clients don't block it).

    The script is chosen by the content of the request's last message (``messages[-1].content``);
    ``default`` is used when no script has that key.
    """

    def __init__(self):
        self.scripts: dict[str, Script] = {}
        self.seen: list[Seen] = []
        self.in_flight = 0      # requests being answered now
        self.max_in_flight = 0  # the most ever at once
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}/v1"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def script(self, key: str, **kw) -> Script:
        s = Script(**kw)
        self.scripts[key] = s
        return s

    def start(self) -> "ScriptedUpstream":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self):
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/embeddings", self._handle)
        app.router.add_post("/v1/responses", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, self.port).start()

    def stop(self):
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def last(self, key: str) -> Seen:
        return [s for s in self.seen if _key(s.body) == key][-1]

    async def _handle(self, request: web.Request):
        raw = await request.read()
        body = json.loads(raw)
        seen = Seen(request.path, dict(request.headers), body, raw, time.monotonic())
        self.seen.append(seen)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        script = self.scripts.get(_key(body)) or self.scripts.get("default") or Script(
            status=500, headers={"Content-Type": "application/json"}, body=b'{"error":{"message":"no script"}}')
        if script.refuse_field is not None and script.refuse_field in body:  # e.g. vLLM-style strict validation
            return web.json_response({"error": {"message": f"Unrecognized request argument supplied: "
                                                f"{script.refuse_field}", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=400)
        try:
            if script.head_delay:
                await asyncio.sleep(script.head_delay)
            if script.body is not None:
                return web.Response(status=script.status, body=script.body, headers=script.headers)
            resp = web.StreamResponse(status=script.status, headers=script.headers)
            await resp.prepare(request)
            for delay, data in script.writes:
                if delay:
                    await asyncio.sleep(delay)
                await resp.write(data)
                seen.write_times.append(time.monotonic())
            if script.end == "reset":
                request.transport.abort()
                seen.finished = time.monotonic()
                return resp
            if script.end == "hold":
                await asyncio.sleep(3600)
            await resp.write_eof()
            seen.finished = time.monotonic()
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            seen.closed_by_peer = time.monotonic()
            raise
        finally:
            self.in_flight -= 1


def _key(body: dict) -> str:
    try:
        return str(body["messages"][-1]["content"])
    except (KeyError, IndexError, TypeError):
        return body.get("input") if isinstance(body.get("input"), str) else ""


# -- the gateway process ----------------------------------------------------------------------
def gateway_config(upstream_base: str, *, prom_otlp: str | None = None, traces: str | None = None,
                   models: list | None = None, apikeys: list | None = None, export_interval_ms: int = 300,
                   data_dir: Path | None = None, **provider_config) -> dict:
    """A config for the cases' conventions: alias ``m1`` → the upstream, key ``sk-test`` on ``m1``.
    Metrics go to ``prom_otlp`` (or a dead port), traces to ``traces`` (or a dead port)."""
    dead = f"http://{HOST}:{free_port()}"
    return {
        "server": {"proxy": {"listen": f"{HOST}:{free_port()}"}, "admin": {"listen": f"{HOST}:{free_port()}"},
                   "shutdown_grace_ms": 5000},
        "deployment": {"admin": {"admin_key": [{"key": "admin-test-key"}]}, "config_provider": "file",
                       "file": {"path": str((data_dir or Path("/nonexistent")) / "resources.json")}},
        "observability": {"service_name": "aisix",
                          "metrics": {"otlp_endpoint": prom_otlp or f"{dead}/api/v1/otlp/v1/metrics",
                                      "export_interval_ms": export_interval_ms},
                          "traces": {"otlp_endpoint": traces or dead}},
        "models": models if models is not None else [
            {"name": "m1", "model": "openai/up-1",
             "provider_config": {"api_key": "sk-upstream", "api_base": upstream_base, **provider_config}}],
        "apikeys": apikeys if apikeys is not None else [{"key": "sk-test", "allowed_models": ["m1"]}],
    }


class GatewayProcess:
    """``python -m aisix serve --config FILE`` as a child process."""

    def __init__(self, tmp_path: Path, config: dict, env: dict | None = None, args: list[str] = ()):
        self.args = list(args)
        self.dir = Path(tmp_path)
        self.dir.mkdir(parents=True, exist_ok=True)
        if config["deployment"]["file"]["path"].startswith("/nonexistent"):
            config["deployment"]["file"]["path"] = str(self.dir / "resources.json")
        self.config = config
        self.config_path = self.dir / "aisix.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.listen = config["server"]["proxy"]["listen"]
        self.url = f"http://{self.listen}"
        self.base_url = f"{self.url}/v1"
        self.admin_url = f"http://{config['server']['admin']['listen']}/aisix/admin"
        self.instance = f"{os.uname().nodename}:{self.listen.rsplit(':', 1)[1]}"
        self.env = {**os.environ, **(env or {})}
        self.log = self.dir / "gateway.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> "GatewayProcess":
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "aisix", "serve", "--config", str(self.config_path),
                                      *self.args],
                                     cwd=self.dir, stdout=self._logf, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
            try:
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=1)
            except urllib.error.HTTPError:
                return self  # it answered (401 without a key): ready
            except OSError:
                time.sleep(0.05)
                continue
            return self
        self.kill()
        raise RuntimeError(f"gateway not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the gateway and wait for it to exit; returns its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        try:
            self.stop()
        finally:
            self.kill()
            self._logf.close()


# -- clients and metrics ------------------------------------------------------------------------
@dataclass
class RawStream:
    """What a client got: status, headers, every body read with its arrival time (monotonic s)."""

    status: int
    headers: dict
    reads: list
    closed_at: float | None = None

    @property
    def body(self) -> bytes:
        return b"".join(b for _, b in self.reads)

    def data_events(self) -> list[bytes]:
        from aisix.sse import SSEParser
        p = SSEParser()
        evs = p.feed(self.body)
        return [e.data for e in evs if e.data is not None]


async def post_raw(url: str, body: dict, key: str = "sk-test", *, max_events: int | None = None,
                   headers: dict | None = None) -> RawStream:
    """POST ``body`` and read the response as raw bytes; with ``max_events``, close the connection
    after that many SSE data events arrived."""
    import aiohttp
    hdrs = {"Authorization": f"Bearer {key}", **(headers or {})}
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        resp = await s.post(url, json=body, headers=hdrs)
        out = RawStream(resp.status, resp.headers.copy(), [])
        seen = 0
        async for chunk in resp.content.iter_any():
            out.reads.append((time.monotonic(), chunk))
            seen += chunk.count(b"data:")
            if max_events is not None and seen >= max_events:
                resp.close()
                out.closed_at = time.monotonic()
                return out
        resp.release()
        return out


class GatewayMetrics:
    """Reads one gateway process's series from Prometheus (``instance`` = its service.instance.id)."""

    def __init__(self, prom, instance: str):
        self.prom = prom
        self.instance = instance

    def sel(self, name: str, **labels) -> str:
        parts = [f'instance="{self.instance}"'] + [f'{k}="{v}"' for k, v in labels.items()]
        return f"{name}{{{','.join(parts)}}}"

    def value(self, name: str, **labels) -> float:
        res = self.prom.query(f"sum({self.sel(name, **labels)})")
        return float(res[0]["value"][1]) if res else 0.0

    def wait_value(self, name: str, expected: float, timeout: float = 15, **labels) -> float:
        """Poll until the summed series equals ``expected``; fail if it never does (or overshoots)."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.value(name, **labels)
            if v == expected:
                return v
            if v > expected or time.monotonic() > deadline:
                raise AssertionError(f"{self.sel(name, **labels)} = {v}, expected {expected}")
            time.sleep(0.1)
