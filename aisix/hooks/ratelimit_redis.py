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
- **One connection** per process (:class:`aisix.hooks.redis_pipe.RedisPipe`), pipelined: a SYNC is
  written at once when none is on its way, else as soon as the loop pass that queued it ends,
  without waiting for the ones before it.
- **Batched**: every release and admission queued in the same event-loop pass goes in one
  ``SYNC`` (in order: each admission sees what the ones before it took), so under load one
  round trip serves many requests.
- **Concurrency slots are leases**: a sorted-set member per request, scored by its expiry
  (Redis time + ``lease_ttl_ms``), renewed by one ``EVALSHA`` of :data:`RENEW` per process every
  third of the TTL while the request runs. Expired members are dropped before each count, so the
  slots of a node that died without giving them back are free ``lease_ttl_ms`` after its last
  renewal at the latest. Leases are taken only where a ``concurrency`` limit is set.
- **Deployments** of a model with their own ``rate_limit`` (rpm, tpm, concurrency) are counted the
  same way, as one more entity (:meth:`RedisRateLimitHook.take_room`, called by
  :meth:`aisix.proxy.routing.Router.claim` for the deployment chosen: checked and taken atomically in one
  SYNC, given back with its tokens when the attempt ends).
- Windows and lease expiry use the Redis server's clock (``TIME``), so every node agrees on
  them; tests may pass a ``clock`` instead.

Redis keys (``P`` = ``key_prefix``; ``E`` = ``rl:key:<h>`` or ``rl:model:<h>``, ``<h>`` a
SHA-256 of the entity's identity and id (or ``rl:deployment:<h>``, of the alias, the deployment id and the model's id), so no client key is ever written to Redis and a
re-created entity starts from zero): ``P E:rm:<minute>``, ``P E:rd:<day>`` (requests),
``P E:tm:<minute>``, ``P E:td:<day>`` (tokens), each expiring after its window (set once, by the call that creates it), and ``P E:c``
(leases). One Redis server (or a primary): the scripts build key names, so Redis Cluster is not
supported.

**Redis unreachable** (a connection error or no reply within ``timeout_ms``): with
``on_store_error: allow`` the request is counted on this process's own counters (those of the
local hook), the outage is logged once, and a probe (an empty SYNC every :data:`PROBE_INTERVAL` s)
switches back to shared counting when Redis answers; with ``deny`` the request gets a 429
``rate_limit_store_unavailable``. Each request not counted in Redis, and each failed call that
carried releases or renewals, adds one to ``aisix_ratelimit_store_errors_total``.

**Redis refusing to count** (it answers, with an error: writes refused under ``maxmemory``, a
counter under the limiter's prefix that is not what the script expects) is not an outage: each
release and admission runs under ``pcall`` in the script, so only the requests whose counters
failed are handled as above (``on_store_error``, counted in the same series), every other
request goes on being counted in Redis, and one line is logged per :data:`REFUSAL_LOG_INTERVAL`.
Closing (SIGTERM) sends the last releases once, bounded by ``timeout_ms``, and never waits for an
unreachable Redis to come back.
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

from redis.exceptions import RedisError, ResponseError

from aisix.config.loader import RateLimitStoreConfig
from aisix.config.resources import Model, RateLimit
from aisix.config.snapshot import Snapshot, SnapshotHolder
from aisix.errors import GatewayError
from aisix.hooks.pipeline import Call
from aisix.hooks.ratelimit import Counters, NoRoom, RateLimitHook, _headers, charged_tokens, key_identity, served_by
from aisix.hooks.redis_pipe import RedisPipe, Script, bulk

log = logging.getLogger("aisix.ratelimit")

#: Seconds between probes of an unreachable Redis.
PROBE_INTERVAL = 0.5
#: Longest wait of a release for an admission to travel with (s).
RELEASE_DELAY = 0.005
#: Seconds between log lines about Redis refusing to count (error replies).
REFUSAL_LOG_INTERVAL = 60.0
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
#: Returns {now_ms, then per admission: admitted (1), refused (0) or failed (-1), then per base:
#: req_minute, req_day, tok_minute, tok_day, in_flight} — after counting the request when
#: admitted, before (nothing taken) when not — then, when a release or an admission failed, the
#: first failure's text. Admissions are taken in order: each sees what the ones before it took.
#: Each release and each admission runs under ``pcall``: a Redis error on one (a counter that is
#: not a number, a write refused under ``maxmemory``) fails that one only, never the others.
SYNC = _NOW + """
local ttl, releases = tonumber(ARGV[2]), tonumber(ARGV[3])
local failure
local function failed(e)
  failure = failure or (type(e) == 'table' and (e.err or 'error') or tostring(e))
end
local function release(k, n, member, tokens)
  for j = k, k + n - 1 do
    local base = KEYS[j]
    if member ~= '' then redis.call('ZREM', base .. ':c', member) end
    if tokens > 0 then
      local key = base .. ':tm' .. sm
      if redis.call('INCRBY', key, tokens) == tokens then redis.call('PEXPIREAT', key, (m + 2) * 60000) end
      key = base .. ':td' .. sd
      if redis.call('INCRBY', key, tokens) == tokens then redis.call('PEXPIREAT', key, (d + 1) * 86400000 + 60000) end
    end
  end
end
-- a counter's value: an integer, or an error (a value the limiter did not write: 'inf', '1.5', text)
local function int(v)
  local x = tonumber(v or 0)
  if x == nil or x ~= x or x == math.huge or x == -math.huge or x ~= math.floor(x) then
    error('a rate-limit counter does not hold an integer')
  end
  return x
end
-- the counts of one admission's n bases (5 each, into vals) and whether every limit has room: reads only
local function check(k, n, lim, vals)
  local ok = true
  for j = 0, n - 1 do
    local base, l = KEYS[k + j], j * 5
    local v = redis.call('MGET', base .. ':rm' .. sm, base .. ':rd' .. sd, base .. ':tm' .. sm, base .. ':td' .. sd)
    local rm, rd, tm, td = int(v[1]), int(v[2]), int(v[3]), int(v[4])
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
    vals[l + 1], vals[l + 2], vals[l + 3], vals[l + 4], vals[l + 5] = rm, rd, tm, td, fl
  end
  return ok
end
-- count the request and take its lease (where a concurrency limit is set); vals updated; every
-- counter incremented is listed in incrs (for undo)
local function take(k, n, lim, member, vals, incrs)
  for j = 0, n - 1 do
    local base, l = KEYS[k + j], j * 5
    local key = base .. ':rm' .. sm
    vals[l + 1] = redis.call('INCR', key)
    incrs[#incrs + 1] = key
    if vals[l + 1] == 1 then redis.call('PEXPIREAT', key, (m + 2) * 60000) end
    key = base .. ':rd' .. sd
    vals[l + 2] = redis.call('INCR', key)
    incrs[#incrs + 1] = key
    if vals[l + 2] == 1 then redis.call('PEXPIREAT', key, (d + 1) * 86400000 + 60000) end
    if lim[l + 5] > 0 then
      redis.call('ZADD', base .. ':c', now + ttl, member)
      redis.call('PEXPIRE', base .. ':c', ttl)
      vals[l + 5] = vals[l + 5] + 1
    end
  end
end
-- a take that failed part way: what it counted and the lease it took are given back (best effort)
local function undo(k, n, member, incrs)
  for _, key in ipairs(incrs) do pcall(redis.call, 'DECR', key) end
  if member ~= '' then
    for j = 0, n - 1 do pcall(redis.call, 'ZREM', KEYS[k + j] .. ':c', member) end
  end
end
local k, i = 1, 4
for _ = 1, releases do
  local good, e = pcall(release, k, tonumber(ARGV[i]), ARGV[i + 1], tonumber(ARGV[i + 2]))
  if not good then failed(e) end
  k, i = k + tonumber(ARGV[i]), i + 3
end
local out = {now}
while i <= #ARGV do
  local n, member = tonumber(ARGV[i]), ARGV[i + 1]
  local lim, vals = {}, {}
  for v in string.gmatch(ARGV[i + 2], '%d+') do lim[#lim + 1] = tonumber(v) end
  for j = 1, 5 * n do vals[j] = 0 end
  local status = 0
  local good, ok = pcall(check, k, n, lim, vals)
  if not good then
    failed(ok)
    status = -1
  elseif ok then
    local incrs = {}
    local took, e = pcall(take, k, n, lim, member, vals, incrs)
    if took then status = 1 else failed(e); undo(k, n, member, incrs); status = -1 end
  end
  out[#out + 1] = status
  for j = 1, 5 * n do out[#out + 1] = tonumber(vals[j]) or 0 end
  k, i = k + n, i + 3
end
if failure then out[#out + 1] = failure end
return out
"""

#: KEYS: the bases of each lease, one after another. ARGV: now_ms (-1: TIME), lease TTL ms, then
#: per lease: number of bases, member. Only leases still there are extended (ZADD XX). Returns how
#: many renewals failed (each runs under ``pcall``: one bad lease set does not stop the others).
RENEW = _NOW + """
local ttl = tonumber(ARGV[2])
local function renew(key, member)
  if redis.call('ZADD', key, 'XX', 'CH', now + ttl, member) > 0 then redis.call('PEXPIRE', key, ttl) end
end
local k, i, failure = 1, 3, 0
while i <= #ARGV do
  local n, member = tonumber(ARGV[i]), ARGV[i + 1]
  for j = k, k + n - 1 do
    if not pcall(renew, KEYS[j] .. ':c', member) then failure = failure + 1 end
  end
  k, i = k + n, i + 2
end
return failure
"""


SYNC_SCRIPT = Script(SYNC)
RENEW_SCRIPT = Script(RENEW)
_N = [bulk(i) for i in range(8)]  # small counts, packed
_EMPTY = bulk("")  # "no lease"
_MINUS1 = bulk(-1)  # "use Redis's TIME"


def redacted(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _limits(rl: RateLimit | None) -> str:
    """One entity's limits as :data:`SYNC` reads them: "rpm rpd tpm tpd concurrency", 0 for none."""
    return "0 0 0 0 0" if rl is None else \
        f"{rl.rpm or 0} {rl.rpd or 0} {rl.tpm or 0} {rl.tpd or 0} {rl.concurrency or 0}"


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
        self.pipe = RedisPipe(cfg.url, cfg.timeout_ms / 1000, (SYNC_SCRIPT, RENEW_SCRIPT))
        self.count_error = count_error
        self.shared = True  # False while Redis is unreachable (then the local counters count)
        #: leases this process holds, renewed while their requests run: member -> entity bases (packed)
        self.leases: dict[bytes, tuple[bytes, ...]] = {}
        self._admissions: list = []  # for the next SYNC: (bases, member, limits, future), all packed
        self._releases: list[tuple[tuple[bytes, ...], bytes, int]] = []  # for the next SYNC
        self._sender: asyncio.Handle | None = None  # the SYNC that will take what is queued (call_soon)
        self._release_timer: asyncio.TimerHandle | None = None
        self.syncing = 0  # SYNC calls on their way
        self._drained: asyncio.Future | None = None  # set when syncing is back to 0 (aclose waits for it)
        self._renewer: asyncio.Task | None = None
        self._probe: asyncio.Task | None = None
        self._ttl = bulk(cfg.lease_ttl_ms)
        self._bases: dict[tuple[str, str, str | None], bytes] = {}  # entity -> its packed Redis key base
        self._limit_args: dict[tuple[int, int], tuple] = {}  # (id(key rl), id(model rl)) -> (krl, mrl, packed)
        self._lease_prefix = secrets.token_hex(6) + ":"  # this process's lease members
        self._refusals, self._refusal_logged = 0, -math.inf  # error replies: count, last logged (monotonic s)
        self._closing = False  # aclose has begun: no new probe
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
            raise store_unavailable()
        super().pre_call(call)

    async def _admit_shared(self, call: Call, krl: RateLimit | None, mrl: RateLimit | None) -> None:
        """Count this request in Redis (:meth:`admit`) and make its headers, or its 429, from the
        cluster-wide counts that come back."""
        if krl is not None:
            kb = self._base("key", key_identity(call.key), call.key.id)
            bases = (kb,) if mrl is None else (kb, self._base("model", call.model.name, call.model.id))
        else:
            bases = (self._base("model", call.model.name, call.model.id),)
        lease = bool((krl is not None and krl.concurrency) or (mrl is not None and mrl.concurrency))
        reply, member = await self.admit(bases, self._limits_arg(krl, mrl), lease)
        if reply is None:  # Redis failed
            return self._unshared(call)
        admitted, now, counts = reply
        kc = _counts(counts, 0) if krl is not None else None
        mc = _counts(counts, len(bases) - 1) if mrl is not None else None
        pairs = ((kc, krl), (mc, mrl))
        if not admitted:
            self._reject(call, pairs, now)
        call.state[_SHARED] = (bases, member)
        call.response_headers.update(_headers(pairs, now))

    async def admit(self, bases: tuple[bytes, ...], limits: bytes, lease: bool) -> tuple[tuple | None, bytes]:
        """Queue one admission for the next :data:`SYNC` (every one queued in the same loop pass
        goes in one call) and wait for it: ``bases`` are the entities' packed key bases
        (:meth:`_base`), ``limits`` their packed limits, ``lease`` whether to take a concurrency
        lease. Returns ``((admitted, now_s, counts), lease member)``, or ``(None, member)`` when Redis
        failed. A lease taken is renewed until :meth:`release` gives it back."""
        member = self._new_member() if lease else _EMPTY
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._admissions.append((bases, member, limits, fut))
        if self._sender is None:
            if self.syncing:  # one is on its way: this one goes with the rest of this loop pass
                self._sender = loop.call_soon(self._sync)
            else:  # nothing on its way (c=1): at once, no loop pass lost
                self._sync()
        try:
            reply = await fut
        except asyncio.CancelledError:
            if lease and fut.done() and not fut.cancelled() and fut.result() and fut.result()[0]:
                self._queue_release(bases, member, 0)  # admitted as the client went away
            raise
        if lease and reply is not None and reply[0]:
            self.leases[member] = bases
            self._ensure_renewer()
        return reply, member

    # -- deployments (routing's SharedRoom) --------------------------------------------------
    async def take_room(self, model: Model, target: Model) -> tuple | None:
        """Check and take room for one request on deployment ``target`` of ``model`` under its own
        ``rate_limit`` (rpm, tpm, concurrency), atomically, in the next :data:`SYNC` (one round trip,
        batched with the others). Returns what :meth:`give_room` gives back; None when Redis is
        unreachable under ``allow`` (the router's own counts count); raises
        :class:`~aisix.hooks.ratelimit.NoRoom` when refused (with the end of the minute when its requests or
        tokens ran out) or when Redis is unreachable under ``deny``."""
        rl = target.capacity
        if self.shared:
            base = self._base("deployment", f"{model.name}\0{target.deployment_id}", model.id)
            reply, member = await self.admit((base,), self._limits_arg(None, rl), bool(rl.concurrency))
            if reply is not None:
                admitted, now, (rm, _, tm, _, _) = reply
                if admitted:
                    return (base,), member
                spent = (rl.rpm is not None and rm >= rl.rpm) or (rl.tpm is not None and tm >= rl.tpm)
                raise NoRoom((now // 60 + 1) * 60 if spent else 0.0)
        self.count_error()
        if self.cfg.on_store_error == "deny":
            raise NoRoom(0.0, store_unavailable())
        return None

    def give_room(self, taken: tuple, tokens: int) -> None:
        """The request on a deployment is over: its lease back, its ``tokens`` charged (in the next SYNC)."""
        self.release(*taken, tokens)

    # -- out ------------------------------------------------------------------------------
    # -- fallbacks (their own limits; the key was counted already) ---------------------------------
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
        """Fallback ``model``'s own limits in Redis, in one :data:`SYNC`."""
        rl = model.rate_limit
        bases = (self._base("model", model.name, model.id),)
        reply, member = await self.admit(bases, self._limits_arg(None, rl), bool(rl.concurrency))
        if reply is None:
            return self._unshared_fallback(call, model)
        admitted, now, counts = reply
        if not admitted:
            self._reject(call, ((None, None), (_counts(counts, 0), rl)), now, model)
        call.state.setdefault(_SHARED_FALLBACKS, {})[model.name] = (bases, member)

    def leave_fallback(self, call: Call, model: Model) -> None:
        taken = call.state.get(_SHARED_FALLBACKS, {}).pop(model.name, None)
        if taken is None:
            super().leave_fallback(call, model)  # counted locally (or not at all)
            return
        self.release(*taken, charged_tokens(call) if served_by(call, model) else 0)

    # -- out ------------------------------------------------------------------------------
    def post_call(self, call: Call) -> None:
        taken = call.state.pop(_SHARED, None)
        if taken is None:
            super().post_call(call)  # counted locally (or not at all)
            return
        bases, member = taken
        tokens = charged_tokens(call)
        if tokens and call.model.rate_limit is not None and not served_by(call, call.model):
            # a fallback produced them: charged to the key (the bases before the model's, the last), not the model
            self.release(bases, member, 0)
            if len(bases) > 1:
                self.release(bases[:-1], _EMPTY, tokens)
        else:
            self.release(bases, member, tokens)

    def release(self, bases: tuple[bytes, ...], member: bytes, tokens: int) -> None:
        """Give back what :meth:`admit` took: the lease (if any) and ``tokens`` to charge."""
        if member is not _EMPTY:
            self.leases.pop(member, None)
        if member is not _EMPTY or tokens:
            self._queue_release(bases, member, tokens)

    def _queue_release(self, bases: tuple[bytes, ...], member: bytes, tokens: int) -> None:
        """A release goes with the next :data:`SYNC`: an admission's, or its own after
        :data:`RELEASE_DELAY` s when no request comes first."""
        self._releases.append((bases, member, tokens))
        if self._sender is None and self._release_timer is None:
            self._release_timer = asyncio.get_running_loop().call_later(RELEASE_DELAY, self._release_due)

    def _release_due(self) -> None:
        self._release_timer = None
        if self._releases and self._sender is None:
            self._sync()

    def _sync(self) -> None:
        """Send one :data:`SYNC` with every release and admission queued so far (pipelined: it does
        not wait for the SYNCs before it); :meth:`_synced` hands out the reply."""
        admissions, releases = self._admissions, self._releases
        self._admissions, self._releases, self._sender = [], [], None
        if self._release_timer is not None:  # (left armed, it would wake an idle process for nothing)
            self._release_timer.cancel()
            self._release_timer = None
        if not self.shared:
            releases = []  # their leases expire by themselves; their tokens go uncounted
        if not admissions and not releases:
            return
        keys, args = [], [self._now_arg(), self._ttl, bulk(len(releases))]
        for bases, member, tokens in releases:
            keys += bases
            args += (_N[len(bases)], member, bulk(tokens))
        for bases, member, limits, _ in admissions:
            keys += bases
            args += (_N[len(bases)], member, limits)
        self.syncing += 1
        had_releases = bool(releases)
        self.pipe.send(SYNC_SCRIPT.call(keys, args), lambda reply, err: self._synced(reply, err, admissions, had_releases))

    def _synced(self, reply, err: BaseException | None, admissions: list, had_releases: bool) -> None:
        """Each admission's future gets ``(admitted, now_s, counts)``, or None when Redis failed."""
        self.syncing -= 1
        if not self.syncing and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if err is not None:
            if isinstance(err, _STORE_ERRORS):
                if had_releases:
                    self.count_error()
                if isinstance(err, ResponseError):  # it answered, with an error: not an outage
                    self._refused(str(err))
                else:
                    self._lost(err)
            for *_, fut in admissions:  # nobody waits in vain
                if not fut.done():
                    fut.set_result(None)
            return
        now, at, failed = reply[0] / 1000, 1, False
        for bases, member, _, fut in admissions:
            n = len(bases)
            status = reply[at]
            result = (status, now, reply[at + 1:at + 1 + 5 * n]) if status >= 0 else None  # -1: failed in Redis
            failed = failed or result is None
            at += 1 + 5 * n
            if fut.cancelled():  # the client went away while waiting: give back what it got
                if status == 1 and member is not _EMPTY:
                    self._queue_release(bases, member, 0)
                continue
            fut.set_result(result)
        if at < len(reply):  # a release or an admission failed in Redis: its text
            if had_releases and not failed:
                self.count_error()  # (a failed admission is counted by its request)
            text = reply[at]
            self._refused(text.decode(errors="replace") if isinstance(text, bytes) else str(text))

    def _refused(self, text: str) -> None:
        """Redis answered but refused to count (an error reply: writes refused under ``maxmemory``,
        a counter that is not a number): the requests concerned are handled as when Redis is
        unreachable (``on_store_error``), the others go on being counted. Logged at most once per
        :data:`REFUSAL_LOG_INTERVAL` s, with how many came since the last line."""
        self._refusals += 1
        now = time.monotonic()
        if now - self._refusal_logged < REFUSAL_LOG_INTERVAL:
            return
        more = f" ({self._refusals - 1} more since the last report)" if self._refusals > 1 else ""
        log.warning("rate-limit store %s refused to count: %s%s; those requests were handled as with "
                    "Redis unreachable (on_store_error: %s)", redacted(self.cfg.url), text[:300], more,
                    self.cfg.on_store_error)
        self._refusal_logged, self._refusals = now, 0

    # -- leases -----------------------------------------------------------------------------
    def _ensure_renewer(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        """Every third of the lease TTL, extend every lease this process holds (one call)."""
        ttl = self.cfg.lease_ttl_ms
        while True:
            await asyncio.sleep(ttl / 3000)
            if not self.leases or not self.shared:
                continue
            keys, args = [], [self._now_arg(), self._ttl]
            for member, bases in self.leases.items():
                keys += bases
                args += (_N[len(bases)], member)
            try:
                failures = await self.pipe.send(RENEW_SCRIPT.call(keys, args))
            except ResponseError as e:  # it answered, with an error: not an outage
                self.count_error()
                self._refused(str(e))
            except _STORE_ERRORS as e:
                self.count_error()
                self._lost(e)
            else:
                if failures:
                    self.count_error()
                    self._refused(f"{failures} lease renewals failed")

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
        if self._probe is None and not self._closing and not self.pipe.closed:
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        try:
            while True:
                await asyncio.sleep(PROBE_INTERVAL)
                try:  # an empty SYNC, not a PING: a Redis that answers PING may still hold back scripts (CLIENT PAUSE WRITE)
                    await self.pipe.send(SYNC_SCRIPT.call([], [self._now_arg(), self._ttl, _N[0]]))
                except _STORE_ERRORS:
                    continue
                self.shared = True
                log.warning("rate-limit store %s reachable again: limits are shared again", redacted(self.cfg.url))
                return
        finally:
            self._probe = None

    # -- helpers ---------------------------------------------------------------------------------
    def _now_arg(self) -> bytes:
        return _MINUS1 if self.redis_clock is None else bulk(math.floor(self.redis_clock() * 1000))

    def _new_member(self) -> bytes:
        self._seq += 1
        return bulk(f"{self._lease_prefix}{self._seq}")

    def _base(self, kind: str, identity: str, entity_id: str | None) -> bytes:
        """The packed Redis key base of one key, model or deployment: a hash, so no secret is ever
        written to Redis (made once per entity and configuration)."""
        k = (kind, identity, entity_id)
        base = self._bases.get(k)
        if base is None:
            h = hashlib.sha256(f"{identity}\0{entity_id or ''}".encode()).hexdigest()[:32]
            base = self._bases[k] = bulk(f"{self.cfg.key_prefix}rl:{kind}:{h}")
        return base

    def _limits_arg(self, krl: RateLimit | None, mrl: RateLimit | None) -> bytes:
        """The packed limits of a request's entities (made once per pair of RateLimit objects)."""
        k = (id(krl), id(mrl))
        hit = self._limit_args.get(k)
        if hit is None or hit[0] is not krl or hit[1] is not mrl:  # (ids of collected objects get reused)
            parts = [_limits(rl) for rl in (krl, mrl) if rl is not None]
            hit = self._limit_args[k] = (krl, mrl, bulk(" ".join(parts)))
        return hit[2]

    def on_swap(self, old: Snapshot, new: Snapshot) -> None:
        super().on_swap(old, new)
        self._bases.clear()  # names of gone entities are not kept (live ones are re-made on use)
        self._limit_args.clear()

    async def aclose(self) -> None:
        """Send the last releases (one SYNC, bounded by ``timeout_ms``; none while Redis is out),
        stop renewing and probing, close the connection."""
        self._closing = True  # a SYNC failing now starts no probe (it would wait for Redis to come back)
        tasks = [t for t in (self._renewer, self._probe) if t is not None]
        for t in tasks:
            t.cancel()
        if self._releases and self._sender is None:
            self._release_due()
        if self._sender is not None:
            self._sender.cancel()
            self._sync()
        if self.syncing:  # the last SYNCs' replies (the pipe's timeout bounds the wait)
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.pipe.aclose()


def store_unavailable() -> GatewayError:
    """The 429 of ``on_store_error: deny`` while Redis is unreachable."""
    return GatewayError(
        429, "Rate limits cannot be checked right now: the gateway's rate-limit store (Redis) is "
             "unreachable, and the gateway is set to refuse requests then. Please try again in 1s.",
        "rate_limit_error", "rate_limit_store_unavailable", {"Retry-After": "1"})
