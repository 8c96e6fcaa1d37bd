"""Flow control on Redis (:class:`~qtasks.components.FlowControl` of the Redis global config):
one atomic script per decision, timed by the server's ``TIME`` so the workers' clocks never
matter.

Every key shares the hash tag ``{<prefix>:flow}`` (so the batched slot renewal is one script
on a cluster too). For a name ``n`` chosen by the core (``rate:<task>``,
``slots:<task>:<key>``, ``unique:<key>``), ``{...}:n`` is:

- a rate: HASH ``tat`` (GCRA theoretical arrival time, ms), ``i`` interval (ms), ``b`` burst;
- a concurrency key: ZSET holder -> lease end (ms), with ``:s`` HASH holder -> start (ms),
  ``:w`` ZSET waiter -> next try (ms) and ``:m`` HASH ``hold`` (mean hold, ms) and
  ``limit``;
- a unique key: STRING holder (with the ``unique_for`` TTL, which ends the hold even of a task
  still pending).

``{...}:names`` is a ZSET name -> last use (ms) of the rate and slot names, for ``qtasks
inspect``. Every key expires when unused for a while, so nothing stays behind.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qtasks.components import SlotRenewal
from qtasks.memory.global_config import HOLD_GUESS, HOLD_WEIGHT
from qtasks_redis import shared_lua
from qtasks_redis.connection import Client, RedisTarget, Script
from qtasks_redis.failures import guarded

_NOW = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
-- Note name as used now in the names index, which forgets names idle for an hour.
local function names(key, name)
  redis.call('ZADD', key, now, name)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - 3600000)
  redis.call('PEXPIRE', key, 3600000)
end
"""

# KEYS: rate hash, names. ARGV: interval_ms, burst, max_wait_ms ('' for none), name.
# Returns the wait in ms (a string), or nil when it is above max_wait (nothing reserved).
_RESERVE = Script(
    _NOW
    + r"""
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local f = redis.call('HMGET', KEYS[1], 'tat', 'i')
local tat, old = tonumber(f[1]) or now, tonumber(f[2])
if tat < now then tat = now end
-- The rate changed (a redeploy): the backlog reserved at the old rate, at the new one.
if old and old > 0 and old ~= interval then tat = now + (tat - now) * interval / old end
local wait = tat - (burst - 1) * interval - now
if wait < 0 then wait = 0 end
local max_wait = tonumber(ARGV[3])
if max_wait and wait > max_wait then return false end
redis.call('HSET', KEYS[1], 'tat', string.format('%.6f', tat + interval), 'i', ARGV[1],
           'b', ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tat + interval - now) + 60000)
names(KEYS[2], ARGV[4])
return string.format('%.3f', wait)
"""
)

# KEYS: rate hash. Returns 1 when a reservation ahead of now was given back, else 0.
_RELEASE_RATE = Script(
    _NOW
    + r"""
local f = redis.call('HMGET', KEYS[1], 'tat', 'i')
local tat, interval = tonumber(f[1]), tonumber(f[2])
if not tat or not interval or tat <= now then return 0 end
local back = tat - interval
if back < now then back = now end
redis.call('HSET', KEYS[1], 'tat', string.format('%.6f', back))
return 1
"""
)

_SLOT_PRELUDE = (
    _NOW
    + r"""
local K_LEASES, K_SINCE, K_WAIT, K_META = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local function prune()
  for _, holder in ipairs(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now)) do
    redis.call('HDEL', K_SINCE, holder)
  end
  redis.call('ZREMRANGEBYSCORE', K_LEASES, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', K_WAIT, '-inf', now - 1000)
end
local function keep(ms)
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ms) end
end
"""
)

# KEYS: leases, since, waiting, meta, names. ARGV: limit, holder, lease_ms, name, hold_guess_ms,
# waiter. Returns '0' when taken, else the wait in ms (see FlowControl.acquire_slot).
_ACQUIRE = Script(
    _SLOT_PRELUDE
    + r"""
local limit, holder, lease, waiter = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[6]
local ttl = math.max(lease * 2, 600000)
prune()
redis.call('HSET', K_META, 'limit', ARGV[1])
names(KEYS[5], ARGV[4])
if redis.call('ZSCORE', K_LEASES, holder) or redis.call('ZCARD', K_LEASES) < limit then
  redis.call('ZADD', K_LEASES, now + lease, holder)
  redis.call('HSETNX', K_SINCE, holder, string.format('%.3f', now))
  redis.call('ZREM', K_WAIT, waiter)
  keep(ttl)  -- after the writes: PEXPIRE of a key not created yet does nothing
  return '0'
end
-- Only the waiters due back before this one are ahead of it (every waiter, for a new one):
-- counting all of them gave every waiter deferred again the same delay, a herd.
local due = redis.call('ZSCORE', K_WAIT, waiter)
local ahead
if due then
  ahead = redis.call('ZCOUNT', K_WAIT, '-inf', '(' .. due)
else
  ahead = redis.call('ZCARD', K_WAIT)
end
local hold = tonumber(redis.call('HGET', K_META, 'hold')) or tonumber(ARGV[5])
local earliest = tonumber(redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')[2]) - now
local wait = math.min(hold * (math.floor(ahead / limit) + 1), earliest)
if wait < 10 then wait = 10 end
redis.call('ZADD', K_WAIT, now + wait, waiter)
keep(ttl)
return string.format('%.3f', wait)
"""
)

# KEYS: leases, since, waiting, meta. ARGV: holder, weight of the latest hold time, '1' to
# wake a waiter. Returns the waiter woken (counted as due now), or 0.
_RELEASE = Script(
    _SLOT_PRELUDE
    + r"""
if redis.call('ZREM', K_LEASES, ARGV[1]) == 0 then return 0 end
local since = tonumber(redis.call('HGET', K_SINCE, ARGV[1]))
redis.call('HDEL', K_SINCE, ARGV[1])
if since then
  local held, w = now - since, tonumber(ARGV[2])
  local hold = tonumber(redis.call('HGET', K_META, 'hold')) or held
  redis.call('HSET', K_META, 'hold', string.format('%.3f', (1 - w) * hold + w * held))
end
if ARGV[3] ~= '1' then return 0 end
local woken = redis.call('ZRANGEBYSCORE', K_WAIT, '(' .. now, '+inf', 'LIMIT', 0, 1)[1]
if not woken then return 0 end
redis.call('ZADD', K_WAIT, now, woken)
return woken
"""
)

# KEYS: the lease ZSET, since HASH and meta HASH of each slot. ARGV: lease_ms, then each
# slot's holder and limit ('' for none). Returns a SlotRenewal per slot: 1 renewed, 2 taken back,
# 3 held with the key over its limit, 0 not held (no limit given). A slot no longer held is
# taken back when a limit is given: the core renews only runs still going on (see
# FlowControl.extend_slots). A renewed slot's keys get _ACQUIRE's TTL again: holders that run
# long with no new acquire keep their key.
_EXTEND = Script(
    _NOW
    + r"""
local out = {}
local lease = tonumber(ARGV[1])
local ttl = math.max(lease * 2, 600000)
for i = 1, (#ARGV - 1) / 2 do
  local k = 3 * i - 2
  local leases, holder, limit = KEYS[k], ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  local score = tonumber(redis.call('ZSCORE', leases, holder))
  local found = 0
  if score and score > now then
    redis.call('ZADD', leases, 'XX', now + lease, holder)
    found = 1
  elseif limit then
    -- Past the limit if need be; no start time (it stays out of the mean hold time).
    for _, gone in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
      redis.call('HDEL', KEYS[k + 1], gone)
    end
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
    redis.call('ZADD', leases, now + lease, holder)
    redis.call('HSETNX', KEYS[k + 2], 'limit', ARGV[2 * i + 1])
    found = 2
  end
  if found > 0 then
    if limit and redis.call('ZCOUNT', leases, '(' .. now, '+inf') > limit then found = 3 end
    for j = k, k + 2 do redis.call('PEXPIRE', KEYS[j], ttl) end
  end
  out[i] = found
end
return out
"""
)

# KEYS: unique key. ARGV: holder, ttl_ms ('' for none), replace ('' for none).
# Returns nil when set, else the holder kept.
_CLAIM_UNIQUE = Script(
    r"""
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[3] then return cur end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return false
"""
)

PUBLISH_NEW_UNIQUE = Script(
    r"""
-- _CLAIM_UNIQUE, then, when the key was claimed, the shared server's PUBLISH_NEW (record and
-- message). KEYS and ARGV are PUBLISH_NEW's (its nonce last); four more ARGV: the unique key
-- (its name, not in KEYS: this runs only outside Redis Cluster, as PUBLISH_NEW), holder,
-- ttl_ms ('' for none), replace (''). Returns the holder kept (nothing written), or
-- PUBLISH_NEW's reply. The call re-sent after its first run wrote the record (the record
-- carries its nonce) claims nothing: the task's end may have freed the key since.
local n = #ARGV
if redis.call('HGET', KEYS[1], 'p') == ARGV[n - 4] then return 1 end
local ukey, holder, ttl, replace = ARGV[n - 3], ARGV[n - 2], ARGV[n - 1], ARGV[n]
local held = redis.call('GET', ukey)
if held and held ~= replace then return held end
if ttl ~= '' then
  redis.call('SET', ukey, holder, 'PX', ttl)
else
  redis.call('SET', ukey, holder)
end
do
"""
    + shared_lua.PUBLISH_NEW.source
    + "\nend\n"
)
"""The unique-key claim folded into the shared server's publish (see
:meth:`~qtasks_redis.RedisBroker.publish_new_unique`)."""

# KEYS: unique key. ARGV: holder.
_RELEASE_UNIQUE = Script(
    r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
)

# KEYS: names. ARGV: key tag. Returns {name, json, ...} for every name used lately.
_STATE = Script(
    _NOW
    + r"""
local out = {}
for _, name in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local base = ARGV[1] .. ':' .. name
  local state
  if string.sub(name, 1, 5) == 'rate:' then
    local f = redis.call('HMGET', base, 'tat', 'i', 'b')
    if f[1] then
      local tat, interval, burst = tonumber(f[1]), tonumber(f[2]), tonumber(f[3])
      if not interval or interval <= 0 then interval = 0.000001 end  -- a rate stored by an
      -- older release that rounded a huge one to 0 (since refused at declaration)
      if tat < now then tat = now end
      local ahead = (tat - now) / interval
      local tokens, waiting = burst - ahead, math.ceil(ahead - burst - 0.000001)
      if tokens < 0 then tokens = 0 end
      if waiting < 0 then waiting = 0 end
      state = {tokens = tokens, burst = burst, per_second = 1000 / interval, waiting = waiting}
    end
  else
    redis.call('ZREMRANGEBYSCORE', base, '-inf', now)
    state = {held = redis.call('ZCARD', base),
             limit = tonumber(redis.call('HGET', base .. ':m', 'limit')) or 0,
             waiting = redis.call('ZCOUNT', base .. ':w', now - 1000, '+inf')}
  end
  if state then
    -- One key's figures that cannot be encoded must not hide every other key's.
    local ok, text = pcall(cjson.encode, state)
    out[#out + 1] = name
    out[#out + 1] = ok and text or cjson.encode({error = tostring(text)})
  end
end
return out
"""
)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def _interval_ms(seconds: float) -> str:
    """A rate's interval in ms, to the ns: rounded to the µs, a rate of 300,000/s would be
    enforced as 333,333/s (a rate above 1,000,000/s is refused at declaration)."""
    return f"{seconds * 1000:.6f}"


class RedisFlowControl:
    """The :class:`~qtasks.components.FlowControl` methods of
    :class:`~qtasks_redis.global_config.RedisGlobalConfig` (a mixin: it provides ``target``,
    ``prefix`` and ``_require``)."""

    target: RedisTarget
    prefix: str

    if TYPE_CHECKING:  # provided by the class this is mixed into (RedisGlobalConfig)

        def _require(self) -> Client: ...

    def _flow_key(self, name: str) -> str:
        return f"{{{self.prefix}:flow}}:{name}"

    async def _flow(self, script: Script, keys: Sequence[str], *args: Any) -> Any:
        return await guarded(self.target, script(self._require(), keys, args))

    def _slot_keys(self, name: str) -> tuple[str, str, str, str]:
        base = self._flow_key(name)
        return base, f"{base}:s", f"{base}:w", f"{base}:m"

    async def reserve_rate(
        self, key: str, interval: float, burst: int, max_wait: float | None
    ) -> float | None:
        """See :meth:`FlowControl.reserve_rate` (GCRA, one script)."""
        keys = (self._flow_key(key), self._flow_key("names"))
        limit = "" if max_wait is None else _ms(max_wait)
        reply = await self._flow(_RESERVE, keys, _interval_ms(interval), burst, limit, key)
        return None if reply is None else float(reply) / 1000

    async def release_rate(self, key: str) -> bool:
        """See :meth:`FlowControl.release_rate` (one script)."""
        return bool(await self._flow(_RELEASE_RATE, (self._flow_key(key),)))

    async def acquire_slot(
        self, key: str, limit: int, holder: str, lease: float, waiter: str | None = None
    ) -> float:
        """See :meth:`FlowControl.acquire_slot` (one script)."""
        keys = (*self._slot_keys(key), self._flow_key("names"))
        waiter = holder if waiter is None else waiter
        args = (limit, holder, _ms(lease), key, _ms(HOLD_GUESS), waiter)
        reply = await self._flow(_ACQUIRE, keys, *args)
        return float(reply) / 1000

    async def release_slot(self, key: str, holder: str) -> None:
        """See :meth:`FlowControl.release_slot` (one script)."""
        await self._flow(_RELEASE, self._slot_keys(key), holder, HOLD_WEIGHT, "0")

    async def release_slot_waking(self, key: str, holder: str) -> str | None:
        """See :class:`~qtasks.components.SlotWake` (one script)."""
        reply = await self._flow(_RELEASE, self._slot_keys(key), holder, HOLD_WEIGHT, "1")
        return reply.decode() if isinstance(reply, bytes) else None

    async def extend_slots(
        self, slots: Sequence[tuple[str, str]], lease: float, limits: Sequence[int] | None = None
    ) -> list[SlotRenewal]:
        """See :meth:`FlowControl.extend_slots` (one script for all of them)."""
        if not slots:
            return []
        keys: list[str] = []
        args: list[Any] = [_ms(lease)]
        for i, (key, holder) in enumerate(slots):
            leases, since, _waiting, meta = self._slot_keys(key)
            keys += (leases, since, meta)
            args += (holder, "" if limits is None else limits[i])
        reply = await self._flow(_EXTEND, keys, *args)
        return [SlotRenewal(int(found)) for found in reply]

    def unique_args(
        self, key: str, holder: str, ttl: float | None, replace: str | None
    ) -> tuple[str, str, str, str]:
        """The unique key's name, holder, TTL in ms and ``replace`` as the scripts take them."""
        ttl_ms = "" if ttl is None else str(max(int(ttl * 1000), 1))
        return self._flow_key(key), holder, ttl_ms, replace or ""

    async def claim_unique(
        self, key: str, holder: str, ttl: float | None, replace: str | None = None
    ) -> str | None:
        """See :meth:`FlowControl.claim_unique` (one script)."""
        ukey, *args = self.unique_args(key, holder, ttl, replace)
        reply = await self._flow(_CLAIM_UNIQUE, (ukey,), *args)
        return None if reply is None else str(reply.decode())

    async def release_unique(self, key: str, holder: str) -> bool:
        """See :meth:`FlowControl.release_unique` (one script)."""
        return bool(await self._flow(_RELEASE_UNIQUE, (self._flow_key(key),), holder))

    async def flow_state(self) -> dict[str, dict[str, float]]:
        """See :meth:`FlowControl.flow_state` (one script)."""
        tag = f"{{{self.prefix}:flow}}"
        reply = await self._flow(_STATE, (self._flow_key("names"),), tag)
        out: dict[str, dict[str, float]] = {}
        for i in range(0, len(reply), 2):
            state = json.loads(reply[i + 1])
            if "tokens" in state and "burst" in state:
                state["tokens"] = round(min(state["tokens"], state["burst"]), 2)
            out[reply[i].decode()] = state
        return out
