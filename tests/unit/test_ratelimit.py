"""RateLimitHook with a clock the test controls (no sleeps): every limit on key and model, headers
request by request, window edges, live changes, deletions, and slots given back on every way out."""
from __future__ import annotations

import pytest

from aisix.config.resources import ApiKey, Model, hash_key
from aisix.config.snapshot import SnapshotHolder
from aisix.errors import GatewayError
from aisix.hooks.pipeline import Call, Hook, Pipeline
from aisix.hooks.ratelimit import RateLimitHook, charged_tokens, duration
from aisix.telemetry.records import RequestRecord

T0 = 1_799_972_400.0  # a minute boundary (divisible by 60) and 20 minutes after a UTC midnight
assert T0 % 60 == 0 and T0 % 86400 == 1200


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def key(rl: dict | None = None, secret="sk-test", id="key-1", allowed=("m1", "m2")) -> ApiKey:
    return ApiKey(id=id, key_hash=hash_key(secret), allowed_models=list(allowed), rate_limit=rl)


def model(rl: dict | None = None, name="m1", id="model-1") -> Model:
    return Model(id=id, name=name, model="openai/up-1", rate_limit=rl)


class Env:
    """A holder with one key and one model, the hook on it, and helpers to run calls."""

    def __init__(self, key_rl=None, model_rl=None, t=T0):
        self.clock = Clock(t)
        self.holder = SnapshotHolder()
        self.hook = RateLimitHook(self.holder, clock=self.clock)
        self.set(key_rl, model_rl)

    def set(self, key_rl=None, model_rl=None, keys=None, models=None):
        self.holder.swap(models if models is not None else [model(model_rl)],
                         keys if keys is not None else [key(key_rl)])

    def call(self, secret="sk-test", name="m1") -> Call:
        snap = self.holder.current
        rec = RequestRecord("POST", "/v1/chat/completions", "/v1/chat/completions", 0, 0)
        return Call(key=snap.key_for(secret), model=snap.models[name], record=rec)

    def start(self, **kw) -> Call:
        c = self.call(**kw)
        self.hook.pre_call(c)
        return c

    def finish(self, c: Call, tokens: int | None = None) -> None:
        if tokens is not None:
            c.record.set_usage(tokens // 2, tokens - tokens // 2, tokens)
        self.hook.post_call(c)

    def one(self, tokens: int | None = None, **kw) -> Call:
        c = self.start(**kw)
        self.finish(c, tokens)
        return c

    def rejected(self, **kw) -> GatewayError:
        with pytest.raises(GatewayError) as ei:
            self.start(**kw)
        return ei.value


# -- each limit type, on the key and on the model ----------------------------------------------

@pytest.mark.parametrize("on", ["key", "model"])
@pytest.mark.parametrize("field,window", [("rpm", 60), ("rpd", 86400)])
def test_request_limits(on, field, window):
    rl = {field: 3}
    env = Env(rl if on == "key" else None, rl if on == "model" else None)
    for _ in range(3):
        env.one()
    err = env.rejected()
    assert err.status == 429 and err.type == "rate_limit_error" and err.code == "rate_limit_exceeded"
    assert f"({field}): limit 3, used 3" in err.message
    assert ("model `m1`" if on == "model" else "API key `key-1`") in err.message
    assert "sk-test" not in err.message
    assert err.headers["Retry-After"] == str(window if field == "rpm" else window - 1200)
    env.clock.t += window  # the next window
    env.one()


@pytest.mark.parametrize("on", ["key", "model"])
@pytest.mark.parametrize("field,window", [("tpm", 60), ("tpd", 86400)])
def test_token_limits(on, field, window):
    rl = {field: 100}
    env = Env(rl if on == "key" else None, rl if on == "model" else None)
    c = env.one(tokens=60)
    assert c.response_headers["x-ratelimit-remaining-tokens"] == "100"  # nothing used before it
    c = env.one(tokens=60)
    assert c.response_headers["x-ratelimit-remaining-tokens"] == "40"
    err = env.rejected()  # 120 used >= 100: no token left in the window
    assert err.code == "rate_limit_exceeded"
    assert f"({field}): limit 100, used 120" in err.message
    assert err.headers["x-ratelimit-remaining-tokens"] == "0"
    env.clock.t += window
    assert env.one().response_headers["x-ratelimit-remaining-tokens"] == "100"


@pytest.mark.parametrize("on", ["key", "model"])
def test_concurrency_limit(on):
    rl = {"concurrency": 2}
    env = Env(rl if on == "key" else None, rl if on == "model" else None)
    a = env.start()
    assert a.response_headers["x-ratelimit-limit-concurrent"] == "2"
    assert a.response_headers["x-ratelimit-remaining-concurrent"] == "1"
    b = env.start()
    assert b.response_headers["x-ratelimit-remaining-concurrent"] == "0"
    err = env.rejected()
    assert err.code == "concurrency_limit_exceeded" and err.type == "rate_limit_error"
    assert err.headers["Retry-After"] == "1"
    assert err.headers["x-ratelimit-remaining-concurrent"] == "0"
    assert "limit 2 in flight" in err.message
    env.finish(a)
    c = env.start()  # the slot came back; no window involved, so no time has to pass
    assert c.response_headers["x-ratelimit-remaining-concurrent"] == "0"
    env.finish(b)
    env.finish(c)
    counters = env.hook.usage_of_key("key-1") if on == "key" else env.hook.usage_of_model("m1")
    assert counters.in_flight == 0


def test_rejected_request_takes_nothing():
    env = Env({"rpm": 1, "concurrency": 5})
    env.one()
    for _ in range(10):
        env.rejected()
    c = env.hook.usage_of_key("key-1")
    assert (c.req_minute, c.req_day, c.in_flight) == (1, 1, 0)


def test_no_limits_no_headers_no_counters():
    env = Env()
    c = env.one(tokens=10)
    assert c.response_headers == {}
    assert env.hook.keys == {} and env.hook.models == {}


# -- key and model together ------------------------------------------------------------------------

def test_key_and_model_are_independent_and_the_stricter_shows():
    env = Env()
    env.set(keys=[key({"rpm": 5}), key({"rpm": 100}, secret="sk-other", id="key-2")],
            models=[model({"rpm": 3})])
    # the model allows 3/min whoever asks; sk-test's own limit is 5
    seen = []
    for secret in ("sk-test", "sk-other", "sk-test"):
        h = env.one(secret=secret).response_headers
        seen.append((h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]))
    assert seen == [("3", "2"), ("3", "1"), ("3", "0")]
    err = env.rejected(secret="sk-test")
    assert "model `m1`" in err.message and "(rpm): limit 3, used 3" in err.message
    # the key's own count moved only with its own requests: 2 of 5
    assert env.hook.usage_of_key("key-1").req_minute == 2
    assert env.hook.usage_of_key("key-2").req_minute == 1


def test_key_rejects_while_the_model_has_room():
    env = Env({"rpm": 2}, {"rpm": 10})
    assert env.one().response_headers["x-ratelimit-limit-requests"] == "2"
    env.one()
    err = env.rejected()
    assert "API key `key-1`" in err.message
    assert env.hook.usage_of_model("m1").req_minute == 2  # the model took nothing for the rejected one


def test_stricter_of_minute_and_day_with_later_reset_on_a_tie():
    env = Env({"rpm": 10, "rpd": 12}, {"tpm": 1000, "tpd": 50})
    env.clock.t += 5
    env.one()
    env.one()
    h = env.one(tokens=20).response_headers
    # requests: rpm leaves 7, rpd 9 → rpm shows; tokens: tpd leaves 50 of 50, tpm 1000 → tpd shows
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"], h["x-ratelimit-reset-requests"]) \
        == ("10", "7", "55s")
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"], h["x-ratelimit-reset-tokens"]) \
        == ("50", "50", "23h39m55s")
    env.clock.t += 60  # next minute: rpm leaves 9, rpd 8 → rpd shows
    h = env.one().response_headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("12", "8")
    assert h["x-ratelimit-remaining-tokens"] == "30"
    env2 = Env({"rpm": 2, "rpd": 2})
    h = env2.one().response_headers  # both leave 1: the day one (later reset) is the stricter
    assert (h["x-ratelimit-remaining-requests"], h["x-ratelimit-reset-requests"]) == ("1", "23h40m0s")


def test_retry_after_is_the_longest_wait_among_broken_limits():
    env = Env({"rpm": 1, "rpd": 1, "concurrency": 1})
    a = env.start()
    err = env.rejected()  # concurrency (1 s), rpm (60 s) and rpd (day) are all broken
    assert err.headers["Retry-After"] == str(86400 - 1200)
    assert "(rpd)" in err.message and err.code == "rate_limit_exceeded"
    env.finish(a)


def test_headers_request_by_request_across_a_window_boundary():
    env = Env({"rpm": 3, "tpm": 100, "concurrency": 2}, t=T0 + 55.2)
    rows = []
    for tokens in (10, 20, 30):
        h = env.one(tokens=tokens).response_headers
        rows.append(tuple(h[n] for n in ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                                         "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
                                         "x-ratelimit-remaining-concurrent")))
        env.clock.t += 1
    assert rows == [("2", "5s", "100", "5s", "1"), ("1", "4s", "90", "4s", "1"), ("0", "3s", "70", "3s", "1")]
    env.clock.t = T0 + 59.999
    err = env.rejected()
    assert err.headers["Retry-After"] == "1" and err.headers["x-ratelimit-reset-requests"] == "1s"
    env.clock.t = T0 + 60.0  # exactly on the edge: a new window, a full minute to its reset
    h = env.one().response_headers
    assert (h["x-ratelimit-remaining-requests"], h["x-ratelimit-reset-requests"]) == ("2", "1m0s")
    assert h["x-ratelimit-remaining-tokens"] == "100"


def test_day_window_resets_at_utc_midnight():
    day_end = T0 - 1200 + 86400
    env = Env({"rpd": 2}, t=day_end - 0.5)
    env.one()
    h = env.one().response_headers
    assert (h["x-ratelimit-remaining-requests"], h["x-ratelimit-reset-requests"]) == ("0", "1s")
    assert env.rejected().headers["Retry-After"] == "1"
    env.clock.t = day_end
    assert env.one().response_headers["x-ratelimit-reset-requests"] == "24h0m0s"


def test_clock_going_back_keeps_counts():
    env = Env({"rpm": 2}, t=T0 + 30)
    env.one()
    env.one()
    env.clock.t = T0 - 10  # an NTP step back into the previous minute
    env.rejected()


def test_tokens_charged_in_the_window_current_at_the_end():
    env = Env({"tpm": 100}, t=T0 + 59)
    c = env.start()
    env.clock.t = T0 + 61
    env.finish(c, tokens=70)
    assert env.one().response_headers["x-ratelimit-remaining-tokens"] == "30"


# -- what a call is charged ------------------------------------------------------------------------

def test_charged_tokens_from_usage_estimate_or_nothing():
    env = Env()
    c = env.call()
    assert charged_tokens(c) == 0  # no usage, no output (an upstream error before any byte)
    c.request_bytes = 401
    assert charged_tokens(c) == 0
    c.estimated_completion_tokens = 7  # a stream that ended without usage
    assert charged_tokens(c) == 7 + 101  # ceil(401 / 4)
    c.record.prompt_tokens, c.record.completion_tokens = 40, None
    assert charged_tokens(c) == 40
    c.record.set_usage(40, 30, 70)
    assert charged_tokens(c) == 70


def test_stream_without_usage_is_charged_the_estimate():
    env = Env({"tpm": 1000})
    c = env.start()
    c.request_bytes = 100
    c.estimated_completion_tokens = 12
    env.finish(c)
    assert env.hook.usage_of_key("key-1").tok_minute == 12 + 25


# -- live configuration ------------------------------------------------------------------------

def test_limit_change_applies_from_the_next_request_and_keeps_counts():
    env = Env({"rpm": 5, "concurrency": 3})
    held = env.start()
    env.one()
    env.one()
    env.set({"rpm": 4, "concurrency": 1})
    assert env.hook.usage_of_key("key-1").req_minute == 3
    err = env.rejected()  # 1 in flight already fills the new concurrency of 1
    assert err.code == "concurrency_limit_exceeded"
    env.finish(held)
    h = env.one().response_headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("4", "0")
    assert env.rejected().code == "rate_limit_exceeded"
    env.set({"rpm": 10})  # raised: room again, same counts
    assert env.one().response_headers["x-ratelimit-remaining-requests"] == "5"
    env.set(None)  # limit removed: no headers, counts still kept for when it comes back
    assert env.one().response_headers == {}
    env.set({"rpm": 10})
    assert env.one().response_headers["x-ratelimit-remaining-requests"] == "4"


def test_counts_follow_the_key_id_through_new_limits_models_and_secret():
    """Counters are keyed by the key's id, not its secret: a key whose limits, allowed models and
    even secret change (an Admin API replace) keeps counting where it was."""
    env = Env({"rpm": 5, "tpm": 100})
    env.one(tokens=30)
    env.one(tokens=30)
    env.set(keys=[key({"rpm": 4, "tpm": 90}, secret="sk-rotated", allowed=("m1",))])
    h = env.one(secret="sk-rotated", tokens=10).response_headers
    assert h["x-ratelimit-remaining-requests"] == "1" and h["x-ratelimit-remaining-tokens"] == "30"
    assert env.hook.usage_of_key("key-1").req_minute == 3 and env.hook.usage_of_key("key-1").tok_minute == 70
    assert list(env.hook.keys) == ["key-1"]  # no counters under a secret or a hash


def test_deletion_drops_counts():
    env = Env({"rpm": 2}, {"tpm": 50})
    env.one(tokens=30)
    env.one(tokens=30)
    assert env.rejected().code == "rate_limit_exceeded"
    env.set(keys=[], models=[])  # both deleted
    assert env.hook.keys == {} and env.hook.models == {}
    env.set({"rpm": 2}, {"tpm": 50})  # created again with the same secret and name
    h = env.one().response_headers
    assert h["x-ratelimit-remaining-requests"] == "1" and h["x-ratelimit-remaining-tokens"] == "50"


def test_recreated_under_a_new_id_in_one_swap_starts_fresh():
    env = Env({"rpm": 2})
    env.one()
    env.one()
    env.set(keys=[key({"rpm": 2}, id="key-NEW")])
    assert env.hook.usage_of_key("key-1") is None
    assert "API key `key-NEW`" in (env.one(), env.one(), env.rejected())[2].message


def test_in_flight_call_of_a_deleted_key_releases_harmlessly():
    env = Env({"concurrency": 1})
    a = env.start()
    env.set(keys=[])
    env.set({"concurrency": 1})
    b = env.start()  # fresh counters: a's slot went with the deleted key
    env.finish(a, tokens=10)  # releases into the dropped counters
    assert env.hook.usage_of_key("key-1").in_flight == 1
    env.finish(b)
    assert env.hook.usage_of_key("key-1").in_flight == 0


def test_post_call_runs_once_only():
    env = Env({"concurrency": 1})
    c = env.start()
    env.finish(c)
    env.finish(c)
    assert env.hook.usage_of_key("key-1").in_flight == 0


# -- slots come back on every way out ------------------------------------------------------------------

class Flaky(Hook):
    """A hook after the limiter that rejects every third call."""

    def __init__(self):
        self.n = 0

    def pre_call(self, call):
        self.n += 1
        if self.n % 3 == 0:
            raise GatewayError(400, "nope")


async def test_thousand_cycles_with_errors_leave_concurrency_at_zero():
    env = Env({"concurrency": 1, "tpm": 10**9}, {"concurrency": 1})
    pipeline = Pipeline([env.hook, Flaky()])
    outcomes = {"ok": 0, "hook": 0, "upstream": 0, "cancel": 0}

    def provider(i, call):
        if i % 5 == 1:
            raise ConnectionResetError("upstream went away")
        if i % 5 == 2:
            raise KeyboardInterrupt  # any BaseException, e.g. a cancellation
        call.record.set_usage(1, 1, 2)

    for i in range(1000):
        call = env.call()
        try:
            passed = await pipeline.pre_call(call)
        except GatewayError as e:
            assert e.status == 400, e.message  # never a 429: every earlier slot came back
            outcomes["hook"] += 1
            continue
        try:
            provider(i, call)
            outcomes["ok"] += 1
        except ConnectionResetError:
            outcomes["upstream"] += 1
        except KeyboardInterrupt:
            outcomes["cancel"] += 1
        finally:
            pipeline.post_call(call, passed)
    assert all(outcomes.values()), outcomes
    assert env.hook.usage_of_key("key-1").in_flight == 0
    assert env.hook.usage_of_model("m1").in_flight == 0
    assert env.hook.usage_of_key("key-1").tok_minute == 2 * outcomes["ok"]


def test_duration_format():
    assert [duration(s) for s in (0.01, 1, 54.2, 55, 60, 61, 3600, 86399.5)] == \
        ["1s", "1s", "55s", "55s", "1m0s", "1m1s", "1h0m0s", "24h0m0s"]


# -- fallbacks: the fallback model's own limits, the key counted once ------------------------------
FALLBACK_LIMITS = {"rpm": 10, "tpm": 1000}, {"tpm": 50}, {"rpm": 2, "tpm": 30, "concurrency": 1}


def fallback_holder(key_rl, asked_rl, fallback_rl) -> SnapshotHolder:
    """Key ``sk-test`` on m1; m1 falls back to m2; each with the limits given."""
    holder = SnapshotHolder()
    holder.swap([Model(id="model-1", name="m1", model="openai/up-1", rate_limit=asked_rl, fallbacks=["m2"]),
                 Model(id="model-2", name="m2", model="openai/up-2", rate_limit=fallback_rl)], [key(key_rl)])
    return holder


async def fallback_script(hook, holder: SnapshotHolder, settle=None) -> list:
    """Requests to m1 that all move on to m2 (as route() drives the pipeline); what each step got."""
    from aisix.telemetry.records import Attempt
    pipeline, snap, out = Pipeline([hook]), holder.current, []
    m2 = snap.models["m2"]

    async def start() -> Call:
        c = Call(key=snap.key_for("sk-test"), model=snap.models["m1"],
                 record=RequestRecord("POST", "/v1/chat/completions", "/v1/chat/completions", 0, 0))
        await pipeline.pre_call(c)
        return c

    async def enter(c: Call) -> bool:
        try:
            await pipeline.enter_fallback(c, m2)
        except GatewayError as e:
            out.append((e.status, e.code, e.message, e.headers.get("Retry-After")))
            return False
        out.append("m2 entered")
        return True

    def served(c: Call, tokens: int) -> None:  # the attempt on m2 answered with this usage
        c.attempt = Attempt("m2", "default", "openai", "up-2", "", 1, 0)
        c.record.set_usage(tokens // 2, tokens - tokens // 2, tokens)
        pipeline.leave_fallback(c, m2)

    first, second = await start(), await start()
    assert await enter(first)
    assert not await enter(second)  # m2: 1 in flight of 1
    served(first, 20)
    pipeline.post_call(first, 1)
    pipeline.post_call(second, 1)
    for tokens in (20, None):  # the 2nd request of m2's minute, then its rpm and tpm are spent
        if settle is not None:
            await settle(hook)
        c = await start()
        if await enter(c):
            served(c, tokens)
        pipeline.post_call(c, 1)
    if settle is not None:
        await settle(hook)
    last = await start()  # m1 asked directly: it was not charged m2's tokens (50 left), the key was (960)
    out.append({k: v for k, v in last.response_headers.items() if "remaining" in k})
    pipeline.post_call(last, 1)
    return out


async def test_a_fallback_is_held_to_its_own_limits_and_the_key_counted_once():
    holder = fallback_holder(*FALLBACK_LIMITS)
    hook = RateLimitHook(holder, clock=Clock(T0 + 1))
    out = await fallback_script(hook, holder)
    assert out[0] == "m2 entered" and out[2] == "m2 entered"
    assert out[1][:2] == (429, "concurrency_limit_exceeded") and "model `m2`" in out[1][2]
    assert out[3][:2] == (429, "rate_limit_exceeded") and "model `m2`" in out[3][2] and out[3][3] == "59"
    assert out[4] == {"x-ratelimit-remaining-requests": "5", "x-ratelimit-remaining-tokens": "50"}
    m1, m2, k = hook.usage_of_model("m1"), hook.usage_of_model("m2"), hook.usage_of_key("key-1")
    assert (k.req_minute, k.tok_minute, k.in_flight) == (5, 40, 0)  # five requests, each counted once
    assert (m2.req_minute, m2.tok_minute, m2.in_flight) == (2, 40, 0)  # two entered, both served
    assert (m1.req_minute, m1.tok_minute, m1.in_flight) == (5, 0, 0)
