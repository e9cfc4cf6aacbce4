"""Rate limits counted once for every worker and node, in Redis
(``deployment.rate_limit_store.kind: redis``).

The same limits, windows and ``x-ratelimit-*`` headers as :mod:`aisix.hooks.ratelimit` (whose
:class:`~aisix.hooks.ratelimit.RateLimitHook` this extends), with the counts in Redis:

- **In**: one round trip (``EVALSHA`` of :data:`SYNC`) per request that has limits: atomically, for the key
  and the model, read the minute/day request and token counts and the live concurrency leases
  and, if no limit is broken, count the request and take a lease. The reply carries the counts
  the headers are made from, so every header (and every 429) shows the cluster-wide figures.
- **Out**: giving the lease back and charging the tokens (into the window current then) is never
  awaited by the request; it travels in the next ``SYNC`` this process sends (an admission's), or
  in its own after :data:`RELEASE_DELAY` when no request comes first.
- **Batched**: every release and admission queued in the same event-loop pass goes in one
  ``SYNC`` (in order: each admission sees what the ones before it took), so under load one
  round trip serves many requests.
- **Concurrency slots are leases**: a sorted-set member per request, scored by its expiry
  (Redis time + ``lease_ttl_ms``), renewed by one ``EVALSHA`` of :data:`RENEW` per process every
  third of the TTL while the request runs. Expired members are dropped before each count, so the
  slots of a node that died without giving them back are free ``lease_ttl_ms`` after its last
  renewal at the latest. Leases are taken only where a ``concurrency`` limit is set.
- Windows and lease expiry use the Redis server's clock (``TIME``), so every node agrees on
  them; tests may pass a ``clock`` instead.

Redis keys (``P`` = ``key_prefix``; ``E`` = ``rl:key:<h>`` or ``rl:model:<h>``, ``<h>`` a
SHA-256 of the entity's identity and id, so no client key is ever written to Redis and a
re-created entity starts from zero): ``P E:rm:<minute>``, ``P E:rd:<day>`` (requests),
``P E:tm:<minute>``, ``P E:td:<day>`` (tokens), each expiring after its window, and ``P E:c``
(leases). One Redis server (or a primary): the scripts build key names, so Redis Cluster is not
supported.

**Redis unreachable** (a connection error or no reply within ``timeout_ms``): with
``on_store_error: allow`` the request is counted on this process's own counters (those of the
local hook), the outage is logged once, and a probe (``PING`` every :data:`PROBE_INTERVAL` s)
switches back to shared counting when Redis answers; with ``deny`` the request gets a 429
``rate_limit_store_unavailable``. Each request not counted in Redis, and each failed call that
carried releases or renewals, adds one to ``aisix_ratelimit_store_errors_total``.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from aisix.config.loader import RateLimitStoreConfig
from aisix.config.resources import Model, RateLimit
from aisix.config.snapshot import Snapshot, SnapshotHolder
from aisix.errors import GatewayError
from aisix.hooks.pipeline import Call
from aisix.hooks.ratelimit import Counters, RateLimitHook, _headers, charged_tokens, key_identity, served_by

log = logging.getLogger("aisix.ratelimit")

#: Seconds between probes of an unreachable Redis.
PROBE_INTERVAL = 0.5
#: Longest wait of a release for an admission to travel with (s).
RELEASE_DELAY = 0.001
_STORE_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
_SHARED = "ratelimit_shared"  # call.state entry of a request counted in Redis: (bases, lease member)
_SHARED_FALLBACKS = "ratelimit_shared_fallbacks"  # {fallback model name: (bases, lease member)} counted in Redis

#: ``now`` in ms from ARGV[1], or the server's clock when it is negative; the window indexes.
_NOW = """
local now = tonumber(ARGV[1])
if now < 0 then local t = redis.call('TIME'); now = t[1] * 1000 + math.floor(t[2] / 1000) end
local m = math.floor(now / 60000)
local d = math.floor(m / 1440)
local sm, sd = ':' .. m, ':' .. d
"""

#: Releases, then admissions, in one call. KEYS: the entity bases (key and/or model) of each
#: release, then of each admission, one after another. ARGV: now_ms (-1: TIME), lease TTL ms, the
#: number of releases; per release: its number of bases, its lease member ('' : none), the tokens
#: to charge (into the window current now); per admission: its number of bases, its lease member,
#: its limits "rpm rpd tpm tpd concurrency" per base (0: no limit).
#: Returns {now_ms, then per admission: admitted (0|1), then per base: req_minute, req_day,
#: tok_minute, tok_day, in_flight} — after counting the request when admitted, before (nothing
#: taken) when not. Admissions are taken in order: each sees what the ones before it took.
SYNC = _NOW + """
local ttl, releases = tonumber(ARGV[2]), tonumber(ARGV[3])
local k, i = 1, 4
for _ = 1, releases do
  local n, member, tokens = tonumber(ARGV[i]), ARGV[i + 1], tonumber(ARGV[i + 2])
  for j = k, k + n - 1 do
    local base = KEYS[j]
    if member ~= '' then redis.call('ZREM', base .. ':c', member) end
    if tokens > 0 then
      local key = base .. ':tm' .. sm
      redis.call('INCRBY', key, tokens)
      redis.call('PEXPIREAT', key, (m + 2) * 60000)
      key = base .. ':td' .. sd
      redis.call('INCRBY', key, tokens)
      redis.call('PEXPIREAT', key, (d + 1) * 86400000 + 60000)
    end
  end
  k, i = k + n, i + 3
end
local out = {now}
while i <= #ARGV do
  local n, member = tonumber(ARGV[i]), ARGV[i + 1]
  local lim = {}
  for v in string.gmatch(ARGV[i + 2], '%d+') do lim[#lim + 1] = tonumber(v) end
  local at, ok = #out + 1, true
  out[at] = 0
  for j = 0, n - 1 do
    local base, l = KEYS[k + j], j * 5
    local rm = tonumber(redis.call('GET', base .. ':rm' .. sm) or 0)
    local rd = tonumber(redis.call('GET', base .. ':rd' .. sd) or 0)
    local tm = tonumber(redis.call('GET', base .. ':tm' .. sm) or 0)
    local td = tonumber(redis.call('GET', base .. ':td' .. sd) or 0)
    local fl = 0
    if lim[l + 5] > 0 then
      redis.call('ZREMRANGEBYSCORE', base .. ':c', '-inf', now)
      fl = redis.call('ZCARD', base .. ':c')
      if fl >= lim[l + 5] then ok = false end
    end
    if (lim[l + 1] > 0 and rm >= lim[l + 1]) or (lim[l + 2] > 0 and rd >= lim[l + 2])
        or (lim[l + 3] > 0 and tm >= lim[l + 3]) or (lim[l + 4] > 0 and td >= lim[l + 4]) then
      ok = false
    end
    local o = #out
    out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] = rm, rd, tm, td, fl
  end
  if ok then
    out[at] = 1
    for j = 0, n - 1 do
      local base, o = KEYS[k + j], at + j * 5
      local key = base .. ':rm' .. sm
      out[o + 1] = redis.call('INCR', key)
      redis.call('PEXPIREAT', key, (m + 2) * 60000)
      key = base .. ':rd' .. sd
      out[o + 2] = redis.call('INCR', key)
      redis.call('PEXPIREAT', key, (d + 1) * 86400000 + 60000)
      if lim[j * 5 + 5] > 0 then
        redis.call('ZADD', base .. ':c', now + ttl, member)
        redis.call('PEXPIRE', base .. ':c', ttl)
        out[o + 5] = out[o + 5] + 1
      end
    end
  end
  k, i = k + n, i + 3
end
return out
"""

#: KEYS: the bases of each lease, one after another. ARGV: now_ms (-1: TIME), lease TTL ms, then
#: per lease: number of bases, member. Only leases still there are extended (ZADD XX).
RENEW = _NOW + """
local ttl = tonumber(ARGV[2])
local k, i = 1, 3
while i <= #ARGV do
  local n, member = tonumber(ARGV[i]), ARGV[i + 1]
  for j = k, k + n - 1 do
    if redis.call('ZADD', KEYS[j] .. ':c', 'XX', 'CH', now + ttl, member) > 0 then
      redis.call('PEXPIRE', KEYS[j] .. ':c', ttl)
    end
  end
  k, i = k + n, i + 2
end
return 0
"""


def redacted(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _limits(rl: RateLimit) -> str:
    return f"{rl.rpm or 0} {rl.rpd or 0} {rl.tpm or 0} {rl.tpd or 0} {rl.concurrency or 0}"


def _counts(counts: list, i: int) -> Counters:
    """Entity ``i``'s counts from a request's part of an :data:`ADMIT` reply, as the local hook's Counters."""
    c = Counters(None)
    c.req_minute, c.req_day, c.tok_minute, c.tok_day, c.in_flight = counts[5 * i:5 * i + 5]
    return c


class RedisRateLimitHook(RateLimitHook):
    """The rate-limit stage with its counts in Redis (see the module doc).

    ``cfg`` is ``deployment.rate_limit_store``; ``count_error()`` is called once per request not
    counted in Redis and per failed release or renewal (``aisix_ratelimit_store_errors_total``).
    ``clock`` (wall-clock seconds) replaces Redis's ``TIME`` for windows and leases — for tests;
    None in the server. The local fallback counts with ``clock`` or ``time.time``.
    """

    def __init__(self, cfg: RateLimitStoreConfig, holder: SnapshotHolder | None = None,
                 count_error: Callable[[], None] = lambda: None, clock: Callable[[], float] | None = None):
        super().__init__(holder, clock or time.time)
        self.cfg = cfg
        self.redis_clock = clock
        timeout = cfg.timeout_ms / 1000
        # one immediate retry on a new connection after a connection error: a pooled connection
        # from before a Redis restart fails once; a timeout is never retried (one wait at most)
        self.redis = Redis.from_url(cfg.url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                    retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
        self._script = self.redis.register_script(SYNC)
        self._renew = self.redis.register_script(RENEW)
        self.count_error = count_error
        self.shared = True  # False while Redis is unreachable (then the local counters count)
        #: leases this process holds, renewed while their requests run: member -> entity bases
        self.leases: dict[str, tuple[str, ...]] = {}
        self._admissions: list = []  # for the next SYNC: (bases, member, limits, future)
        self._releases: list[tuple[tuple[str, ...], str, int]] = []  # for the next SYNC
        self._sender: asyncio.Task | None = None  # the SYNC that will take what is queued
        self._release_timer: asyncio.TimerHandle | None = None
        self.syncing = 0  # SYNC calls on their way
        self._renewer: asyncio.Task | None = None
        self._probe: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._bases: dict[tuple[str, str, str | None], str] = {}
        self._lease_prefix = secrets.token_hex(6) + ":"  # this process's lease members
        self._seq = 0

    # -- in -------------------------------------------------------------------------------
    def pre_call(self, call: Call):
        krl, mrl = call.key.rate_limit, call.model.rate_limit
        if krl is None and mrl is None:
            return None
        if not self.shared:
            return self._unshared(call)
        return self._admit_shared(call, krl, mrl)

    def _unshared(self, call: Call) -> None:
        """Redis is unreachable: count on this process (``allow``) or refuse (``deny``)."""
        self.count_error()
        if self.cfg.on_store_error == "deny":
            raise GatewayError(
                429, "Rate limits cannot be checked right now: the gateway's rate-limit store (Redis) is "
                     "unreachable, and the gateway is set to refuse requests then. Please try again in 1s.",
                "rate_limit_error", "rate_limit_store_unavailable", {"Retry-After": "1"})
        super().pre_call(call)

    async def _admit_shared(self, call: Call, krl: RateLimit | None, mrl: RateLimit | None) -> None:
        """Queue this request for the next :data:`SYNC` (every request queued in the same loop pass
        goes in one call) and make its headers, or its 429, from the counts that come back."""
        bases, limits, member = [], [], ""
        if krl is not None:
            bases.append(self._base("key", key_identity(call.key), call.key.id))
            limits.append(_limits(krl))
        if mrl is not None:
            bases.append(self._base("model", call.model.name, call.model.id))
            limits.append(_limits(mrl))
        if (krl is not None and krl.concurrency) or (mrl is not None and mrl.concurrency):
            member = self._new_member()
        reply = await self._take(bases, member, " ".join(limits))
        if reply is None:  # Redis failed
            return self._unshared(call)
        admitted, now, counts = reply
        kc = _counts(counts, 0) if krl is not None else None
        mc = _counts(counts, len(bases) - 1) if mrl is not None else None
        pairs = ((kc, krl), (mc, mrl))
        if not admitted:
            self._reject(call, pairs, now)
        bases = tuple(bases)
        if member:
            self.leases[member] = bases
            self._ensure_renewer()
        call.state[_SHARED] = (bases, member)
        call.response_headers.update(_headers(pairs, now))

    async def _take(self, bases: list[str], member: str, limits: str):
        """Queue one admission for the next :data:`SYNC` and wait for its reply: ``(admitted,
        now_s, counts)``, or None when Redis failed. A client gone while admitted gives it back."""
        fut = asyncio.get_running_loop().create_future()
        self._admissions.append((bases, member, limits, fut))
        if self._sender is None:
            self._sender = self._spawn(self._sync())
        try:
            return await fut
        except asyncio.CancelledError:
            if member and fut.done() and not fut.cancelled() and fut.result() and fut.result()[0]:
                self._queue_release(tuple(bases), member, 0)  # admitted as the client went away
            raise

    def _new_member(self) -> str:
        self._seq += 1
        return f"{self._lease_prefix}{self._seq}"

    def enter_fallback(self, call: Call, model: Model):
        if model.rate_limit is None:
            return None
        if not self.shared:
            return self._unshared_fallback(call, model)
        return self._enter_fallback_shared(call, model)

    def _unshared_fallback(self, call: Call, model: Model) -> None:
        self.count_error()
        if self.cfg.on_store_error == "deny":
            raise GatewayError(429, f"The rate limit of model `{model.name}` cannot be checked right now: the "
                               "rate-limit store (Redis) is unreachable. Please try again in 1s.",
                               "rate_limit_error", "rate_limit_store_unavailable", {"Retry-After": "1"})
        super().enter_fallback(call, model)

    async def _enter_fallback_shared(self, call: Call, model: Model) -> None:
        """Fallback ``model``'s own limits in Redis, in one :data:`SYNC` (the key was counted already)."""
        rl = model.rate_limit
        bases = [self._base("model", model.name, model.id)]
        member = self._new_member() if rl.concurrency else ""
        reply = await self._take(bases, member, _limits(rl))
        if reply is None:
            return self._unshared_fallback(call, model)
        admitted, now, counts = reply
        if not admitted:
            self._reject(call, ((None, None), (_counts(counts, 0), rl)), now, model)
        if member:
            self.leases[member] = tuple(bases)
            self._ensure_renewer()
        call.state.setdefault(_SHARED_FALLBACKS, {})[model.name] = (tuple(bases), member)

    # -- out ------------------------------------------------------------------------------
    def post_call(self, call: Call) -> None:
        taken = call.state.pop(_SHARED, None)
        if taken is None:
            super().post_call(call)  # counted locally (or not at all)
            return
        bases, member = taken
        if member:
            self.leases.pop(member, None)
        tokens = charged_tokens(call)
        if tokens and call.model.rate_limit is not None and not served_by(call, call.model):
            # a fallback produced them: the key's (bases before the model's, the last) and not the model's
            if member:
                self._queue_release(bases, member, 0)
            if len(bases) > 1:
                self._queue_release(bases[:-1], "", tokens)
        elif member or tokens:
            self._queue_release(bases, member, tokens)

    def leave_fallback(self, call: Call, model: Model) -> None:
        taken = call.state.get(_SHARED_FALLBACKS, {}).pop(model.name, None)
        if taken is None:
            super().leave_fallback(call, model)  # counted locally (or not at all)
            return
        bases, member = taken
        if member:
            self.leases.pop(member, None)
        tokens = charged_tokens(call) if served_by(call, model) else 0
        if member or tokens:
            self._queue_release(bases, member, tokens)

    def _queue_release(self, bases: tuple[str, ...], member: str, tokens: int) -> None:
        """A release goes with the next :data:`SYNC`: an admission's, or its own after
        :data:`RELEASE_DELAY` s when no request comes first."""
        self._releases.append((bases, member, tokens))
        if self._sender is None and self._release_timer is None:
            self._release_timer = asyncio.get_running_loop().call_later(RELEASE_DELAY, self._release_due)

    def _release_due(self) -> None:
        self._release_timer = None
        if self._releases and self._sender is None:
            self._sender = self._spawn(self._sync())

    async def _sync(self) -> None:
        """One :data:`SYNC` with every release and admission queued until this task first runs; each
        admission's future gets ``(admitted, now_s, counts)``, or None when Redis failed."""
        admissions, releases = self._admissions, self._releases
        self._admissions, self._releases, self._sender = [], [], None
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        if not self.shared:
            releases = []  # their leases expire by themselves; their tokens go uncounted
        keys, args = [], [self._now_arg(), self.cfg.lease_ttl_ms, len(releases)]
        for bases, member, extra in releases:
            keys += bases
            args += (len(bases), member, extra)
        for bases, member, limits, _ in admissions:
            keys += bases
            args += (len(bases), member, limits)
        reply = None
        if admissions or releases:
            self.syncing += 1
            try:
                reply = await self._script(keys, args)
            except _STORE_ERRORS as e:
                if releases:
                    self.count_error()
                self._lost(e)
            finally:
                self.syncing -= 1
                if reply is None:  # failed, or cancelled at shutdown: nobody waits in vain
                    for *_, fut in admissions:
                        if not fut.done():
                            fut.set_result(None)
        if reply is None:
            return
        now, at = int(reply[0]) / 1000, 1
        for bases, member, _, fut in admissions:
            n = len(bases)
            result = (reply[at], now, reply[at + 1:at + 1 + 5 * n])
            at += 1 + 5 * n
            if fut.cancelled():  # the client went away while waiting: give back what it got
                if result[0] and member:
                    self._queue_release(tuple(bases), member, 0)
                continue
            fut.set_result(result)

    # -- leases -----------------------------------------------------------------------------
    def _ensure_renewer(self) -> None:
        if self._renewer is None:
            self._renewer = self._spawn(self._renew_forever())

    async def _renew_forever(self) -> None:
        """Every third of the lease TTL, extend every lease this process holds (one call)."""
        ttl = self.cfg.lease_ttl_ms
        while True:
            await asyncio.sleep(ttl / 3000)
            if not self.leases or not self.shared:
                continue
            keys, args = [], [self._now_arg(), ttl]
            for member, bases in self.leases.items():
                keys += bases
                args += (len(bases), member)
            try:
                await self._renew(keys, args)
            except _STORE_ERRORS as e:
                self.count_error()
                self._lost(e)

    # -- outages ------------------------------------------------------------------------------
    def _lost(self, e: BaseException) -> None:
        """Redis failed: count locally (or deny) until the probe sees it answer again."""
        if not self.shared:
            return
        self.shared = False
        then = "counting on each process's own counters" if self.cfg.on_store_error == "allow" \
            else "refusing requests that have limits (429)"
        log.warning("rate-limit store %s unreachable (%s: %s): %s until it answers again",
                    redacted(self.cfg.url), type(e).__name__, e, then)
        if self._probe is None:
            self._probe = self._spawn(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        try:
            while True:
                await asyncio.sleep(PROBE_INTERVAL)
                try:
                    await self.redis.ping()
                except _STORE_ERRORS:
                    continue
                self.shared = True
                log.warning("rate-limit store %s reachable again: limits are shared again", redacted(self.cfg.url))
                return
        finally:
            self._probe = None

    # -- helpers ---------------------------------------------------------------------------------
    def _now_arg(self) -> int:
        return -1 if self.redis_clock is None else math.floor(self.redis_clock() * 1000)

    def _base(self, kind: str, identity: str, entity_id: str | None) -> str:
        """The Redis key base of one key or model: a hash, so no secret is ever written to Redis."""
        k = (kind, identity, entity_id)
        base = self._bases.get(k)
        if base is None:
            h = hashlib.sha256(f"{identity}\0{entity_id or ''}".encode()).hexdigest()[:32]
            base = self._bases[k] = f"{self.cfg.key_prefix}rl:{kind}:{h}"
        return base

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def on_swap(self, old: Snapshot, new: Snapshot) -> None:
        super().on_swap(old, new)
        self._bases.clear()  # names of gone entities are not kept (live ones are re-made on use)

    async def aclose(self) -> None:
        """Send the last releases, stop renewing and probing, close the connections."""
        for t in (self._renewer, self._probe):
            if t is not None:
                t.cancel()
        if self._releases and self._sender is None:
            self._release_due()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()
