"""``serve --workers N``: N processes on one port (SO_REUSEPORT), each its own
``service.instance.id``; worker 0 owns the file store and the Admin API, the others follow it."""
from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.harness import (ROLE, STOP, USAGE, GatewayMetrics, GatewayProcess, ScriptedUpstream, ev,
                           gateway_config)


async def test_two_workers_share_the_port_and_follow_admin_writes(tmp_path, prometheus):
    up = ScriptedUpstream().start()
    up.script("default", writes=[(0, ev(ROLE)), (0, ev(STOP)), (0, ev(USAGE(1, 1))), (0, b"data: [DONE]\n\n")])
    cfg = gateway_config(up.base_url, prom_otlp=prometheus.otlp_url, export_interval_ms=300)
    try:
        with GatewayProcess(tmp_path, cfg, args=["--workers", "2"]) as gw:
            deadline = time.monotonic() + 30
            while "all 2 workers ready" not in gw.output():
                assert time.monotonic() < deadline, gw.output()
                time.sleep(0.05)
            body = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "x"}]}

            async def one(model="m1"):
                # a new connection each time, so the kernel spreads them over both workers
                async with aiohttp.ClientSession() as s:
                    async with s.post(gw.url + "/v1/chat/completions", json={**body, "model": model},
                                      headers={"Authorization": "Bearer sk-test"}) as r:
                        await r.read()
                        return r.status

            statuses = [await one() for _ in range(60)]
            assert statuses == [200] * 60
            m0 = GatewayMetrics(prometheus, gw.instance)
            m1 = GatewayMetrics(prometheus, gw.instance + "/w1")
            deadline = time.monotonic() + 15
            while True:
                counts = [m.value("aisix_request_count_total", status_code="200") for m in (m0, m1)]
                if sum(counts) == 60 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert sum(counts) == 60 and min(counts) > 0, counts

            # a model created through worker 0's Admin API serves on every worker within 1 s
            model = {"name": "m-new", "model": "openai/up-2",
                     "provider_config": {"api_key": "sk-up", "api_base": up.base_url}}
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer admin-test-key"}) as s:
                async with s.post(gw.admin_url + "/models", json=model) as r:
                    assert r.status == 201, await r.text()
                async with s.get(gw.admin_url + "/apikeys") as r:
                    key = (await r.json())["list"][0]
                update = {"key": "sk-test", "allowed_models": ["m1", "m-new"]}
                async with s.put(gw.admin_url + f"/apikeys/{key['id']}", json=update) as r:
                    assert r.status == 200, await r.text()
            await asyncio.sleep(1.0)
            assert [await one("m-new") for _ in range(20)] == [200] * 20
    finally:
        up.stop()
