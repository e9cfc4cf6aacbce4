"""Deployments' own rate limits counted in a real Redis (``rate_limit_store.kind: redis``): two
routers, each with its own :class:`RedisRateLimitHook`, stand for two gateway processes.

Exactly a deployment's ``rpm`` goes to it across both, the rest to the other deployment; a
deployment Redis found spent is skipped without asking again until its minute ends; concurrency
slots and tokens are given back; Redis down: ``allow`` counts on the router's own counts, ``deny``
skips the deployment, and answers 429 when no other is left. Windows follow a clock the test
controls (passed to Redis in place of ``TIME``)."""
from __future__ import annotations

import random

import pytest

from aisix.config.resources import Model
from aisix.errors import GatewayError
from aisix.hooks.ratelimit_redis import RedisRateLimitHook
from aisix.proxy.routing import ROOM, Router
from tests.e2e.test_ratelimit_redis import T0, settle, store_cfg
from tests.unit.test_ratelimit import Clock


def group(small_rl: dict, big: bool = True) -> Model:
    """Alias ``g``: ``small`` with its own limit (preferred 1000 to 1), and ``big`` without one."""
    deps = [{"id": "small", "model": "openai/x", "weight": 1000, "rate_limit": small_rl}]
    if big:
        deps.append({"id": "big", "model": "openai/x"})
    return Model(id="model-g", name="g", deployments=deps)


class Proc:
    """One gateway process's router and limiter; counts the hook's take_room calls (round trips)."""

    def __init__(self, hook: RedisRateLimitHook, clock: Clock):
        self.hook, self.clock = hook, clock
        self.router = Router(random.Random(7))
        self.router.shared = self
        self.asked = 0

    async def take_room(self, model, target):
        self.asked += 1
        return await self.hook.take_room(model, target)

    def give_room(self, taken, tokens):
        self.hook.give_room(taken, tokens)

    async def attempt(self, m: Model, tokens: int = 0, hold: bool = False):
        """choose + claim as the proxy does; then start and (unless ``hold``) finish the attempt.
        Returns (deployment id or None, the call's state)."""
        state: dict = {}
        wall = self.clock()
        target = self.router.choose(m, set(), 0.0, wall)
        if target is not None and target.capacity is not None:
            target = await self.router.claim(m, target, set(), set(), state, 0.0, wall)
        if target is None:
            return None, state
        self.router.started(target, wall)
        if not hold:
            await self.done(target, state, tokens)
        return target.deployment_id, state

    async def done(self, target: Model, state: dict, tokens: int = 0) -> None:
        self.router.finished(target)
        self.router.charge(target, tokens, self.clock(), state)
        await settle(self.hook)


@pytest.fixture
async def procs(redis):
    made = []

    def make(n=2, **cfg):
        clock = Clock(T0)
        ps = [Proc(RedisRateLimitHook(store_cfg(redis, **cfg), clock=clock), clock) for _ in range(n)]
        made.extend(ps)
        return clock, ps

    yield make
    for p in made:
        await p.hook.aclose()


async def test_exactly_the_deployment_rpm_goes_to_it_across_two_processes(procs):
    clock, (a, b) = procs()
    m = group({"rpm": 5})
    got = [(await p.attempt(m))[0] for _ in range(20) for p in (a, b)]
    assert got.count("small") == 5 and got.count("big") == 35  # alone, each process would have let 5 in
    assert got[:5] == ["small"] * 5  # preferred while it had room
    # each process asked Redis once more, was refused, and knows small is spent until the minute ends
    assert (a.asked, b.asked) == (3 + 1, 2 + 1)
    end = (T0 // 60 + 1) * 60
    assert a.router.state(m.targets[0]).full_until == end == b.router.state(m.targets[0]).full_until
    clock.t = end  # the next minute: room again, for both
    assert [(await p.attempt(m))[0] for p in (b, a)] == ["small", "small"]


async def test_a_deployment_without_another_is_none_when_spent(procs):
    _, (a, b) = procs()
    m = group({"rpm": 2}, big=False)
    assert [(await p.attempt(m))[0] for p in (a, b, a, b)] == ["small", "small", None, None]


async def test_a_concurrency_slot_is_held_across_processes_until_given_back(procs):
    _, (a, b) = procs()
    m = group({"concurrency": 1})
    small = m.targets[0]
    held, state = await a.attempt(m, hold=True)
    assert held == "small" and ROOM in state
    assert (await b.attempt(m))[0] == "big"  # the slot is A's, cluster-wide
    assert b.router.state(small).full_until == 0  # a slot frees any time: nothing cached
    await a.done(small, state)
    assert ROOM not in state
    assert (await b.attempt(m))[0] == "small"


async def test_tokens_charged_at_the_end_spend_the_deployment_tpm_for_the_others(procs):
    _, (a, b) = procs()
    m = group({"tpm": 10})
    assert (await a.attempt(m, tokens=10))[0] == "small"
    assert (await b.attempt(m))[0] == "big"
    assert b.router.state(m.targets[0]).full_until == (T0 // 60 + 1) * 60


async def test_redis_down_allow_counts_on_this_process_alone(procs, redis):
    _, (a,) = procs(n=1, timeout_ms=200)
    errors = []
    a.hook.count_error = lambda: errors.append(1)
    m = group({"rpm": 2})
    assert (await a.attempt(m))[0] == "small"
    redis.stop()
    # the router's own counts: small had 1 of its 2 here, so one more, then the other deployment
    got = [await a.attempt(m) for _ in range(3)]
    assert [d for d, _ in got] == ["small", "big", "big"]
    assert all(ROOM not in state for _, state in got) and len(errors) == 1  # one request not counted in Redis


async def test_redis_down_deny_skips_the_deployment_and_answers_429_when_none_is_left(procs, redis):
    _, (a,) = procs(n=1, on_store_error="deny", timeout_ms=200)
    await a.attempt(group({"rpm": 100}))  # connected
    redis.stop()
    assert (await a.attempt(group({"rpm": 100})))[0] == "big"
    with pytest.raises(GatewayError) as ei:
        await a.attempt(group({"rpm": 100}, big=False))
    assert ei.value.status == 429 and ei.value.code == "rate_limit_store_unavailable"
