"""RedisRateLimitHook against a real redis-server: the same answers as the local counters, one
count for several processes (two hooks on one Redis stand for two), leases that expire and are
renewed, no secret in Redis, and Redis going away and coming back (allow and deny).

Windows and leases follow a clock the test controls (passed to Redis in place of ``TIME``), except
where renewal itself is under test."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest

from aisix.config.loader import RateLimitStoreConfig
from aisix.config.resources import hash_key
from aisix.config.snapshot import SnapshotHolder
from aisix.errors import GatewayError
from aisix.hooks.pipeline import Call
from aisix.hooks.ratelimit import RateLimitHook
from aisix.hooks.ratelimit_redis import RedisRateLimitHook, redacted
from aisix.telemetry.records import RequestRecord
from tests.unit.test_ratelimit import Clock, key, model

#: A minute boundary 20 minutes after a UTC midnight, as tests/unit/test_ratelimit.py's T0, but in the
#: future: Redis expires keys by its own clock, so a test clock in the past would expire them at once.
T0 = (time.time() // 86400 + 1) * 86400 + 1200


class Node:
    """One process's limiter (local or Redis) on a holder with one key and one model."""

    def __init__(self, hook, holder: SnapshotHolder):
        self.hook, self.holder = hook, holder

    def call(self, secret="sk-test", name="m1") -> Call:
        snap = self.holder.current
        rec = RequestRecord("POST", "/v1/chat/completions", "/v1/chat/completions", 0, 0)
        return Call(key=snap.keys[hash_key(secret)], model=snap.models[name], record=rec)

    async def start(self, **kw) -> Call:
        c = self.call(**kw)
        pending = self.hook.pre_call(c)
        if pending is not None:
            await pending
        return c

    async def finish(self, c: Call, tokens: int | None = None) -> None:
        if tokens is not None:
            c.record.set_usage(tokens // 2, tokens - tokens // 2, tokens)
        self.hook.post_call(c)
        await settle(self.hook)

    async def one(self, tokens: int | None = None, **kw) -> Call:
        c = await self.start(**kw)
        await self.finish(c, tokens)
        return c

    async def rejected(self, **kw) -> GatewayError:
        with pytest.raises(GatewayError) as ei:
            await self.start(**kw)
        return ei.value


async def settle(hook) -> None:
    """Wait until the hook's queued releases reached Redis."""
    for _ in range(200):
        if not isinstance(hook, RedisRateLimitHook) or not (
                hook._releases or hook._admissions or hook.syncing or hook._sender or hook._release_timer):
            return
        await asyncio.sleep(0.002)
    raise AssertionError("releases never sent")


def store_cfg(redis, **kw) -> RateLimitStoreConfig:
    return RateLimitStoreConfig(kind="redis", url=redis.url, **kw)


@pytest.fixture
async def cluster(redis):
    """``make(key_rl, model_rl)`` → (holder, clock, [node, ...]) with ``n`` Redis hooks on one holder."""
    made = []

    def make(key_rl=None, model_rl=None, n=2, t=T0, clock=True, **cfg):
        holder = SnapshotHolder()
        holder.swap([model(model_rl)], [key(key_rl)])
        clk = Clock(t) if clock else None
        nodes = [Node(RedisRateLimitHook(store_cfg(redis, **cfg), holder, clock=clk), holder) for _ in range(n)]
        made.extend(nodes)
        return holder, clk, nodes

    yield make
    for node in made:
        await node.hook.aclose()


# -- the same answers as the local counters --------------------------------------------------------

async def _script(node: Node, holder: SnapshotHolder, clock: Clock) -> list:
    """A run over every limit kind, window edges and a live limit change; what each step answered."""
    out = []

    async def step(tokens=None, hold=False):
        try:
            c = await node.start()
        except GatewayError as e:
            out.append((e.status, e.code, e.message, sorted(e.headers.items())))
            return None
        out.append((200, sorted(c.response_headers.items())))
        if not hold:
            await node.finish(c, tokens)
        return c

    clock.t = T0 + 55.2
    for tokens in (10, 20, 30, None):  # the 4th breaks rpm
        await step(tokens)
        clock.t += 1
    clock.t = T0 + 60  # next minute: requests and tokens of the minute back to zero
    held = [await step(hold=True), await step(hold=True)]
    await step()  # concurrency 2 reached
    for c in held:
        await node.finish(c, tokens=5)
    await step(tokens=200)
    clock.t = T0 + 61
    await step()  # rpm and tpm both spent
    clock.t = T0 + 120
    holder.swap([model({"rpd": 4})], [key({"rpm": 3, "tpm": 1000, "concurrency": 1})])  # a live change
    await step()  # the model's day already has 6 requests
    clock.t = T0 + 86400 - 1200 - 0.5  # just before UTC midnight
    await step()
    clock.t = T0 + 86400 - 1200
    await step(tokens=1)
    await step(tokens=1)
    return out


async def test_same_answers_and_headers_as_the_local_counters(cluster):
    limits = {"rpm": 3, "tpm": 100, "concurrency": 2}, {"rpd": 20, "tpd": 500}
    holder, clock, (node, _) = cluster(*limits)
    shared = await _script(node, holder, clock)
    local_holder = SnapshotHolder()
    local_holder.swap([model(limits[1])], [key(limits[0])])
    local_clock = Clock(T0)
    local = await _script(Node(RateLimitHook(local_holder, clock=local_clock), local_holder), local_holder,
                          local_clock)
    assert shared == local
    assert [s[0] for s in shared].count(429) >= 5  # every kind of refusal took part


# -- one count for several processes ------------------------------------------------------------------

async def test_two_processes_share_every_count(cluster):
    _, clock, (a, b) = cluster({"rpm": 5, "tpm": 100}, {"concurrency": 3})
    seen = []
    for node in (a, b, a, b, a):
        h = (await node.one(tokens=10)).response_headers
        seen.append(h["x-ratelimit-remaining-requests"])
    assert seen == ["4", "3", "2", "1", "0"]
    err = await b.rejected()
    assert "(rpm): limit 5, used 5" in err.message and err.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.headers["x-ratelimit-remaining-tokens"] == "50"  # 5 x 10 tokens, charged by both
    clock.t += 60
    held = [await a.start(), await b.start(), await a.start()]
    assert held[-1].response_headers["x-ratelimit-remaining-concurrent"] == "0"
    err = await b.rejected()
    assert err.code == "concurrency_limit_exceeded" and "model `m1`" in err.message
    assert err.headers["x-ratelimit-remaining-concurrent"] == "0"
    await a.finish(held[0])  # a slot given back on A is free on B
    assert (await b.start()).response_headers["x-ratelimit-remaining-concurrent"] == "0"


async def test_exactly_the_limit_admitted_under_concurrent_load(cluster):
    _, _, nodes = cluster({"rpm": 50}, n=4)

    async def attempt(node):
        try:
            await node.one()
            return True
        except GatewayError as e:
            assert e.code == "rate_limit_exceeded"
            return False

    results = await asyncio.gather(*(attempt(nodes[i % 4]) for i in range(300)))
    assert sum(results) == 50


# -- leases ------------------------------------------------------------------------------------------

async def test_slots_of_a_process_that_died_free_after_the_lease_ttl(cluster):
    _, clock, (a, b) = cluster({"concurrency": 2}, lease_ttl_ms=3000)
    await a.start()
    await a.start()
    a.hook.leases.clear()  # A dies: never renews, never gives back
    assert (await b.rejected()).code == "concurrency_limit_exceeded"
    clock.t += 2.9
    assert (await b.rejected()).code == "concurrency_limit_exceeded"
    clock.t += 0.2  # 3.1 s after A's last word
    c = await b.start()
    assert c.response_headers["x-ratelimit-remaining-concurrent"] == "1"


async def test_a_running_request_keeps_its_slot_past_the_ttl_by_renewal(cluster):
    _, _, (a, b) = cluster({"concurrency": 1}, lease_ttl_ms=300, clock=False)  # Redis TIME
    c = await a.start()
    await asyncio.sleep(1.0)  # over 3 TTLs: renewed every 100 ms
    assert (await b.rejected()).code == "concurrency_limit_exceeded"
    await a.finish(c)
    await b.one()


async def test_a_slot_held_by_a_cancelled_admission_is_given_back(cluster, redis):
    _, _, (a, b) = cluster({"concurrency": 1})
    task = asyncio.ensure_future(a.start())
    await asyncio.sleep(0)  # the script is on its way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle(a.hook)
    await b.one()  # the slot is free (given back or never taken)


# -- what lands in Redis ---------------------------------------------------------------------------

async def test_no_secret_in_redis_and_keys_expire_with_their_windows(cluster, redis):
    _, _, (a, _) = cluster({"rpm": 5, "tpd": 100, "concurrency": 1}, key_prefix="gw1:", clock=False)
    await a.one(tokens=10)
    listing = redis.command("KEYS", "*")
    assert b"sk-test" not in listing and b"gw1:rl:key:" in listing and b"gw1:rl:model:" not in listing
    names = [line for line in listing.split(b"\r\n") if line.startswith(b"gw1:")]
    assert len(names) == 4  # rm, rd, tm, td (the lease set is gone with its last member)
    for name in names:
        ttl = int(redis.command("PTTL", name.decode()).strip(b":\r\n"))
        assert 0 < ttl <= (120 if b":rm:" in name or b":tm:" in name else 86400 + 60) * 1000 + 10_000


async def test_a_recreated_key_starts_from_zero_and_a_changed_one_keeps_its_counts(cluster):
    holder, _, (a, b) = cluster({"rpm": 2})
    await a.one()
    holder.swap([model()], [key({"rpm": 3})])  # limits changed: same id, same counts
    assert (await b.one()).response_headers["x-ratelimit-remaining-requests"] == "1"
    holder.swap([model()], [key({"rpm": 3}, id="key-NEW")])  # deleted and created again
    assert (await b.one()).response_headers["x-ratelimit-remaining-requests"] == "2"


def test_passwords_are_kept_out_of_logs():
    assert redacted("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redacted("redis://user:s3cret@h:1/0") == "redis://user:***@h:1/0"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# -- Redis unreachable -------------------------------------------------------------------------------

async def _wait_shared(hook, timeout=5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if hook.shared:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("never shared again")


async def test_allow_counts_locally_logs_once_and_shares_again_when_redis_returns(cluster, redis, caplog):
    _, _, (a, b) = cluster({"rpm": 3})
    errors = []
    a.hook.count_error = lambda: errors.append(1)
    await a.one()
    await b.one()
    redis.stop()
    caplog.set_level(logging.WARNING, "aisix.ratelimit")
    # A now counts alone, from its own zero: 3 more, then its own limit
    assert [(await a.one()).response_headers["x-ratelimit-remaining-requests"] for _ in range(3)] == ["2", "1", "0"]
    assert (await a.rejected()).code == "rate_limit_exceeded"
    assert not a.hook.shared and len(errors) == 4
    lost = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(lost) == 1 and redis.url in lost[0].getMessage() and "counting on each process" in lost[0].getMessage()
    redis.start()  # comes back empty (no persistence)
    await _wait_shared(a.hook)
    await _wait_shared(b.hook)
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert (await a.one()).response_headers["x-ratelimit-remaining-requests"] == "2"
    assert (await b.one()).response_headers["x-ratelimit-remaining-requests"] == "1"  # shared again
    assert len(errors) == 4


async def test_deny_answers_429_while_redis_is_down(cluster, redis):
    _, _, (a,) = cluster({"rpm": 100}, n=1, on_store_error="deny", timeout_ms=200)
    await a.one()
    redis.stop()
    for _ in range(2):
        err = await a.rejected()
        assert err.status == 429 and err.type == "rate_limit_error" and err.code == "rate_limit_store_unavailable"
        assert "rate-limit store (Redis) is unreachable" in err.message and redis.url not in err.message
        assert err.headers["Retry-After"] == "1"
    unlimited = a.call()
    unlimited.key = unlimited.key.model_copy(update={"rate_limit": None})
    assert a.hook.pre_call(unlimited) is None  # a request without limits needs no store
    redis.start()
    await _wait_shared(a.hook)
    assert (await a.one()).response_headers["x-ratelimit-remaining-requests"] == "99"


async def test_a_fallbacks_own_limits_give_the_same_answers_in_redis(redis):
    """The fallback script of the local hook's tests (m1 falls back to m2, which has rpm, tpm and
    concurrency limits of its own) answers the same, step by step, counted in a real Redis."""
    from tests.unit.test_ratelimit import FALLBACK_LIMITS, T0, fallback_holder, fallback_script
    holder = fallback_holder(*FALLBACK_LIMITS)
    hook = RedisRateLimitHook(store_cfg(redis), holder, clock=Clock(T0 + 1))
    try:
        shared = await fallback_script(hook, holder, settle)
    finally:
        await hook.aclose()
    local_holder = fallback_holder(*FALLBACK_LIMITS)
    local = await fallback_script(RateLimitHook(local_holder, clock=Clock(T0 + 1)), local_holder)
    assert shared == local and shared.count("m2 entered") == 2


# -- Redis that answers with errors; shutting down while it is gone -------------------------------------

async def _lease_key(node: Node, redis) -> str:
    """The Redis key of the lease set of the node's key (seen while a request holds a lease)."""
    held = await node.start()
    (name,) = [k for k in redis.command("KEYS", "aisix:rl:key:*:c").decode().split("\r\n") if k.endswith(":c")]
    await node.finish(held)
    return name


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_a_counter_redis_cannot_read_fails_its_own_requests_only(cluster, redis, caplog, policy):
    """Found by attacking a gateway: one key's lease set overwritten with a string (WRONGTYPE in the
    script) failed every admission batched with it, and each failure was taken for an outage
    (logged, then 'reachable again' 0.5 s later, over and over). Now that key's requests are handled
    as with Redis unreachable (``on_store_error``), every other key goes on being counted in Redis,
    and one line is logged."""
    holder, _, (a, b) = cluster({"rpm": 100, "concurrency": 5}, on_store_error=policy)
    holder.swap([model()], [key({"rpm": 100, "concurrency": 5}), key({"rpm": 100}, secret="sk-two", id="key-2")])
    errors = []
    a.hook.count_error = lambda: errors.append(1)
    poisoned = await _lease_key(a, redis)
    assert redis.command("SET", poisoned, "not-a-sorted-set") == b"+OK\r\n"
    caplog.set_level(logging.WARNING, "aisix.ratelimit")
    for n in range(3):
        bad, good = await asyncio.gather(a.start(), a.start(secret="sk-two"), return_exceptions=True)
        if policy == "deny":
            assert isinstance(bad, GatewayError) and bad.code == "rate_limit_store_unavailable"
        else:
            assert isinstance(bad, Call) and bad.response_headers["x-ratelimit-remaining-requests"] == str(99 - n)
        assert good.response_headers["x-ratelimit-remaining-requests"] == str(99 - 2 * n)
        # counted in Redis: the other node sees it
        assert (await b.start(secret="sk-two")).response_headers["x-ratelimit-remaining-requests"] == str(98 - 2 * n)
    assert len(errors) == 3 and a.hook.shared
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "refused to count" in lines[0] and "WRONGTYPE" in lines[0], lines


async def test_writes_refused_under_maxmemory_are_not_an_outage(cluster, redis, caplog):
    _, _, (a,) = cluster({"rpm": 100}, n=1)
    errors = []
    a.hook.count_error = lambda: errors.append(1)
    await a.one()
    caplog.set_level(logging.WARNING, "aisix.ratelimit")
    assert redis.command("CONFIG", "SET", "maxmemory", "1") == b"+OK\r\n"
    try:
        for _ in range(4):  # counted on the process's own counters, Redis still asked each time
            await a.one()
        assert len(errors) == 4 and a.hook.shared
    finally:
        redis.command("CONFIG", "SET", "maxmemory", "0")
    assert (await a.one()).response_headers["x-ratelimit-remaining-requests"] == "98"  # Redis counts again
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "refused to count: OOM" in lines[0], lines  # no outage, no 'reachable again'


@pytest.mark.parametrize("how", ["killed", "stopped"])
async def test_closing_does_not_wait_for_a_redis_that_went_away(cluster, redis, how):
    """Found by attacking a gateway: SIGTERM while Redis was gone, with a request's lease still to
    give back, waited until Redis came back (the last release's failure started a probe that
    shutdown then waited for). Closing takes at most about one ``timeout_ms`` now."""
    import os
    import signal
    _, _, (a,) = cluster({"concurrency": 5}, n=1, timeout_ms=300)
    held = await a.start()
    if how == "killed":
        redis.stop()
    else:
        os.kill(redis.pid, signal.SIGSTOP)
    try:
        a.hook.post_call(held)
        await asyncio.wait_for(a.hook.aclose(), 5)
    finally:
        if how == "stopped":
            os.kill(redis.pid, signal.SIGCONT)


async def test_counters_that_are_not_integers_fail_their_requests_only(cluster, redis, caplog):
    """Found by attacking a gateway: a model's day counter set to text let the key's part of the
    take be written before the model's failed (the key's lease was never given back: its
    concurrency was spent for lease_ttl_ms); a counter holding 'inf' came back as a huge negative
    count and the request ended in a 500. Both are now failures of that request's counters: it
    follows on_store_error, nothing is left taken, other entities go on being counted."""
    holder, _, (a,) = cluster({"concurrency": 2}, {"rpm": 100}, n=1)
    await a.one()
    (rd,) = [k for k in redis.command("KEYS", "aisix:rl:model:*:rd:*").decode().split("\r\n") if ":rd:" in k]
    assert redis.command("SET", rd, "not-a-number") == b"+OK\r\n"
    caplog.set_level(logging.WARNING, "aisix.ratelimit")
    for _ in range(4):  # over the key's concurrency of 2 if leases leaked
        await a.one()
    assert [k for k in redis.command("KEYS", "aisix:rl:key:*:c").decode().split("\r\n") if k.endswith(":c")] == []
    assert redis.command("DEL", rd) == b":1\r\n"
    (rm,) = [k for k in redis.command("KEYS", "aisix:rl:key:*:rm:*").decode().split("\r\n") if ":rm:" in k]
    assert redis.command("SET", rm, "inf") == b"+OK\r\n"
    c = await a.one()  # counted locally (allow), not a 500
    assert c.response_headers["x-ratelimit-limit-requests"] == "100"
    assert a.hook.shared
    assert all("refused to count" in r.getMessage() for r in caplog.records)


async def test_lease_renewals_refused_under_maxmemory_are_not_an_outage(cluster, redis, caplog):
    _, _, (a,) = cluster({"concurrency": 5}, n=1, clock=False, lease_ttl_ms=300)
    held = await a.start()
    caplog.set_level(logging.WARNING, "aisix.ratelimit")
    assert redis.command("CONFIG", "SET", "maxmemory", "1") == b"+OK\r\n"
    try:
        await asyncio.sleep(0.5)  # several renewals, each refused
        assert a.hook.shared
    finally:
        redis.command("CONFIG", "SET", "maxmemory", "0")
    await a.finish(held)
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all("refused to count" in line for line in lines) and len(lines) == 1, lines
