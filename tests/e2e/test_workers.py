"""``serve --workers N``: N processes on one port (SO_REUSEPORT), each its own
``service.instance.id``; worker 0 owns the file store and the Admin API, the others follow it.
A worker that dies is restarted with back-off while the others serve; SIGTERM drains all; SIGHUP
re-reads the config file's models and apikeys."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time

import aiohttp
import openai
import yaml

from tests.support.harness import (
    ROLE,
    STOP,
    USAGE,
    GatewayMetrics,
    GatewayProcess,
    ScriptedUpstream,
    ev,
    gateway_config,
    post_raw,
)


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


# -- workers that come back (issue 13 item 3, issue 15 item 1) --------------------------------------

MOCK = [{"name": "mock", "model": "mock/mock-1", "provider_config": {"ttft_ms": 20, "tpot_ms": 5, "tokens": 3}}]
CONCURRENCY = 4  # the load's requests in flight at once


def _mock_config(models=None) -> dict:
    cfg = gateway_config("http://127.0.0.1:9/v1", models=[dict(m) for m in models or MOCK],
                         apikeys=[{"key": "sk-test", "allowed_models": ["mock"]}])
    cfg["observability"]["enabled"] = False
    return cfg


def _wait_for(gw, pattern: str, timeout: float = 60.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while not (m := re.search(pattern, gw.output())):
        assert time.monotonic() < deadline and gw.proc.poll() is None, gw.output()
        time.sleep(0.05)
    return m


def _worker_pids(gw, n: int) -> list[int]:
    """The supervisor's children (from /proc), by worker index, once all ``n`` are ready."""
    _wait_for(gw, rf"all {n} workers ready")
    with open(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    by_index = {}
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        by_index[int(args[args.index(b"--worker-index") + 1])] = pid
    return [by_index[i] for i in range(n)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _kill_leftovers(pids) -> None:
    """Workers of a supervisor that a failed test left behind (only our own, by pid)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


class Load:
    """CONCURRENCY clients, each sending one chat request per new connection (so the kernel spreads
    them over the workers) until stopped, at most ``limit`` requests: counts of each outcome."""

    def __init__(self, url: str, limit: int = 4000):
        self.url, self.limit = url + "/v1/chat/completions", limit
        self.ok = self.refused = self.sent = 0
        self.other: list[str] = []
        self.stopped = False

    async def _client(self):
        body = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}
        while not self.stopped and self.sent < self.limit:
            self.sent += 1
            try:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                    async with s.post(self.url, json=body, headers={"Authorization": "Bearer sk-test"}) as r:
                        await r.read()
                        if r.status == 200:
                            self.ok += 1
                        else:
                            self.other.append(f"HTTP {r.status}")
            except aiohttp.ClientConnectorError as e:
                if isinstance(e.os_error, ConnectionRefusedError):
                    self.refused += 1
                else:
                    self.other.append(repr(e))
            except (aiohttp.ClientError, OSError) as e:  # the connection died under the request
                self.other.append(repr(e))

    def start(self) -> "Load":
        self.tasks = [asyncio.create_task(self._client()) for _ in range(CONCURRENCY)]
        return self

    async def until(self, predicate, timeout: float = 60.0) -> None:
        """Keep the load on until ``predicate()`` (polled every 50 ms)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline and self.sent < self.limit, "timed out under load"
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.stopped = True
        await asyncio.gather(*self.tasks)


async def test_a_killed_worker_is_restarted_while_the_others_keep_serving(tmp_path):
    """kill -9 of a worker under load: no connection is refused, at most the killed worker's
    in-flight requests fail, and it is back (a new pid) after the first back-off; worker 0 (the
    store's owner and the Admin API) comes back too, and a second death in a row doubles the
    back-off. Before: the supervisor stopped every worker when one died."""
    with GatewayProcess(tmp_path, _mock_config(), args=["--workers", "3"]) as gw:
        pids = _worker_pids(gw, 3)
        seen = set(pids)
        try:
            load = Load(gw.url).start()
            await load.until(lambda: load.ok >= 50)
            os.kill(pids[1], signal.SIGKILL)
            m = await _until_log(load, gw, r"worker 1 \(pid (\d+)\) died \(killed by SIGKILL\).*restarting it in 0\.5s")
            assert int(m.group(1)) == pids[1]
            new1 = int((await _until_log(load, gw, r"worker 1 is back \(pid (\d+)\)")).group(1))
            seen.add(new1)
            assert new1 != pids[1] and _alive(new1) and all(_alive(p) for p in (pids[0], pids[2]))
            ok_before = load.ok
            await load.until(lambda: load.ok >= ok_before + 100)
            assert load.refused == 0 and len(load.other) <= CONCURRENCY, load.other

            # again at once: a second death in a row waits twice as long
            os.kill(new1, signal.SIGKILL)
            await _until_log(load, gw, r"worker 1 \(pid \d+\) died .*restarting it in 1\.0s \(death 2 in a row\)")
            new1 = int((await _until_log(load, gw, rf"worker 1 is back \(pid (?!{new1}\b)(\d+)\)")).group(1))
            seen.add(new1)

            # worker 0 too: the proxy keeps serving; the Admin API is back with it
            failed_before = len(load.other)
            os.kill(pids[0], signal.SIGKILL)
            new0 = int((await _until_log(load, gw, r"worker 0 is back \(pid (\d+)\)")).group(1))
            seen.add(new0)
            ok_before = load.ok
            await load.until(lambda: load.ok >= ok_before + 100)
            await load.stop()
            assert load.refused == 0 and len(load.other) - failed_before <= CONCURRENCY, load.other
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer admin-test-key"}) as s:
                async with s.get(gw.admin_url + "/models") as r:
                    assert r.status == 200 and (await r.json())["total"] == 1
            assert gw.stop() == 0  # SIGTERM drains every worker, the restarted ones included
            assert not any(_alive(p) for p in (new0, new1, pids[2]))
        finally:
            _kill_leftovers(seen)


async def _until_log(load: Load, gw, pattern: str, timeout: float = 60.0) -> re.Match:
    await load.until(lambda: re.search(pattern, gw.output()) or gw.proc.poll() is not None, timeout)
    assert gw.proc.poll() is None, gw.output()
    return re.search(pattern, gw.output())


async def test_sigterm_after_a_restart_still_drains_every_stream(tmp_path):
    cfg = _mock_config([{"name": "mock", "model": "mock/mock-1",
                         "provider_config": {"ttft_ms": 0, "tpot_ms": 100, "tokens": 20}}])
    with GatewayProcess(tmp_path, cfg, args=["--workers", "2"]) as gw:
        pids = _worker_pids(gw, 2)
        seen = set(pids)
        try:
            os.kill(pids[1], signal.SIGKILL)
            new1 = int(_wait_for(gw, r"worker 1 is back \(pid (\d+)\)").group(1))
            seen.add(new1)
            streams = [asyncio.create_task(post_raw(gw.url + "/v1/chat/completions",
                                                    {"model": "mock", "stream": True,
                                                     "messages": [{"role": "user", "content": "x"}]}))
                       for _ in range(8)]
            await asyncio.sleep(0.5)  # under way (20 tokens, 100 ms apart)
            gw.proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*streams)
            assert [r.status for r in results] == [200] * 8
            assert all(r.data_events()[-1] == b"[DONE]" and len(r.data_events()) == 1 + 20 + 2 for r in results), \
                [r.data_events()[-3:] for r in results]
            assert gw.proc.wait(30) == 0 and not _alive(new1) and not _alive(pids[0])
            assert "died" not in gw.output().split("worker 1 is back")[1]  # the drain was not a death
        finally:
            _kill_leftovers(seen)


async def test_sighup_rereads_models_and_apikeys_without_dropping_a_connection(tmp_path):
    """SIGHUP to the supervisor: the config file's models and apikeys are upserted again (a new
    model, a key's new allowed_models) and serve on every worker, while a stream that started
    before runs to its end; a config that no longer loads is logged and changes nothing."""
    models = MOCK + [{"name": "slow", "model": "mock/mock-1", "provider_config": {"ttft_ms": 0, "tpot_ms": 100, "tokens": 20}}]
    cfg = _mock_config(models=models)
    cfg["apikeys"] = [{"key": "sk-test", "allowed_models": ["mock", "slow"]}]
    with GatewayProcess(tmp_path, cfg, args=["--workers", "2"]) as gw:
        pids = _worker_pids(gw, 2)
        try:
            stream = asyncio.create_task(post_raw(gw.url + "/v1/chat/completions", {
                "model": "slow", "stream": True, "messages": [{"role": "user", "content": "x"}]}))
            await asyncio.sleep(0.3)
            cfg["models"].append({"name": "m-hup", "model": "mock/mock-2", "provider_config": {"ttft_ms": 0, "tokens": 2}})
            cfg["apikeys"][0]["allowed_models"].append("m-hup")
            gw.config_path.write_text(yaml.safe_dump(cfg))
            gw.proc.send_signal(signal.SIGHUP)
            _wait_for(gw, r"SIGHUP: re-read .*: 3 models and 1 API keys upserted")

            async def one(model: str) -> int:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                    async with s.post(gw.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-test"},
                                      json={"model": model, "messages": [{"role": "user", "content": "x"}]}) as r:
                        await r.read()
                        return r.status
            deadline = time.monotonic() + 10
            while [await one("m-hup") for _ in range(10)] != [200] * 10:  # every worker has it (file poll)
                assert time.monotonic() < deadline
            r = await stream
            assert r.status == 200 and r.data_events()[-1] == b"[DONE]" and len(r.data_events()) == 1 + 20 + 2
            assert gw.proc.poll() is None and all(_alive(p) for p in pids)  # nobody restarted, nobody died

            gw.config_path.write_text("models: [{name: broken}]\n")
            gw.proc.send_signal(signal.SIGHUP)
            _wait_for(gw, r"SIGHUP: keeping the current configuration")
            assert await one("m-hup") == 200 and await one("mock") == 200
            assert "died" not in gw.output()
            assert gw.stop() == 0
        finally:
            _kill_leftovers(pids)


def test_sighup_without_workers_rereads_too(tmp_path):
    cfg = _mock_config()
    with GatewayProcess(tmp_path, cfg) as gw:
        cfg["apikeys"].append({"key": "sk-added-by-hup", "allowed_models": ["mock"]})
        gw.config_path.write_text(yaml.safe_dump(cfg))
        gw.proc.send_signal(signal.SIGHUP)
        _wait_for(gw, r"SIGHUP: re-read")
        client = openai.OpenAI(base_url=gw.base_url, api_key="sk-added-by-hup", max_retries=0)
        assert client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}]).choices
        assert gw.stop() == 0
