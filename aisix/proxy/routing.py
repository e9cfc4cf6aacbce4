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

A deployment's own ``rate_limit`` is counted here, per process; with
``deployment.rate_limit_store.kind: redis`` it is counted once for the cluster as well
(:attr:`Router.shared`, :meth:`Router.claim`): the local counts stay a cheap first filter (this
process alone having used the room means the cluster has), and the deployment chosen is then
checked and taken in Redis atomically, in one round trip; refused, it is skipped and the next one
chosen. A deployment Redis found out of requests or tokens for the minute is skipped here, without
asking again, until that minute ends.
:meth:`Router.chain` is the one place a model's ``fallbacks`` are resolved: a name that no longer
names a model (deleted after it was written, or written around the Admin API's checks) is skipped,
and logged once (again after each configuration change).
"""
from __future__ import annotations

import logging
import math
import random
from collections import deque
from typing import Protocol

from aisix.config.resources import NEVER_RETRIED, Model
from aisix.errors import GatewayError
from aisix.hooks.ratelimit import NoRoom

#: Weight of the newest sample in the time-to-first-byte moving average.
EWMA_ALPHA = 0.3
#: A Retry-After longer than this (s) is not waited for: the attempt goes elsewhere.
MAX_RETRY_WAIT_S = 2.0
#: The longest cooldown a retry hint can set (s): an upstream can't park a deployment for days.
MAX_HINT_COOLDOWN_S = 600.0
#: ``call.state`` entry of the room a request holds on its deployment in the shared store.
ROOM = "deployment_room"


class SharedRoom(Protocol):
    """Deployment capacity counted for the whole cluster (:class:`aisix.hooks.ratelimit_redis.RedisRateLimitHook`)."""

    async def take_room(self, model: Model, target: Model) -> object | None:
        """Check and take room for one request on ``target`` (a deployment of ``model``), atomically.
        Returns what :meth:`give_room` gives back (None: counted by this process alone, the store
        being down under ``on_store_error: allow``); raises :class:`~aisix.hooks.ratelimit.NoRoom`."""

    def give_room(self, taken: object, tokens: int) -> None:
        """The request is over: give back its concurrency slot and charge its ``tokens``."""
log = logging.getLogger("aisix.routing")


class DeploymentState:
    """One deployment's health: ``in_flight`` requests, recent failure times (s), the end of
    its cooldown (s, 0: none), the EWMA of its time to first byte (ms, None: no sample yet)."""

    __slots__ = (
        "cooldown_until",
        "ewma_ms",
        "fails",
        "full_until",
        "in_flight",
        "last_fail",
        "minute",
        "requests",
        "tokens",
    )

    def __init__(self):
        self.in_flight = 0
        self.minute = 0  # the clock-aligned minute (Unix time // 60) the counts below belong to
        self.requests = 0  # started in that minute
        self.tokens = 0  # charged in that minute
        self.fails: deque[float] = deque()
        self.cooldown_until = 0.0
        self.ewma_ms: float | None = None
        self.last_fail = 0.0
        self.full_until = 0.0  # Unix time (s): the shared store found no room until then

    def _roll(self, wall: float) -> None:
        minute = int(wall // 60)
        if minute != self.minute:
            self.minute, self.requests, self.tokens = minute, 0, 0

    def has_room(self, limit, wall: float) -> bool:
        """Whether the deployment's ``rate_limit`` (rpm, tpm, concurrency) lets one more request in."""
        if limit is None:
            return True
        if self.full_until > wall:
            return False
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
        #: where deployments' capacity is counted for the cluster (None: in this process only)
        self.shared: SharedRoom | None = None
        self._warned: set[tuple[str, str]] = set()  # (model, fallback) logged as skipped since the last change

    def state(self, target: Model) -> DeploymentState:
        key = (target.name, target.deployment_id)
        st = self._state.get(key)
        if st is None:
            st = self._state[key] = DeploymentState()
        return st

    def choose(self, model: Model, tried: set[str], now: float, wall: float = 0.0,
               full: frozenset[str] | set[str] = frozenset()) -> Model | None:
        """The target for the next attempt at ``model``: among deployments not ``tried`` yet (all
        again once each was tried) that have room under their own ``rate_limit`` (``wall``: Unix
        time, s; ``full``: ids of deployments with a limit found without room for this attempt),
        those not cooling down, by the strategy; when all of those are cooling down, the one whose
        cooldown ends first. None when no deployment has room."""
        targets = model.targets
        if len(targets) == 1:
            t = targets[0]
            return t if t.capacity is None or (
                t.deployment_id not in full and self.state(t).has_room(t.capacity, wall)) else None
        roomy = [t for t in targets if t.capacity is None or (
            t.deployment_id not in full and self.state(t).has_room(t.capacity, wall))]
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

    async def claim(self, model: Model, target: Model, tried: set[str], keep: set[str], state: dict,
                    now: float, wall: float) -> Model | None:
        """Take ``target``'s room (it came from :meth:`choose`) in the :attr:`shared` store; refused,
        choose again without it, until one is taken or none is left (at most one round trip per
        deployment). What was taken goes in ``state[ROOM]`` for :meth:`charge` to give back. A target
        without a limit of its own, or in ``keep`` (the caller won't use it), is returned as is.
        Returns None when no deployment has room; raises the :class:`~aisix.hooks.ratelimit.NoRoom` error (a 429
        :class:`GatewayError`) when none is left and the store could not be asked under ``deny``."""
        full: set[str] = set()
        error = None
        while target is not None and target.capacity is not None and target.deployment_id not in keep:
            try:
                taken = await self.shared.take_room(model, target)
            except NoRoom as e:
                st = self.state(target)
                st.full_until = max(st.full_until, e.until)
                error = error or e.error
                full.add(target.deployment_id)
                target = self.choose(model, tried, now, wall, full)
                continue
            if taken is not None:
                state[ROOM] = taken
            return target
        if target is None and error is not None:
            raise error
        return target

    def started(self, target: Model, wall: float = 0.0) -> None:
        st = self.state(target)
        st.in_flight += 1
        if target.capacity is not None:
            st._roll(wall)
            st.requests += 1

    def charge(self, target: Model, tokens: int, wall: float, state: dict | None = None) -> None:
        """Tokens the attempt cost, against its deployment's ``tpm``; the room it held in the shared
        store (``state[ROOM]``, from :meth:`claim`) is given back with them."""
        taken = state.pop(ROOM, None) if state is not None else None
        if taken is not None:
            self.shared.give_room(taken, tokens)
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
