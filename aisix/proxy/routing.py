"""Choosing a deployment for each attempt, and keeping each deployment's health.

:class:`Router` is pure state and arithmetic (no IO, no clock of its own: callers pass ``now``
in seconds from ``time.monotonic``): which deployment of a model an attempt goes to under the
model's ``routing.strategy``, which deployments are cooling down after failures, how many
requests each has in flight, and a moving average of each one's time to first byte. One
process, one router; the state of a deployment is keyed by ``(model alias, deployment id)``.

Semantics follow LiteLLM's Router where the issue is silent: a deployment that fails
``allowed_fails`` times within ``cooldown_ms``, or answers 429 with a ``Retry-After``, is
skipped until its cooldown ends; when every candidate is cooling down, the one whose cooldown
ends first is tried (no self-inflicted outage).

:meth:`Router.chain` is the one place a model's ``fallbacks`` are resolved: a name that no longer
names a model (deleted after it was written, or written around the Admin API's checks) is skipped,
and logged once (again after each configuration change).
"""
from __future__ import annotations

import logging
import math
import random
from collections import deque

from aisix.config.resources import NEVER_RETRIED, Model
from aisix.errors import GatewayError

#: Weight of the newest sample in the time-to-first-byte moving average.
EWMA_ALPHA = 0.3
#: A Retry-After longer than this (s) is not waited for: the attempt goes elsewhere.
MAX_RETRY_WAIT_S = 2.0
#: The longest cooldown a retry hint can set (s): an upstream can't park a deployment for days.
MAX_HINT_COOLDOWN_S = 600.0
log = logging.getLogger("aisix.routing")


class DeploymentState:
    """One deployment's health: ``in_flight`` requests, recent failure times (s), the end of
    its cooldown (s, 0: none), the EWMA of its time to first byte (ms, None: no sample yet)."""

    __slots__ = ("in_flight", "fails", "cooldown_until", "ewma_ms", "last_fail", "minute", "requests", "tokens")

    def __init__(self):
        self.in_flight = 0
        self.minute = 0  # the clock-aligned minute (Unix time // 60) the counts below belong to
        self.requests = 0  # started in that minute
        self.tokens = 0  # charged in that minute
        self.fails: deque[float] = deque()
        self.cooldown_until = 0.0
        self.ewma_ms: float | None = None
        self.last_fail = 0.0

    def _roll(self, wall: float) -> None:
        minute = int(wall // 60)
        if minute != self.minute:
            self.minute, self.requests, self.tokens = minute, 0, 0

    def has_room(self, limit, wall: float) -> bool:
        """Whether the deployment's ``rate_limit`` (rpm, tpm, concurrency) lets one more request in."""
        if limit is None:
            return True
        self._roll(wall)
        return ((limit.rpm is None or self.requests < limit.rpm) and (limit.tpm is None or self.tokens < limit.tpm)
                and (limit.concurrency is None or self.in_flight < limit.concurrency))

    def snapshot(self, now: float) -> dict:
        """For ``GET /aisix/admin/health/models``."""
        cooling = self.cooldown_until > now
        return {"state": "cooling_down" if cooling else "healthy",
                "cooldown_remaining_ms": round((self.cooldown_until - now) * 1000) if cooling else 0,
                "in_flight": self.in_flight, "ewma_first_byte_ms": None if self.ewma_ms is None else
                round(self.ewma_ms, 1), "recent_failures": len(self.fails)}


def failure_kind(err: GatewayError) -> str | int:
    """What an attempt's failure was, as ``routing.retry_on`` names it: ``connect_error`` (the
    upstream could not be reached), ``timeout``, or the HTTP status it stands for (an error inside a
    stream that answered 200 counts as the status it carries; a malformed or broken answer is 502)."""
    if err.code == "upstream_timeout" or not err.upstream_status and err.status == 504:
        return "timeout"
    if not err.upstream_status:
        return "connect_error" if err.code == "upstream_unreachable" else err.status
    return err.status if err.upstream_status == 200 else err.upstream_status


def retryable(err: GatewayError, model: Model) -> bool:
    """Whether this failure is worth another attempt under ``model.routing.retry_on``."""
    kind = failure_kind(err)
    return kind not in NEVER_RETRIED and kind in model.routing.retry_on


def retry_after_s(err: GatewayError) -> float | None:
    """The upstream's retry hint in seconds (``retry-after-ms`` first, as the openai client reads
    it, then ``Retry-After`` in seconds); None when absent or not a number."""
    h = {k.lower(): v for k, v in err.headers.items()}
    try:
        if "retry-after-ms" in h:
            s = float(h["retry-after-ms"]) / 1000
        elif "retry-after" in h:
            s = float(h["retry-after"])
        else:
            return None
    except ValueError:
        return None
    return s if math.isfinite(s) and s >= 0 else None  # "inf", "nan", "-1": no hint


class Router:
    """Picks deployments and tracks their health (see the module doc)."""

    def __init__(self, rng: random.Random | None = None):
        self._state: dict[tuple[str, str], DeploymentState] = {}
        self._turn: dict[str, int] = {}
        self._rng = rng or random.Random()
        self._warned: set[tuple[str, str]] = set()  # (model, fallback) logged as skipped since the last change

    def state(self, target: Model) -> DeploymentState:
        key = (target.name, target.deployment_id)
        st = self._state.get(key)
        if st is None:
            st = self._state[key] = DeploymentState()
        return st

    def choose(self, model: Model, tried: set[str], now: float, wall: float = 0.0) -> Model | None:
        """The target for the next attempt at ``model``: among deployments not ``tried`` yet (all
        again once each was tried) that have room under their own ``rate_limit`` (``wall``: Unix
        time, s), those not cooling down, by the strategy; when all of those are cooling down, the
        one whose cooldown ends first. None when no deployment has room."""
        targets = model.targets
        if len(targets) == 1:
            t = targets[0]
            return t if t.capacity is None or self.state(t).has_room(t.capacity, wall) else None
        roomy = [t for t in targets if t.capacity is None or self.state(t).has_room(t.capacity, wall)]
        if not roomy:
            return None
        cands = [t for t in roomy if t.deployment_id not in tried] or roomy
        healthy = [t for t in cands if self.state(t).cooldown_until <= now]
        if not healthy:
            return min(cands, key=lambda t: self.state(t).cooldown_until)
        strategy = model.routing.strategy
        if strategy == "round_robin":
            turn = self._turn.get(model.name, 0)
            self._turn[model.name] = turn + 1
            return healthy[turn % len(healthy)]
        if strategy == "least_busy":
            return min(healthy, key=lambda t: self.state(t).in_flight)
        if strategy == "lowest_latency":
            return min(healthy, key=lambda t: self.state(t).ewma_ms or 0.0)
        pick = self._rng.random() * sum(t.weight for t in healthy)
        for t in healthy:
            pick -= t.weight
            if pick < 0:
                return t
        return healthy[-1]

    def started(self, target: Model, wall: float = 0.0) -> None:
        st = self.state(target)
        st.in_flight += 1
        if target.capacity is not None:
            st._roll(wall)
            st.requests += 1

    def charge(self, target: Model, tokens: int, wall: float) -> None:
        """Tokens the attempt cost, against its deployment's ``tpm``."""
        if target.capacity is not None and tokens:
            st = self.state(target)
            st._roll(wall)
            st.tokens += tokens

    def finished(self, target: Model) -> None:
        st = self.state(target)
        st.in_flight = max(0, st.in_flight - 1)

    def succeeded(self, target: Model, first_byte_ms: float) -> None:
        """The attempt got its answer (status and headers) after ``first_byte_ms``."""
        st = self.state(target)
        st.ewma_ms = first_byte_ms if st.ewma_ms is None else st.ewma_ms + EWMA_ALPHA * (first_byte_ms - st.ewma_ms)

    def failed(self, target: Model, err: GatewayError, now: float) -> None:
        """Count a failure; put the deployment in cooldown after ``allowed_fails`` within
        ``cooldown_ms``, or at once for the length of a 429's ``Retry-After``. Client errors
        (the request's fault) don't count."""
        kind = failure_kind(err)
        if kind in NEVER_RETRIED:
            return
        st = self.state(target)
        routing = target.routing
        window = routing.cooldown_ms / 1000
        st.last_fail = now
        st.fails.append(now)
        while st.fails and st.fails[0] <= now - window:
            st.fails.popleft()
        hint = retry_after_s(err) if kind == 429 else None
        if hint is not None:
            st.cooldown_until = max(st.cooldown_until, now + min(hint, MAX_HINT_COOLDOWN_S))
        elif len(st.fails) >= routing.allowed_fails:
            st.cooldown_until = max(st.cooldown_until, now + window)
            st.fails.clear()

    def chain(self, model: Model, models) -> list[Model]:
        """``model``, then its ``fallbacks`` in order as found in ``models`` (the snapshot's, by
        name), one level (a fallback's own fallbacks are not followed), each once and never
        ``model`` again. A name not in ``models`` is skipped, with one WARNING per (model, name)
        until the next configuration change (:meth:`prune`)."""
        out = [model]
        for name in model.fallbacks:
            m = models.get(name)
            if m is None:
                if (model.name, name) not in self._warned:
                    self._warned.add((model.name, name))
                    log.warning("model %s: fallback %s is not configured (deleted since?); skipped", model.name, name)
            elif not any(x is m for x in out):
                out.append(m)
        return out

    def prune(self, models) -> None:
        """Forget the state of deployments no longer configured (``models``: the live ones), so a
        model deleted and created again starts healthy; the skipped fallbacks are logged anew."""
        self._warned.clear()
        live = {(m.name, t.deployment_id) for m in models for t in m.targets}
        for key in [k for k in self._state if k not in live]:
            del self._state[key]
        for name in [n for n in self._turn if n not in {m.name for m in models}]:
            del self._turn[name]

    def health(self, models, now: float) -> list[dict]:
        """Every deployment of ``models`` with its state (for the Admin API)."""
        return [{"model": m.name, "deployment": t.deployment_id, "upstream": t.model, **self.state(t).snapshot(now)}
                for m in models for t in m.targets]
