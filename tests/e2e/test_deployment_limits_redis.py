"""A deployment's own ``rate_limit`` counted once for two gateway processes (two nodes on one
real etcd) on one real Redis (``deployment.rate_limit_store.kind: redis``), through the official ``openai`` client: exactly the
deployment's ``rpm`` is sent to it in the window, the rest goes to the model's other deployment and
every request succeeds; its ``concurrency`` holds across both processes."""
from __future__ import annotations

import asyncio
import time

import openai
import pytest

from tests.support.harness import GatewayProcess, ScriptedUpstream, gateway_config

JSON = {"Content-Type": "application/json"}
ANSWER = (b'{"id":"c","object":"chat.completion","model":"up-1","choices":[{"index":0,"message":'
          b'{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
          b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
RPM = 12


def dep(i: str, up: ScriptedUpstream, **kw) -> dict:
    return {"id": i, "model": "openai/up-1", "provider_config": {"api_key": "sk-up", "api_base": up.base_url}, **kw}


@pytest.fixture
def ups():
    ups = [ScriptedUpstream().start() for _ in range(2)]
    for up in ups:
        up.script("default", status=200, headers=JSON, body=ANSWER)
        up.script("slow", status=200, headers=JSON, body=ANSWER, head_delay=0.4)
    yield ups
    for up in ups:
        up.stop()


@pytest.fixture
def nodes(tmp_path, ups, etcd, redis):
    small, big = ups
    models = [{"name": "g", "deployments": [dep("small", small, weight=50, rate_limit={"rpm": RPM}), dep("big", big)]},
              {"name": "c", "deployments": [dep("small", small, weight=50, rate_limit={"concurrency": 2}),
                                            dep("big", big)]}]
    procs = []
    for name in ("a", "b"):
        cfg = gateway_config(small.base_url, models=models, apikeys=[{"key": "sk-test", "allowed_models": ["g", "c"]}])
        cfg["deployment"].update(config_provider="etcd", etcd={"host": [etcd.endpoint], "prefix": "/aisix"},
                                 rate_limit_store={"kind": "redis", "url": redis.url})
        procs.append(GatewayProcess(tmp_path / name, cfg))
    with procs[0], procs[1]:
        yield procs


async def _send(nodes, model: str, content: str, n: int, concurrency: int) -> list[str]:
    """``n`` chats over ``concurrency`` clients alternating the two nodes; the x-aisix-deployment of each."""
    clients = [openai.AsyncOpenAI(base_url=g.base_url, api_key="sk-test", max_retries=0) for g in nodes]
    went: list[str] = []

    async def one_client(i: int) -> None:
        for j in range(i, n, concurrency):
            r = await clients[j % 2].chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": content}])
            went.append(r.headers["x-aisix-deployment"])

    try:
        await asyncio.gather(*(one_client(i) for i in range(concurrency)))
    finally:
        for c in clients:
            await c.close()
    return went


async def test_exactly_the_deployment_rpm_goes_to_it_across_two_processes(nodes, ups):
    small, big = ups
    if 60 - time.time() % 60 < 20:  # the run must stay in one clock-aligned minute
        await asyncio.sleep(60 - time.time() % 60 + 0.2)
    started = time.time()
    went = await _send(nodes, "g", "hi", 80, 8)
    assert int(started // 60) == int(time.time() // 60), "the run crossed a minute boundary"
    print(f"80 requests over 2 processes: {went.count('g/small')} to small (rpm {RPM}), {went.count('g/big')} to big")
    assert len(went) == 80  # every request succeeded (a refusal would have raised)
    assert went.count("g/small") == RPM == len(small.seen)  # alone, each process would have sent 12
    assert went.count("g/big") == 80 - RPM == len(big.seen)


async def test_the_deployment_concurrency_holds_across_two_processes(nodes, ups):
    small, big = ups
    went = await _send(nodes, "c", "slow", 12, 12)  # 12 at once, each held 0.4 s at the upstream
    print(f"12 concurrent over 2 processes: most in flight at small {small.max_in_flight} (concurrency 2), "
          f"{went.count('c/small')} to small, {went.count('c/big')} to big")
    assert len(went) == 12
    assert small.max_in_flight == 2  # reached, never passed: alone, each process would have let 2 in
    assert went.count("c/small") == len(small.seen) and went.count("c/big") == len(big.seen) >= 10 - 2
    went = await _send(nodes, "c", "slow", 2, 2)  # the slots were given back
    assert went == ["c/small", "c/small"]
