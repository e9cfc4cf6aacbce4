"""Rate limits on API keys and models: rpm, rpd, tpm, tpd and concurrency.

Windows are **fixed and aligned to the clock**: a minute window runs from ``:00`` to ``:60`` of
each wall-clock minute, a day window from 00:00 to 24:00 UTC (both from the injected clock,
``time.time`` in the server). A count goes back to zero when its window ends, so
``x-ratelimit-reset-*`` is exactly the time to the end of the window (rounded up to whole
seconds). A client may therefore spend a whole minute's allowance at ``:59`` and another at
``:00``; that is the price of O(1) state and an exact reset time.

- ``rpm``/``rpd`` are taken in :meth:`RateLimitHook.pre_call`; a rejected request takes nothing.
- ``tpm``/``tpd`` are checked in ``pre_call`` (a request is let in while the window has any
  token left) and charged in ``post_call`` into the window current at that moment, from the
  usage the upstream reported (``call.record``). When a call ended without usage but produced
  output (a stream cut short, or one whose upstream sent no usage chunk), the charge is the
  gateway's own count, ``call.estimated_completion_tokens``, plus a prompt estimate of one token
  per :data:`BYTES_PER_TOKEN` bytes of request body (``call.request_bytes``, set by the
  proxy). A call that produced nothing and reported nothing (e.g. an upstream error) costs 0.
- ``concurrency``: a slot is held from ``pre_call`` to ``post_call``, which the pipeline runs on
  every way out.
- A key's and a model's limits are counted independently; either can reject. The response
  headers show, per kind, the stricter of all the limits that apply (fewest remaining; on a tie
  the one that resets later).
- **Fallbacks**: the key and the alias asked for are counted once, in ``pre_call``. A fallback
  model the request moves on to is counted against its own ``rate_limit`` in
  :meth:`RateLimitHook.enter_fallback` (a request, and a slot until ``leave_fallback``); over
  it, the 429 it raises makes the proxy skip that fallback. Tokens go to the key and to the one
  model whose attempt produced them (the last attempt's alias: :func:`served_by`).

Counters of this hook live in this process (each worker and node counts on its own; with
``deployment.rate_limit_store.kind: redis`` :mod:`aisix.hooks.ratelimit_redis` counts once for all of
them), are keyed by :func:`key_identity` (the key's id, never its secret, so a key whose limits,
allowed models or secret change keeps its counts) / the model's name, and survive a change of
limits; :meth:`RateLimitHook.on_swap` drops those of a deleted (or deleted and re-created) key or
model. Everything runs synchronously on
the event loop: no lock, no await, O(1) per request.
"""
from __future__ import annotations

import math
import time
from typing import Callable

from aisix.config.resources import ApiKey, Model, RateLimit
from aisix.config.snapshot import Snapshot, SnapshotHolder
from aisix.errors import GatewayError
from aisix.hooks.pipeline import Call, Hook
from aisix.providers.base import BYTES_PER_TOKEN

MINUTE = 60  # s
MINUTES_PER_DAY = 1440
DAY = MINUTE * MINUTES_PER_DAY  # s


_STATE = "ratelimit"  # call.state entry: (key counters | None, model counters | None)
_FALLBACKS = "ratelimit_fallbacks"  # call.state entry: {fallback model name: its counters}


class NoRoom(Exception):
    """Raised by :meth:`aisix.proxy.routing.SharedRoom.take_room`: the deployment has no room in the shared store.
    ``until``: Unix time (s) until which it is known to have none (the end of the minute whose
    requests or tokens ran out), 0 when unknown (its concurrency is full, or the store is down);
    ``error``: the error to answer with when no deployment is left (the store being unreachable
    under ``on_store_error: deny``), else None."""

    def __init__(self, until: float = 0.0, error: GatewayError | None = None):
        super().__init__(until, error)
        self.until, self.error = until, error


class Counters:
    """What one key or model has used: in the current minute and day windows, and in flight."""

    __slots__ = ("entity_id", "minute", "day", "req_minute", "req_day", "tok_minute", "tok_day",
                 "in_flight")

    def __init__(self, entity_id: str | None):
        self.entity_id = entity_id  # to tell a re-created entity (same name, new id) from the old one
        self.minute = -1  # index of the current minute window: floor(now / 60)
        self.day = -1     # index of the current day window: floor(now / 86400)
        self.req_minute = self.req_day = 0
        self.tok_minute = self.tok_day = 0
        self.in_flight = 0

    def roll(self, now: float) -> None:
        """Start new windows if ``now`` is past the current ones (a clock going back changes nothing)."""
        m = int(now // MINUTE)
        if m > self.minute:
            self.minute = m
            self.req_minute = self.tok_minute = 0
            d = m // MINUTES_PER_DAY
            if d > self.day:
                self.day = d
                self.req_day = self.tok_day = 0


def duration(seconds: float) -> str:
    """Whole seconds, rounded up, the way OpenAI writes resets: ``55s``, ``1m0s``, ``23h59m5s``."""
    s = max(1, math.ceil(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


_SHORT_RESETS = [duration(s) for s in range(MINUTE + 1)]  # every minute-window reset, ready-made
_long_reset = [0, ""]  # the last day-window reset written: (whole seconds, text)


def _reset(seconds: float) -> str:
    """:func:`duration`, without formatting on the hot path (requests share the current second)."""
    s = math.ceil(seconds)
    if s <= MINUTE:
        return _SHORT_RESETS[s]
    if _long_reset[0] != s:
        _long_reset[:] = s, duration(s)
    return _long_reset[1]


def _describe(entity: ApiKey | Model) -> str:
    if isinstance(entity, Model):
        return f"model `{entity.name}`"
    return f"API key `{entity.id}`" if entity.id else "this API key"  # never the secret


def _denials(c: Counters, rl: RateLimit, now: float) -> list[tuple[float, str, str]]:
    """Every limit of ``rl`` that one more request would break: ``(seconds to wait, code, message tail)``.
    Requests and slots count the request itself; tokens are refused once none is left."""
    out = []
    if rl.concurrency is not None and c.in_flight >= rl.concurrency:
        out.append((1.0, "concurrency_limit_exceeded",
                    f"concurrency: limit {rl.concurrency} in flight, {c.in_flight} now"))
    for field, label, used, left in (
            ("rpm", "requests per minute", c.req_minute, MINUTE - now % MINUTE),
            ("rpd", "requests per day", c.req_day, DAY - now % DAY),
            ("tpm", "tokens per minute", c.tok_minute, MINUTE - now % MINUTE),
            ("tpd", "tokens per day", c.tok_day, DAY - now % DAY)):
        limit = getattr(rl, field)
        if limit is not None and used >= limit:
            out.append((left, "rate_limit_exceeded", f"{label} ({field}): limit {limit}, used {used}"))
    return out


def _over(c: Counters, rl: RateLimit) -> bool:
    """Whether one more request breaks any limit of ``rl`` (the hot path; :func:`_denials` says which)."""
    lim = rl.concurrency
    if lim is not None and c.in_flight >= lim:
        return True
    lim = rl.rpm
    if lim is not None and c.req_minute >= lim:
        return True
    lim = rl.rpd
    if lim is not None and c.req_day >= lim:
        return True
    lim = rl.tpm
    if lim is not None and c.tok_minute >= lim:
        return True
    lim = rl.tpd
    return lim is not None and c.tok_day >= lim


def _headers(pairs: tuple, now: float) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers from ``(counters, rate_limit)`` pairs: per kind, the stricter
    limit (fewest remaining; on a tie, the one that resets later). Unrolled: it runs on every request."""
    m_left = MINUTE - now % MINUTE
    d_left = DAY - now % DAY  # >= m_left: a day ends on a minute boundary
    req_lim = tok_lim = conc_lim = None
    req_rem = tok_rem = conc_rem = req_left = tok_left = 0
    for c, rl in pairs:
        if c is None:
            continue
        lim = rl.rpm
        if lim is not None:
            rem = lim - c.req_minute if c.req_minute < lim else 0
            if req_lim is None or rem < req_rem:
                req_lim, req_rem, req_left = lim, rem, m_left
        lim = rl.rpd
        if lim is not None:
            rem = lim - c.req_day if c.req_day < lim else 0
            if req_lim is None or rem <= req_rem:
                req_lim, req_rem, req_left = lim, rem, d_left
        lim = rl.tpm
        if lim is not None:
            rem = lim - c.tok_minute if c.tok_minute < lim else 0
            if tok_lim is None or rem < tok_rem:
                tok_lim, tok_rem, tok_left = lim, rem, m_left
        lim = rl.tpd
        if lim is not None:
            rem = lim - c.tok_day if c.tok_day < lim else 0
            if tok_lim is None or rem <= tok_rem:
                tok_lim, tok_rem, tok_left = lim, rem, d_left
        lim = rl.concurrency
        if lim is not None:
            rem = lim - c.in_flight if c.in_flight < lim else 0
            if conc_lim is None or rem < conc_rem:
                conc_lim, conc_rem = lim, rem
    h = {}
    if req_lim is not None:
        h["x-ratelimit-limit-requests"] = str(req_lim)
        h["x-ratelimit-remaining-requests"] = str(req_rem)
        h["x-ratelimit-reset-requests"] = _reset(req_left)
    if tok_lim is not None:
        h["x-ratelimit-limit-tokens"] = str(tok_lim)
        h["x-ratelimit-remaining-tokens"] = str(tok_rem)
        h["x-ratelimit-reset-tokens"] = _reset(tok_left)
    if conc_lim is not None:
        h["x-ratelimit-limit-concurrent"] = str(conc_lim)
        h["x-ratelimit-remaining-concurrent"] = str(conc_rem)
    return h


def key_identity(key: ApiKey) -> str:
    """The opaque string an API key's counts are kept under (every store uses this one): its id
    (stable across changes of its limits, allowed models or secret), else its SHA-256."""
    return key.id or key.key_hash


def charged_tokens(call: Call) -> int:
    """Tokens a finished call costs: the usage reported, else the gateway's estimate (see the module doc)."""
    r = call.record
    if r.total_tokens is not None:
        return r.total_tokens
    if r.prompt_tokens is not None or r.completion_tokens is not None:
        return (r.prompt_tokens or 0) + (r.completion_tokens or 0)
    if call.estimated_completion_tokens > 0:
        prompt = -(-call.request_bytes // BYTES_PER_TOKEN)
        return call.estimated_completion_tokens + prompt
    return 0


def served_by(call: Call, model: Model) -> bool:
    """Whether the call's tokens are ``model``'s: its last attempt went to that alias (no attempt:
    the alias asked for, whose tokens are then 0 anyway)."""
    return (call.attempt.model if call.attempt is not None else call.model.name) == model.name


def _charge(c: Counters, tokens: int, now: float) -> None:
    c.roll(now)
    c.tok_minute += tokens
    c.tok_day += tokens


class RateLimitHook(Hook):
    """The rate-limit stage of the pipeline. ``clock`` gives wall-clock seconds (``time.time``)."""

    def __init__(self, holder: SnapshotHolder | None = None, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.keys: dict[str, Counters] = {}    # by key id
        self.models: dict[str, Counters] = {}  # by model name
        if holder is not None:
            holder.on_swap(self.on_swap)

    # -- the pipeline stages ----------------------------------------------------
    def pre_call(self, call: Call) -> None:
        key, model = call.key, call.model
        krl, mrl = key.rate_limit, model.rate_limit
        if krl is None and mrl is None:
            return
        now = self.clock()
        kc = self._counters(self.keys, key_identity(key), key.id, now) if krl is not None else None
        mc = self._counters(self.models, model.name, model.id, now) if mrl is not None else None
        pairs = ((kc, krl), (mc, mrl))
        if (kc is not None and _over(kc, krl)) or (mc is not None and _over(mc, mrl)):
            self._reject(call, pairs, now)
        for c in (kc, mc):
            if c is not None:
                c.req_minute += 1
                c.req_day += 1
                c.in_flight += 1
        call.state[_STATE] = (kc, mc)
        call.response_headers.update(_headers(pairs, now))

    @staticmethod
    def _reject(call: Call, pairs: tuple, now: float, model: Model | None = None) -> None:
        """Raise the 429: the limit that keeps the client out longest names itself and sets
        Retry-After. ``pairs``: the key's and the model's (``model``, default the alias asked for)."""
        denied = [(wait, code, entity, tail)
                  for (c, rl), entity in zip(pairs, (call.key, model or call.model)) if c is not None
                  for wait, code, tail in _denials(c, rl, now)]
        wait, code, entity, tail = max(denied, key=lambda d: d[0])
        retry = max(1, math.ceil(wait))
        headers = _headers(pairs, now)
        headers["Retry-After"] = str(retry)
        what = "Concurrency limit" if code == "concurrency_limit_exceeded" else "Rate limit"
        raise GatewayError(429, f"{what} reached for {_describe(entity)} on {tail}. Please try again in {retry}s.",
                           "rate_limit_error", code, headers)

    def post_call(self, call: Call) -> None:
        taken = call.state.pop(_STATE, None)
        if taken is None:
            return
        kc, mc = taken
        tokens = charged_tokens(call)
        now = self.clock() if tokens else 0.0
        if kc is not None:
            kc.in_flight -= 1
            if tokens:
                _charge(kc, tokens, now)
        if mc is not None:
            mc.in_flight -= 1
            if tokens and served_by(call, call.model):
                _charge(mc, tokens, now)

    def enter_fallback(self, call: Call, model: Model) -> None:
        """Count the request against fallback ``model``'s own ``rate_limit`` (the key was counted
        in ``pre_call``); 429 when one more breaks it (the proxy then skips ``model``)."""
        rl = model.rate_limit
        if rl is None:
            return
        now = self.clock()
        mc = self._counters(self.models, model.name, model.id, now)
        if _over(mc, rl):
            self._reject(call, ((None, None), (mc, rl)), now, model)
        mc.req_minute += 1
        mc.req_day += 1
        mc.in_flight += 1
        call.state.setdefault(_FALLBACKS, {})[model.name] = mc

    def leave_fallback(self, call: Call, model: Model) -> None:
        """Give fallback ``model``'s slot back; charge it the tokens if its attempt produced them."""
        mc = call.state.get(_FALLBACKS, {}).pop(model.name, None)
        if mc is None:
            return
        mc.in_flight -= 1
        tokens = charged_tokens(call) if served_by(call, model) else 0
        if tokens:
            _charge(mc, tokens, self.clock())

    # -- configuration changes ----------------------------------------------------
    def on_swap(self, old: Snapshot, new: Snapshot) -> None:
        """Drop the counters of keys and models that are gone (or re-created under a new id).
        A request still in flight keeps its own reference and releases into the dropped counters."""
        key_ids = {k.id or k.key_hash for k in new.keys.values()}
        for name in [n for n in self.keys if n not in key_ids]:
            del self.keys[name]
        live = new.models
        for name in [n for n, c in self.models.items() if n not in live or live[n].id != c.entity_id]:
            del self.models[name]

    # -- reads (tests, admin) ----------------------------------------------------------
    def usage_of_key(self, identity: str) -> Counters | None:
        """This process's counters of the key counted under ``identity`` (:func:`key_identity`)."""
        return self.keys.get(identity)

    def usage_of_model(self, name: str) -> Counters | None:
        return self.models.get(name)

    @staticmethod
    def _counters(table: dict[str, Counters], name: str, entity_id: str | None, now: float) -> Counters:
        c = table.get(name)
        if c is None:
            c = table[name] = Counters(entity_id)
        c.roll(now)
        return c
