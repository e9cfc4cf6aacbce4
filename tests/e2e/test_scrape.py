"""The scrape endpoint (observability.metrics.prometheus.listen): a real Prometheus that both takes
the OTLP push and scrapes ``/metrics`` holds the same aisix series (names, labels, values) from
each; with ``--workers N`` worker i serves on port + i."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from tests.support import services
from tests.support.harness import (
    ROLE,
    STOP,
    TXT,
    USAGE,
    GatewayProcess,
    ev,
    gateway_config,
    post_raw,
)

CHAT = "/v1/chat/completions"
WHOLE = {"id": "c1", "object": "chat.completion", "created": 1, "model": "up-1",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def _scripts(upstream) -> None:
    upstream.script("s-stream", writes=[(0, ev(ROLE) + ev(TXT("a"))), (0.02, ev(TXT("b"))), (0.02, ev(TXT("c"))),
                                        (0, ev(STOP)), (0, ev(USAGE(5, 3))), (0, b"data: [DONE]\n\n")])
    upstream.script("s-whole", headers={"Content-Type": "application/json"}, body=json.dumps(WHOLE).encode())


def _chat(key: str, stream: bool) -> dict:
    return {"model": "m1", "stream": stream, "messages": [{"role": "user", "content": key}]}


def _series(prom, job: str) -> dict:
    """``(name, labels without job/instance)`` → value, for every aisix series of ``job``."""
    out = {}
    for s in prom.query(f'{{__name__=~"aisix_.*",job="{job}"}}'):
        labels = {k: v for k, v in s["metric"].items() if k not in ("job", "instance")}
        out[(labels.pop("__name__"), tuple(sorted(labels.items())))] = float(s["value"][1])
    return out


def _get_metrics(port: int) -> str:
    req = urllib.request.Request(f"http://{services.HOST}:{port}/metrics",
                                 headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        return r.read().decode()


async def test_scraped_series_equal_the_pushed_ones(tmp_path, upstream):
    _scripts(upstream)
    port = services.free_port()
    with services.prometheus_server(tmp_path / "prom", scrape=[f"{services.HOST}:{port}"]) as prom:
        cfg = gateway_config(upstream.base_url, prom_otlp=prom.otlp_url, export_interval_ms=300)
        cfg["observability"]["metrics"]["prometheus"] = {"listen": f"{services.HOST}:{port}"}
        with GatewayProcess(tmp_path / "gw", cfg) as gw:
            for key, stream in (("s-stream", True), ("s-whole", False), ("s-stream", True)):
                assert (await post_raw(gw.url + CHAT, _chat(key, stream))).status == 200
            assert (await post_raw(gw.url + CHAT, _chat("s-whole", False), key="sk-nope")).status == 401
            text = _get_metrics(port)
            assert "aisix_llm_inter_token_latency_milliseconds_bucket" in text and text.rstrip().endswith("# EOF")
            deadline = time.monotonic() + 20
            while True:  # the push every 300 ms, the scrape every 1 s: wait until both saw the last request
                pushed, scraped = _series(prom, "aisix"), _series(prom, "scrape")
                if pushed and pushed == scraped or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
    assert set(pushed) == set(scraped), (set(pushed) ^ set(scraped))
    assert pushed == scraped
    names = {name for name, _ in pushed}
    for name in ("aisix_request_count_total", "aisix_request_latency_milliseconds_bucket",
                 "aisix_token_count_total", "aisix_llm_inter_token_latency_milliseconds_count",
                 "aisix_llm_time_per_output_token_milliseconds_sum", "aisix_telemetry_dropped_total"):
        assert name in names
    assert pushed[("aisix_token_count_total", (("model", "m1"), ("type", "total")))] == 2 * 8 + 10


async def test_each_worker_serves_on_port_plus_its_index(tmp_path, upstream):
    _scripts(upstream)
    port = services.free_port()
    while True:  # two free ports in a row
        try:
            with services.socket.socket() as s:
                s.bind((services.HOST, port + 1))
            break
        except OSError:
            port = services.free_port()
    cfg = gateway_config(upstream.base_url)
    cfg["observability"]["metrics"]["prometheus"] = {"listen": f"{services.HOST}:{port}"}
    with GatewayProcess(tmp_path, cfg, args=["--workers", "2"]) as gw:
        deadline = time.monotonic() + 60
        while "all 2 workers ready" not in gw.output():
            assert time.monotonic() < deadline, gw.output()
            await asyncio.sleep(0.1)
        instances = set()
        for p in (port, port + 1):
            text = _get_metrics(p)
            info = [line for line in text.splitlines() if line.startswith("target_info{")]
            assert len(info) == 1
            instances.add(info[0].split('service_instance_id="')[1].split('"')[0])
    assert instances == {gw.instance, gw.instance + "/w1"}


def test_a_port_in_use_is_a_config_error(tmp_path, upstream):
    import subprocess
    import sys
    with services.socket.socket() as busy:
        busy.bind((services.HOST, 0))
        busy.listen(1)
        cfg = gateway_config(upstream.base_url)
        cfg["observability"]["metrics"]["prometheus"] = {"listen": f"{services.HOST}:{busy.getsockname()[1]}"}
        gw = GatewayProcess(tmp_path, cfg)
        out = subprocess.run([sys.executable, "-m", "aisix", "serve", "--config", str(gw.config_path)],
                             capture_output=True, text=True, timeout=30, cwd=tmp_path, check=False)
    assert out.returncode != 0
    assert "observability.metrics.prometheus.listen: cannot listen on" in out.stderr
    assert "Traceback" not in out.stderr


class _Listener:
    """A TCP port that counts the connections made to it (and answers nothing)."""

    def __init__(self):
        self.connections = 0

    async def __aenter__(self):
        def made(reader, writer):
            self.connections += 1
            writer.close()
        self.server = await asyncio.start_server(made, services.HOST, 0)
        self.url = f"http://{services.HOST}:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("how", ["env", "config"])
async def test_exporters_off_push_nothing_and_the_scrape_still_counts(tmp_path, upstream, how):
    """``OTEL_METRICS_EXPORTER=none`` / ``OTEL_TRACES_EXPORTER=none`` (or ``otlp_endpoint: null``):
    with only the scrape endpoint wanted, nothing connects to an OTLP endpoint, the scrape counts
    every request, and a new trace goes upstream unsampled (nothing records it)."""
    _scripts(upstream)
    port = services.free_port()
    async with _Listener() as metrics_sink, _Listener() as traces_sink:
        cfg = gateway_config(upstream.base_url, prom_otlp=f"{metrics_sink.url}/api/v1/otlp/v1/metrics",
                             traces=traces_sink.url, export_interval_ms=200)
        cfg["observability"]["metrics"]["prometheus"] = {"listen": f"{services.HOST}:{port}"}
        env = {}
        if how == "env":
            env = {"OTEL_METRICS_EXPORTER": "none", "OTEL_TRACES_EXPORTER": "none"}
        else:
            cfg["observability"]["metrics"]["otlp_endpoint"] = cfg["observability"]["traces"]["otlp_endpoint"] = None
        with GatewayProcess(tmp_path / "gw", cfg, env=env) as gw:
            for key, stream in (("s-stream", True), ("s-whole", False), ("s-whole", False)):
                assert (await post_raw(gw.url + CHAT, _chat(key, stream))).status == 200
            assert upstream.last("s-whole").headers["traceparent"].endswith("-00")
            await asyncio.sleep(1.0)  # five push intervals
            text = _get_metrics(port)
        assert metrics_sink.connections == 0 and traces_sink.connections == 0
    assert 'aisix_request_count_total{endpoint="/v1/chat/completions",method="POST",status_code="200"} 3.0' in text
    assert 'reason="span_export_failed"' not in text  # no trace exporter, no series of its failures

