"""aisix.proxy.routing.Router, sans IO: strategies and weights, tried deployments skipped,
cooldown and its fallback to the least recently failed, capacity, failure kinds and retry hints.
Through real gateways: :mod:`tests.e2e.test_routing_gateway`."""
from __future__ import annotations

import random

import pytest

from aisix.config.resources import Model
from aisix.errors import GatewayError, upstream_unreachable
from aisix.proxy.routing import Router, failure_kind, retryable

DONE = b"data: [DONE]\n\n"
JSON = {"Content-Type": "application/json"}


def group(strategy="weighted", weights=(1, 1), **routing) -> Model:
    return Model(name="g", deployments=[{"id": f"d{i}", "model": "openai/x", "weight": w}
                                        for i, w in enumerate(weights)],
                 routing={"strategy": strategy, **routing})


def failure(status: int | None, upstream_status: int | None, headers=None) -> GatewayError:
    e = GatewayError(status or 502, "x", "api_error", None, headers)
    e.upstream_status = upstream_status
    return e


# -- Router, sans IO ----------------------------------------------------------------------------
def test_weights_hold_over_a_thousand_choices():
    m, r = group(weights=(3, 1)), Router(random.Random(1))
    picks = [r.choose(m, set(), 0).deployment_id for _ in range(1000)]
    assert abs(picks.count("d0") / 1000 - 0.75) < 0.04


def test_round_robin_least_busy_and_lowest_latency():
    r = Router()
    m = group("round_robin", (1, 1, 1))
    assert [r.choose(m, set(), 0).deployment_id for _ in range(6)] == ["d0", "d1", "d2"] * 2
    m = group("least_busy")
    r.started(m.targets[0])
    assert r.choose(m, set(), 0).deployment_id == "d1"
    r.started(m.targets[1])
    r.started(m.targets[1])
    assert r.choose(m, set(), 0).deployment_id == "d0"
    m = group("lowest_latency")
    r.succeeded(m.targets[0], 50)
    r.succeeded(m.targets[1], 10)
    assert r.choose(m, set(), 0).deployment_id == "d1"
    for _ in range(10):
        r.succeeded(m.targets[1], 200)  # the moving average follows
    assert r.choose(m, set(), 0).deployment_id == "d0"


def test_tried_deployments_are_skipped_until_all_were_tried():
    m, r = group(weights=(1, 1)), Router()
    assert r.choose(m, {"d0"}, 0).deployment_id == "d1"
    assert r.choose(m, {"d0", "d1"}, 0).deployment_id in ("d0", "d1")


def test_cooldown_after_allowed_fails_and_after_a_429_retry_after():
    m, r = group(allowed_fails=2, cooldown_ms=10_000), Router()
    d0 = m.targets[0]
    r.failed(d0, failure(500, 500), 100.0)
    assert r.state(d0).cooldown_until == 0  # one failure of two allowed
    r.failed(d0, failure(500, 500), 101.0)
    assert r.state(d0).cooldown_until == 111.0
    assert all(r.choose(m, set(), 105.0).deployment_id == "d1" for _ in range(50))
    assert any(r.choose(m, set(), 112.0).deployment_id == "d0" for _ in range(50))
    d1 = m.targets[1]
    r.failed(d1, failure(429, 429, {"Retry-After": "2"}), 200.0)
    assert r.state(d1).cooldown_until == 202.0
    r.failed(d0, failure(400, 400), 200.0)  # the request's fault: not the deployment's
    r.failed(d0, failure(404, 404), 200.0)
    assert r.state(d0).cooldown_until == 111.0 and len(r.state(d0).fails) == 0


def test_all_cooling_down_tries_the_one_whose_cooldown_ends_first():
    m, r = group(allowed_fails=1, cooldown_ms=10_000), Router()
    r.failed(m.targets[0], failure(500, 500), 100.0)
    r.failed(m.targets[1], failure(500, 500), 95.0)
    assert r.choose(m, set(), 101.0).deployment_id == "d1"


def test_what_is_retried():
    m = group()
    assert failure_kind(upstream_unreachable("refused")) == "connect_error"
    assert failure_kind(failure(504, None)) == "timeout"
    assert failure_kind(failure(429, 200)) == 429  # an error event in a stream that answered 200
    assert [retryable(failure(s, s), m) for s in (429, 500, 502, 503, 504)] == [True] * 5
    assert [retryable(failure(s, s), m) for s in (400, 401, 403, 404, 413, 422)] == [False] * 6
    m2 = group(retry_on=[400, "timeout"])
    assert not retryable(failure(400, 400), m2) and not retryable(upstream_unreachable("x"), m2)
    assert retryable(failure(504, None), m2)


def test_one_upstream_models_keep_no_gateway_retries_unless_routing_is_given():
    assert Model(name="a", model="openai/x").retries == 0
    assert Model(name="a", model="openai/x", routing={"retries": 1}).retries == 1
    assert group().retries == 2


def test_config_shape_is_validated():
    with pytest.raises(ValueError, match="unique"):
        Model(name="g", deployments=[{"id": "a", "model": "openai/x"}, {"id": "a", "model": "openai/y"}])
    with pytest.raises(ValueError, match="not both"):
        Model(name="g", model="openai/x", deployments=[{"id": "a", "model": "openai/x"}])
    with pytest.raises(ValueError, match="Field required"):
        Model(name="g")
    m = Model(name="g", deployments=[{"id": "a", "model": "anthropic/c", "provider_config": {"api_key": "k"}}])
    assert (m.targets[0].provider, m.targets[0].model_id, m.targets[0].provider_config.api_key) == ("anthropic", "c", "k")
    assert Model.model_validate(m.model_dump(mode="json", exclude_unset=True)).targets[0].deployment_id == "a"


def test_a_deployment_without_room_under_its_own_rate_limit_is_skipped():
    m = Model(name="g", deployments=[{"id": "small", "model": "openai/x", "rate_limit": {"rpm": 2, "tpm": 100}},
                                     {"id": "big", "model": "openai/x", "rate_limit": {"concurrency": 1}}],
              routing={"strategy": "round_robin"})
    r, wall = Router(), 6000.0  # a minute boundary
    small, big = m.targets
    r.started(small, wall)
    r.finished(small)
    r.started(small, wall + 1)
    r.finished(small)
    assert all(r.choose(m, set(), 0, wall + 2) is big for _ in range(4))  # small used its 2 requests
    r.started(big, wall + 2)
    assert r.choose(m, set(), 0, wall + 3) is None  # big: 1 in flight of 1; small: full
    assert r.choose(m, set(), 0, wall + 60) is small  # a new minute: small has room again
    r.finished(big)
    r.charge(small, 100, wall + 61)
    assert r.choose(m, {"big"}, 0, wall + 62) is big  # small spent its tpm
    assert r.health([m], 0)[0]["in_flight"] == 0


def fb(name: str, *fallbacks: str) -> Model:
    return Model(name=name, model="openai/x", fallbacks=list(fallbacks))


def test_fallbacks_must_name_other_configured_models_and_close_no_cycle():
    from aisix.config.resources import fallback_problems
    others = {m.name: m for m in (fb("b", "c"), fb("c"), fb("d", "e"), fb("e", "a"))}
    assert fallback_problems(fb("a", "b", "c"), others) == []
    assert fallback_problems(fb("a", "a"), others) == [("fallbacks.0", "`a` is this model itself")]
    assert fallback_problems(fb("a", "c", "c"), others) == [("fallbacks.1", "`c` is named twice")]
    [(where, why)] = fallback_problems(fb("a", "b", "nope"), others)
    assert where == "fallbacks.1" and "unknown model `nope`" in why
    [(where, why)] = fallback_problems(fb("a", "c", "d"), others)  # a → d → e → a
    assert where == "fallbacks.1" and "a cycle (a → d → e → a)" in why
    [(where, why)] = fallback_problems(fb("c", "b"), {**others, "c": fb("c")})  # b → c: the one written closes it
    assert where == "fallbacks.0" and "(c → b → c)" in why


def test_the_chain_skips_a_fallback_no_longer_configured_and_logs_it_once(caplog):
    r, a, c = Router(), fb("a", "gone", "c", "a"), fb("c")
    with caplog.at_level("WARNING", logger="aisix.routing"):
        assert [m.name for m in r.chain(a, {"a": a, "c": c})] == ["a", "c"]
        assert [m.name for m in r.chain(a, {"a": a, "c": c})] == ["a", "c"]
        assert len([x for x in caplog.records if "fallback gone is not configured" in x.getMessage()]) == 1
        r.prune([a, c])  # a configuration change: logged anew if still missing
        r.chain(a, {"a": a, "c": c})
        assert len([x for x in caplog.records if "fallback gone" in x.getMessage()]) == 2
