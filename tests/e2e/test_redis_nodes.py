"""Two nodes (``serve --workers 2`` each) on one real etcd and one real Redis, limits in Redis:
exactly the limit admitted across the four processes, never more in flight at the upstream than
the concurrency limit, cluster-wide headers on every 429; a node killed with SIGKILL gives its
slots back within the lease TTL; Redis stopped mid-run counts locally (``allow``) or refuses
(``deny``), and shared counting comes back with Redis."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import aiohttp
import openai
import pytest

from tests.support.harness import (
    ROLE,
    STOP,
    USAGE,
    GatewayMetrics,
    GatewayProcess,
    ScriptedUpstream,
    ev,
    gateway_config,
)

TTL_MS = 2000  # lease TTL of these tests (the default is 10 s)
KEYS = [{"key": "sk-rpm", "allowed_models": ["m1"], "rate_limit": {"rpm": 50, "concurrency": 5}},
        {"key": "sk-conc", "allowed_models": ["m1"], "rate_limit": {"concurrency": 5}},
        {"key": "sk-out", "allowed_models": ["m1"], "rate_limit": {"rpm": 4}},
        {"key": "sk-back", "allowed_models": ["m1"], "rate_limit": {"rpm": 6}}]
DONE = b"data: [DONE]\n\n"


def _config(up: ScriptedUpstream, etcd, redis, prom_otlp: str | None = None, **store) -> dict:
    cfg = gateway_config(up.base_url, apikeys=KEYS, prom_otlp=prom_otlp)
    cfg["deployment"].update(config_provider="etcd", etcd={"host": [etcd.endpoint], "prefix": "/aisix", "timeout": 2},
                             rate_limit_store={"kind": "redis", "url": redis.url, "lease_ttl_ms": TTL_MS, **store})
    return cfg


def _wait_ready(node: GatewayProcess, workers: int = 2) -> None:
    deadline = time.monotonic() + 30
    while f"all {workers} workers ready" not in node.output():
        assert time.monotonic() < deadline, node.output()
        time.sleep(0.05)


@contextlib.contextmanager
def _nodes(tmp_path, up, etcd, redis, prom_otlp=None):
    a = GatewayProcess(tmp_path / "a", _config(up, etcd, redis, prom_otlp), args=["--workers", "2"])
    b = GatewayProcess(tmp_path / "b", _config(up, etcd, redis, prom_otlp), args=["--workers", "2"])
    with a, b:
        _wait_ready(a)
        _wait_ready(b)
        yield a, b


@pytest.fixture
def upstream():
    up = ScriptedUpstream().start()
    # a stream that takes ~50 ms at the upstream
    up.script("default", writes=[(0, ev(ROLE)), (0.05, ev(STOP)), (0, ev(USAGE(3, 2))), (0, DONE)])
    up.script("hold", writes=[(0, ev(ROLE))], end="hold")  # a stream that never ends
    yield up
    up.stop()


async def _chat(s: aiohttp.ClientSession, node: GatewayProcess, key: str, content: str = "hi"):
    """One streamed chat on a new connection (so the kernel spreads them over the node's workers);
    returns (status, headers, error code or None)."""
    body = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": content}]}
    async with s.post(f"{node.base_url}/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}", "Connection": "close"}) as r:
        data = await r.read()
        code = (await r.json(content_type=None))["error"]["code"] if r.status != 200 else None
        assert r.status != 200 or data.endswith(DONE)
        return r.status, r.headers.copy(), code


def _rest_of_minute() -> float:
    return 60 - time.time() % 60


async def _in_one_window(seconds_needed: float) -> None:
    """Start at the beginning of a fresh minute window when less than ``seconds_needed`` are left."""
    if _rest_of_minute() < seconds_needed:
        await asyncio.sleep(_rest_of_minute() + 0.2)


async def test_two_nodes_admit_exactly_the_limit_with_never_more_in_flight(tmp_path, upstream, etcd, redis):
    with _nodes(tmp_path, upstream, etcd, redis) as (a, b):
        results = []
        async with aiohttp.ClientSession() as s:
            await _in_one_window(15)
            started = time.time()

            async def client(i: int) -> None:  # 10 clients x 30 requests, alternating the nodes
                for j in range(30):
                    status, headers, code = await _chat(s, (a, b)[(i + j) % 2], "sk-rpm")
                    results.append((status, headers, code))
                    if code == "concurrency_limit_exceeded":
                        await asyncio.sleep(0.03)  # a polite client backs off a little

            await asyncio.gather(*(client(i) for i in range(10)))
            assert int(started // 60) == int(time.time() // 60), "the run crossed a minute boundary"
        ok = [h for status, h, _ in results if status == 200]
        refused = [(h, code) for status, h, code in results if status == 429]
        print(f"300 requests over 2 nodes x 2 workers: {len(ok)} admitted (rpm 50), {len(refused)} refused "
              f"({sum(c == 'concurrency_limit_exceeded' for _, c in refused)} by concurrency), "
              f"most in flight at the upstream: {upstream.max_in_flight}")
        assert len(results) == 300 and len(ok) + len(refused) == 300
        assert len(ok) == 50
        # one count for all four processes: each admitted request saw a different remaining count
        assert sorted(int(h["x-ratelimit-remaining-requests"]) for h in ok) == list(range(50))
        assert upstream.max_in_flight <= 5
        assert any(c == "concurrency_limit_exceeded" for _, c in refused)  # the limit was reached
        for h, code in refused:
            assert h["x-ratelimit-limit-requests"] == "50" and h["x-ratelimit-limit-concurrent"] == "5"
            if code == "rate_limit_exceeded":
                assert h["x-ratelimit-remaining-requests"] == "0"  # cluster-wide: every process says 0
            else:
                assert code == "concurrency_limit_exceeded"
                assert h["x-ratelimit-remaining-concurrent"] == "0"
                assert int(h["x-ratelimit-remaining-requests"]) < 50
        assert sum(code == "rate_limit_exceeded" for _, code in refused) > 0


def _kill_node(node: GatewayProcess) -> None:
    """SIGKILL the node's workers and its supervisor (the processes this test started, by PID)."""
    pid = node.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        workers = [int(p) for p in f.read().split()]
    assert len(workers) == 2
    for w in workers:
        os.kill(w, signal.SIGKILL)
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(5)


async def test_kill_9_of_a_node_frees_its_slots_within_the_lease_ttl(tmp_path, upstream, etcd, redis):
    with _nodes(tmp_path, upstream, etcd, redis) as (a, b):
        async with aiohttp.ClientSession() as s:
            streams = [asyncio.create_task(_chat(s, a, "sk-conc", "hold")) for _ in range(5)]
            deadline = time.monotonic() + 10
            while upstream.in_flight < 5:  # all five slots are A's
                assert time.monotonic() < deadline, upstream.in_flight
                await asyncio.sleep(0.02)
            status, headers, code = await _chat(s, b, "sk-conc")
            assert (status, code, headers["x-ratelimit-remaining-concurrent"]) == (429, "concurrency_limit_exceeded", "0")
            _kill_node(a)
            killed = time.monotonic()
            status, _, code = await _chat(s, b, "sk-conc")
            assert (status, code) == (429, "concurrency_limit_exceeded")  # the dead node's leases still hold
            while (await _chat(s, b, "sk-conc"))[0] != 200:
                assert time.monotonic() - killed < TTL_MS / 1000 + 2, "the slots never came back"
                await asyncio.sleep(0.02)
            freed = time.monotonic() - killed
            for t in streams:
                t.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
        report = f"kill -9 of a node holding 5 slots: free on the other node {freed * 1000:.0f} ms later (lease TTL {TTL_MS} ms)"
        print(report)
        (tmp_path.parent / "redis_slot_recovery.txt").write_text(report + "\n")
        assert freed <= TTL_MS / 1000 + 1.0  # the lease semantics: last renewal + TTL, plus polling


def _log_count(node: GatewayProcess, text: str) -> int:
    return node.output().count(text)


async def test_redis_stopped_counts_locally_then_shares_again(tmp_path, upstream, etcd, redis, prometheus):
    with _nodes(tmp_path, upstream, etcd, redis, prom_otlp=prometheus.otlp_url) as (a, b):
        async with aiohttp.ClientSession() as s:
            await _in_one_window(10)
            redis.stop()
            during = [await _chat(s, (a, b)[i % 2], "sk-out") for i in range(40)]
            admitted = [h for status, h, _ in during if status == 200]
            # allow: every process counts rpm 4 on its own, so both nodes admit (at least 4 each)
            assert 8 <= len(admitted) <= 16, len(admitted)
            assert all(code in (None, "rate_limit_exceeded") for _, _, code in during)
            for node in (a, b):
                assert 1 <= _log_count(node, "unreachable") <= 2  # once per worker that saw it
            errors = sum(GatewayMetrics(prometheus, n.instance + w).value("aisix_ratelimit_store_errors_total")
                         for n in (a, b) for w in ("", "/w1"))
            deadline = time.monotonic() + 15
            while errors < 40 and time.monotonic() < deadline:  # one per request not counted in Redis
                await asyncio.sleep(0.3)
                errors = sum(GatewayMetrics(prometheus, n.instance + w).value("aisix_ratelimit_store_errors_total")
                             for n in (a, b) for w in ("", "/w1"))
            assert errors == 40

            redis.start()  # back, empty
            deadline = time.monotonic() + 10
            while any(_log_count(n, "reachable again") < _log_count(n, "unreachable") for n in (a, b)):
                assert time.monotonic() < deadline, (a.output(), b.output())
                await asyncio.sleep(0.05)
            await _in_one_window(10)
            after = [await _chat(s, (a, b)[i % 2], "sk-back") for i in range(20)]
            ok = [h for status, h, _ in after if status == 200]
            assert sorted(int(h["x-ratelimit-remaining-requests"]) for h in ok) == list(range(6))


async def test_deny_answers_429_in_the_openai_envelope_while_redis_is_down(tmp_path, upstream, etcd, redis):
    cfg = _config(upstream, etcd, redis, on_store_error="deny")
    cfg["deployment"]["config_provider"] = "file"
    with GatewayProcess(tmp_path, cfg) as gw:
        client = openai.AsyncOpenAI(base_url=gw.base_url, api_key="sk-out", max_retries=0)
        async with client.chat.completions.stream(model="m1", messages=[{"role": "user", "content": "hi"}]) as st:
            await st.get_final_completion()
        redis.stop()
        with pytest.raises(openai.RateLimitError) as ei:
            await client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}], stream=True)
        err = ei.value.body
        assert ei.value.status_code == 429 and err["code"] == "rate_limit_store_unavailable"
        assert err["type"] == "rate_limit_error" and "unreachable" in err["message"] and redis.url not in err["message"]
        assert ei.value.response.headers["Retry-After"] == "1"
        redis.start()
        deadline = time.monotonic() + 10
        while "reachable again" not in gw.output():
            assert time.monotonic() < deadline, gw.output()
            await asyncio.sleep(0.05)
        async with client.chat.completions.stream(model="m1", messages=[{"role": "user", "content": "hi"}]) as st:
            await st.get_final_completion()
        await client.close()
