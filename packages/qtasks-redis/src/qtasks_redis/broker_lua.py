"""The broker's Lua scripts: one atomic script per state transition of a message.

Every script gets the same twelve keys of one queue (all under the queue's hash tag, so a
script touches one Redis Cluster slot and declares every key it uses):

1. ``ready``     ZSET id -> priority * 1e13 + sequence (lowest first: priority, then FIFO)
2. ``delayed``   ZSET id -> due time (ms since the epoch, Redis clock)
3. ``inflight``  ZSET id -> lease deadline (ms)
4. ``body``      HASH id -> message bytes
5. ``meta``      HASH id -> priority
6. ``att``       HASH id -> deliveries since publish or requeue
7. ``tok``       HASH id -> token of the current delivery (fences stale holders)
8. ``seq``       STRING counter for FIFO order
9. ``notify``    LIST of wake-up tokens, BLPOPed by idle consumers
10. ``dlbody``   HASH id -> dead letter bytes
11. ``dlmeta``   HASH id -> JSON {reason, priority, deliveries, dead_at}
12. ``dlq``      ZSET id -> sequence number, oldest first

and, passed to ``CLAIM_NOTICED`` only, a thirteenth and a fourteenth: ``pending``, HASH id ->
reason of the messages its claims dead-lettered whose notice no consumer has told yet, and
``pending:at``, ZSET id -> when a consumer last took that note to tell it (ms) (see
``CLAIM_NOTICED``); ``FORGET_NOTES`` takes only these two, ``SWEEP_NOTES`` these and
``body``; ``REQUEUE_DEAD`` takes them too, to drop the notes of the dead letters it requeues.

And, built from ``inflight``'s name (same slot), ``<inflight>:c:<consumer>``: STRING, what
the consumer's last claim call leased or dead-lettered (its nonce, then the JSON
``[[id, ...], [dead id, reason, ended, ...]]``, ``ended`` 1 when ``on_dead`` said it ended the
dead letter's record, else 0; the tokens are ``<nonce>.<n>``), until the consumer's next claim
that leases or dead-letters overwrites it or the consumer ends (a day at most, for one that
was killed), so that the call re-sent after a lost reply, however long the outage, hands those
back, and names those dead letters again, rather than leasing more (see ``CLAIM_BODY``).

Time is always the Redis server's (``TIME``), so clients with skewed clocks agree on leases.

Dead-letter retention (``dead_letter_ttl``, ``max_dead_letters``) travels as two arguments,
``ttl_ms`` and ``cap`` (``''`` for none), of the scripts that dead-letter or read dead letters.
A dead letter's sequence number and ``dead_at`` are taken in the same script, from the queue's
counter and the server's clock, so ``dlq`` is in ``dead_at`` order too: the expired ones are
at its head, and dropping them is a walk from the head that stops at the first one kept (no
second index, and dead letters written before retention existed expire as well). A clock set
back breaks that order only for the letters that died meanwhile: those are filtered on read.

Over ~500 lines: Lua source, one script per transition of a message, sharing the helpers
above them.
"""

from __future__ import annotations

from qtasks_redis.connection import Script
from qtasks_redis.lua_time import SERVER_TIME

KEY_NAMES = (
    "ready",
    "delayed",
    "inflight",
    "body",
    "meta",
    "att",
    "tok",
    "seq",
    "notify",
    "dlbody",
    "dlmeta",
    "dlq",
)

PRELUDE = (
    SERVER_TIME
    + r"""
local K_READY, K_DELAYED, K_INFLIGHT, K_BODY, K_META, K_ATT, K_TOK, K_SEQ, K_NOTIFY,
      K_DLBODY, K_DLMETA, K_DLQ =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9],
  KEYS[10], KEYS[11], KEYS[12]
local SPAN = 10000000000000

local function ready_score(prio)
  -- Priorities are clamped to +-899 so the score stays an exact integer in a double.
  local p = tonumber(prio) or 0
  if p > 899 then p = 899 elseif p < -899 then p = -899 end
  return p * SPAN + redis.call('INCR', K_SEQ)
end

local function notify()
  -- At most 64 wake-ups wait (none blocks on a list that long): a push past that is taken
  -- back, in the same call.
  if redis.call('RPUSH', K_NOTIFY, '1') > 64 then redis.call('RPOP', K_NOTIFY) end
end

local function schedule(id, prio, eta, now)
  if eta and eta > now then
    redis.call('ZADD', K_DELAYED, eta, id)
  else
    redis.call('ZADD', K_READY, ready_score(prio), id)
  end
end

local function forget(id)
  redis.call('ZREM', K_INFLIGHT, id)
  redis.call('HDEL', K_BODY, id)
  redis.call('HDEL', K_META, id)
  redis.call('HDEL', K_ATT, id)
  redis.call('HDEL', K_TOK, id)
end

local function drop_dead(id)
  redis.call('ZREM', K_DLQ, id)
  redis.call('HDEL', K_DLBODY, id)
  redis.call('HDEL', K_DLMETA, id)
end

-- Whether dead letter id died at or before cutoff (seconds, as dead_at); one whose meta
-- cannot be read counts as expired, so it cannot hold the others back.
local function dead_expired(id, cutoff)
  local ok, meta = pcall(cjson.decode, redis.call('HGET', K_DLMETA, id) or '')
  local at = ok and type(meta) == 'table' and tonumber(meta.dead_at) or 0
  return at <= cutoff
end

-- Drop at most budget dead letters, oldest first: those over the cap, then those older than
-- the TTL (ttl_ms, cap: numbers, or nil for none). Returns how many it dropped.
local function prune_dead(ttl_ms, cap, now, budget)
  local n = 0
  if cap then
    local over = redis.call('ZCARD', K_DLQ) - cap
    if over > 0 then
      for _, id in ipairs(redis.call('ZRANGE', K_DLQ, 0, math.min(over, budget) - 1)) do
        drop_dead(id)
        n = n + 1
      end
    end
  end
  if ttl_ms then
    local cutoff = (now - ttl_ms) / 1000
    while n < budget do
      local head = redis.call('ZRANGE', K_DLQ, 0, 0)[1]
      if not head or not dead_expired(head, cutoff) then break end
      drop_dead(head)
      n = n + 1
    end
  end
  return n
end

-- Dead-letter a message; then drop at most 100 of the oldest dead letters past the
-- retention (ttl_ms, cap: the scripts' arguments, '' for none), so that a flood of poison
-- messages neither grows the queue without bound nor makes one call slow.
local function dead(id, body, reason, prio, deliveries, now, ttl_ms, cap)
  redis.call('HSET', K_DLBODY, id, body)
  redis.call('HSET', K_DLMETA, id, cjson.encode({
    reason = reason, priority = tonumber(prio) or 0,
    deliveries = tonumber(deliveries) or 0, dead_at = now / 1000}))
  -- Ordered by the queue's sequence, not the clock: several can die in one millisecond.
  redis.call('ZADD', K_DLQ, redis.call('INCR', K_SEQ), id)
  forget(id)
  prune_dead(tonumber(ttl_ms), tonumber(cap), now, 100)
end

-- For the scripts that read dead letters (ARGV[1], ARGV[2]: ttl_ms, cap): drop up to 1000
-- past the retention; false when more may be left (the script returns -1 and the caller
-- runs it again), so that what it reads next holds no expired one.
local function pruned_for_read(now)
  return prune_dead(tonumber(ARGV[1]), tonumber(ARGV[2]), now, 1000) < 1000
end

local function back_to_ready(id)
  redis.call('ZREM', K_INFLIGHT, id)
  redis.call('HDEL', K_TOK, id)
  local prio = redis.call('HGET', K_META, id)
  if prio then redis.call('ZADD', K_READY, ready_score(prio), id) end
end

-- Move due delayed messages and expired leases to ready; return how many moved.
local function promote(now)
  local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', now, 'LIMIT', 0, 1000)
  for _, id in ipairs(due) do
    redis.call('ZREM', K_DELAYED, id)
    local prio = redis.call('HGET', K_META, id)
    if prio then redis.call('ZADD', K_READY, ready_score(prio), id) end
  end
  local expired = redis.call('ZRANGEBYSCORE', K_INFLIGHT, '-inf', now, 'LIMIT', 0, 1000)
  for _, id in ipairs(expired) do back_to_ready(id) end
  return #due + #expired
end

local function valid(id, token)
  return redis.call('HGET', K_TOK, id) == token
end
"""
)

PUBLISH = Script(
    PRELUDE
    + r"""
-- ARGV: id, body, priority, eta_ms ('' for now)
local id, prio = ARGV[1], ARGV[3]
if redis.call('HSET', K_BODY, id, ARGV[2]) == 0 then
  -- The same id published again replaces the old message, even a delivered one.
  redis.call('ZREM', K_INFLIGHT, id)
  redis.call('ZREM', K_READY, id)
  redis.call('ZREM', K_DELAYED, id)
  redis.call('HDEL', K_TOK, id)
  redis.call('HDEL', K_ATT, id)
end
redis.call('HSET', K_META, id, prio)
schedule(id, prio, tonumber(ARGV[4]), now_ms())
notify()
return 1
"""
)

CLAIM_BODY = r"""
-- ARGV: lease_ms, max_deliveries, count, '<consumer>/<nonce>' (the consumer: an id of the
-- claiming loop; the nonce: of this call, the same when the call is re-sent) (then what
-- on_claim reads), then the dead-letter retention: ttl_ms, cap (the last two, read only when
-- dead-lettering)
-- Returns {wait_ms_until_next_deadline or -1, id, body, priority, attempt, token, <what
-- on_claim appends>, ...}; the wait is only computed when the ready queue was emptied (fewer
-- than count claimed); the consumer blocks for it when it claimed nothing. A claim that met a
-- suspect (on one of its last two allowed deliveries, qtasks.components.alone_from: the
-- earlier ones were lost with their holders) stops there, the suspect claimed alone or left
-- for the next claim: the wait is then 0 (more is ready).
local lease, maxd, count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local alone_from = math.max(2, maxd - 1)
local consumer, nonce = string.match(ARGV[4], '^([^/]*)/(.*)$')
local NOTE_MS = 86400000
local now = now_ms()
-- A call re-sent after its reply was lost (the lane or redis-py retries it, or the consumer
-- claims again with its nonce): its first run leased messages under this nonce and wrote them
-- as this consumer's last claim, with the messages it dead-lettered. Hand back those it still
-- holds, leased again from now (the consumer counts their lease from this call), name the
-- dead letters again (on_dead, told it is a repeat) and lease
-- nothing more (before, they were leased to nobody until the lease ended, a delivery burnt
-- each, and the dead letters went untold). One key per consumer, overwritten by its next
-- claim: a GET per claim and a SET per claim that leased or dead-lettered, whatever the count.
-- It is kept as long as the consumer may claim again (deleted when it ends, at most a day:
-- NOTE_MS), not for one lease: the repeat comes after the outage, which may outlast a lease,
-- and the dead letters must be told still (their records ended, the hook fired).
local K_CLAIMED = K_INFLIGHT .. ':c:' .. consumer
local last = redis.call('GET', K_CLAIMED)
local out = {'-1'}
if last and string.sub(last, 1, #nonce + 1) == nonce .. ' ' then
  local before = cjson.decode(string.sub(last, #nonce + 2))
  for n = 1, #before[1] do
    local id, token = before[1][n], nonce .. '.' .. n
    local body = redis.call('HGET', K_BODY, id)
    if body and redis.call('HGET', K_TOK, id) == token then
      redis.call('ZADD', K_INFLIGHT, now + lease, id)
      out[#out + 1] = id
      out[#out + 1] = body
      out[#out + 1] = redis.call('HGET', K_META, id)
      out[#out + 1] = redis.call('HGET', K_ATT, id)
      out[#out + 1] = token
      on_claim(id, body, token, out)
    end
  end
  -- Told again, as a repeat (the third argument: whether the first run ended the record).
  for i = 1, #before[2], 3 do on_dead(before[2][i], before[2][i + 1], before[2][i + 2] == 1) end
  count = 0  -- nothing more: the rest finds nothing to do, and the reply ends as any other
end
-- Earliest delayed and lease deadlines: promote only when one is due.
local d = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
local l = redis.call('ZRANGE', K_INFLIGHT, 0, 0, 'WITHSCORES')
local moved = 0
if count > 0 and ((d[2] and tonumber(d[2]) <= now) or (l[2] and tonumber(l[2]) <= now)) then
  moved = promote(now)
  d = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
  l = redis.call('ZRANGE', K_INFLIGHT, 0, 0, 'WITHSCORES')
end
local n = 0
local claimed, dead_lettered = {}, {}
local empty, published, alone = false, false, false
while n < count and not empty and not alone do
  -- Pop what is still wanted in one call; dead-lettered ones are made up for by the next.
  local popped = redis.call('ZPOPMIN', K_READY, count - n)
  if #popped < 2 * (count - n) then empty = true end
  for i = 1, #popped, 2 do
    local id = popped[i]
    local body = false
    if not alone then body = redis.call('HGET', K_BODY, id) end
    if alone then
      -- After a suspect (below): back with the exact score it had, order unchanged.
      redis.call('ZADD', K_READY, popped[i + 1], id)
      empty = false
    elseif body then
      -- The priority is in the ready score, except where ready_score clamped it.
      local prio = math.floor(tonumber(popped[i + 1]) / SPAN)
      if prio >= 899 or prio <= -899 then
        prio = redis.call('HGET', K_META, id)
      else
        prio = tostring(prio)
      end
      local attempt = redis.call('HINCRBY', K_ATT, id, 1)
      if attempt >= alone_from and attempt <= maxd and n > 0 then
        -- A suspect (its earlier deliveries were lost with their holders: crashes, leases
        -- that ran out) is claimed alone, never beside others whose delivery it would cost
        -- if it kills its worker again: not this call's; back uncounted, exact score kept.
        redis.call('HINCRBY', K_ATT, id, -1)
        redis.call('ZADD', K_READY, popped[i + 1], id)
        alone, empty = true, false
      elseif attempt > maxd then
        local reason = 'delivery limit reached: delivered ' .. (attempt - 1) ..
          ' times without being settled (max_deliveries=' .. maxd .. ')'
        dead(id, body, reason, prio, attempt, now, ARGV[#ARGV - 1], ARGV[#ARGV])
        local opened, ended = on_dead(id, reason)
        dead_lettered[#dead_lettered + 1] = id
        dead_lettered[#dead_lettered + 1] = reason
        dead_lettered[#dead_lettered + 1] = ended and 1 or 0
        if opened then
          -- It published (a workflow's error callback): pop again, so this claim takes it
          -- or leaves its wake-up for another consumer, and the next deadline counts it.
          empty, published = false, true
        end
      else
        n = n + 1
        local token = nonce .. '.' .. n
        redis.call('HSET', K_TOK, id, token)
        redis.call('ZADD', K_INFLIGHT, now + lease, id)
        out[#out + 1] = id
        out[#out + 1] = body
        out[#out + 1] = prio
        out[#out + 1] = tostring(attempt)
        out[#out + 1] = token
        on_claim(id, body, token, out)
        claimed[n] = id
        if attempt >= alone_from then alone = true end  -- a suspect, alone: nothing more
      end
    end
  end
end
if n > 0 or #dead_lettered > 0 then
  redis.call('SET', K_CLAIMED, nonce .. ' ' .. cjson.encode({claimed, dead_lettered}), 'PX',
    math.max(lease, NOTE_MS))
end
if empty then
  -- Nothing left: stale wake-ups would only cause empty claims.
  redis.call('DEL', K_NOTIFY)
elseif moved > 0 or alone then
  notify()  -- this consumer took what it could; wake another for the rest
end
if alone and not empty then out[1] = '0' end  -- more is ready: claim again at once
if empty then
  -- The earliest deadline: a delayed message due, or a lease ending (those just taken too,
  -- as before they were taken).
  if published then d = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES') end
  local next_at = false
  if d[2] then next_at = tonumber(d[2]) end
  if l[2] and (not next_at or tonumber(l[2]) < next_at) then next_at = tonumber(l[2]) end
  if n > 0 and (not next_at or now + lease < next_at) then next_at = now + lease end
  -- At most a day: the consumer waits less than that anyway, and tostring() writes a number
  -- past 10^14 as '1.7e+15' (an eta in ms by mistake), which it could not read.
  if next_at then out[1] = tostring(math.min(math.max(next_at - now, 0), 86400000)) end
end
return out
"""
"""The claim loop, after a prelude that defines ``on_claim(id, body, token, out)``: called for
every claimed message, it may append fields of its own to ``out``; and ``on_dead(id, reason,
again)``: called for every message it dead-letters (``again`` nil), returning two values:
true when it published a message itself (the loop then pops the ready set again), and true
when it ended the message's record. A call re-sent after its reply was lost calls it again
for the messages its first run dead-lettered, ``again`` saying whether that run ended the
record: what it tells in its reply must be told again (the first reply is lost), but nothing
done twice."""

CLAIM = Script(
    PRELUDE
    + "local function on_claim(id, body, token, out) end\n"
    + "local function on_dead(id, reason) end\n"
    + CLAIM_BODY
)

CLAIM_NOTICED = Script(
    PRELUDE
    + r"""local function on_claim(id, body, token, out) end
local BURIED = {}
local K_PENDING, K_PENDING_AT = KEYS[13], KEYS[14]
-- KEYS[13], the pending notices (HASH id -> reason): each message this claim dead-letters is
-- noted there too, in the same atomic step, until the consumer has told it (FORGET_NOTES
-- once its buried() ended the record); KEYS[14] (ZSET id -> ms) says when a consumer took
-- the note to tell it: now, for this one. A consumer killed before it told the note, or
-- whose buried() could not write the record, leaves it; a claim a lease later takes it
-- (below). Kept the dead letters' retention: the keys expire ttl_ms after the last note,
-- and hold no more notes than cap (the oldest dropped, as the oldest dead letters are).
-- With neither (dead_letter_ttl and max_dead_letters None) they are not bounded, as the
-- dead letters themselves are not: there is at most one note per dead letter, and one only
-- outlives its claim's consumer when that consumer died or its storage failed, and then
-- only until some consumer of the queue claims again.
local function on_dead(id, reason)
  BURIED[#BURIED + 1] = id
  BURIED[#BURIED + 1] = reason
  redis.call('HSET', K_PENDING, id, reason)
  redis.call('ZADD', K_PENDING_AT, now_ms(), id)
  local ttl, cap = tonumber(ARGV[#ARGV - 1]), tonumber(ARGV[#ARGV])
  if cap then
    local over = redis.call('ZCARD', K_PENDING_AT) - cap
    if over > 0 then
      local popped = redis.call('ZPOPMIN', K_PENDING_AT, math.min(over, 100))
      for i = 1, #popped, 2 do redis.call('HDEL', K_PENDING, popped[i]) end
    end
  end
  if ttl then
    redis.call('PEXPIRE', K_PENDING, ttl)
    redis.call('PEXPIRE', K_PENDING_AT, ttl)
  end
end
"""
    + CLAIM_BODY.removesuffix("return out\n")
    + r"""
-- The notes no consumer took for a lease (its consumer was killed before it told them, or
-- its buried() failed): this claim takes up to 100 of them, for a lease (stamped now, so
-- that no other claim takes them meanwhile), and names them with its own. A note just
-- written is its consumer's for a lease: taken from it only if telling it takes longer, and
-- then told twice (buried() ends the record once). One ZRANGEBYSCORE per claim, on a key
-- that is most often absent. A note whose message lives again (published again under its
-- id: its body is back) is dropped, not told: told, it would end the new life's record.
local stale = redis.call('ZRANGEBYSCORE', K_PENDING_AT, '-inf', now - lease, 'LIMIT', 0, 100)
for _, id in ipairs(stale) do
  local reason = redis.call('HGET', K_PENDING, id)
  if reason and redis.call('HEXISTS', K_BODY, id) == 0 then
    redis.call('ZADD', K_PENDING_AT, now, id)
    BURIED[#BURIED + 1] = id
    BURIED[#BURIED + 1] = reason
  else
    redis.call('HDEL', K_PENDING, id)
    redis.call('ZREM', K_PENDING_AT, id)
  end
end
if #BURIED > 0 then out[#out + 1] = cjson.encode(BURIED) end
return out
"""
)
"""CLAIM that also returns the messages it dead-lettered: one more element, the JSON list
``[id, reason, id, reason, ...]``, when there are any (see
:class:`~qtasks.components.BuryNotice`). It takes a thirteenth and a fourteenth key,
``pending`` (``{<prefix>:<queue>}:pending``, HASH id -> reason) and ``pending:at`` (ZSET id ->
ms), where it also notes each of them until the consumer has told it; the list also names
the notes no consumer took for a lease (each taken for a lease by this claim). A claim that
dead-letters nothing only reads ``pending:at``."""

FORGET_NOTES = Script(
    r"""
-- KEYS: pending, pending:at (see CLAIM_NOTICED). ARGV: ids whose notice was told.
for i = 1, #ARGV, 1000 do  -- unpack takes a few thousand values at most
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  redis.call('ZREM', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return 1
"""
)
"""Delete the notes of the dead letters told (see ``CLAIM_NOTICED``)."""

SWEEP_NOTES = Script(
    r"""
-- KEYS: pending, pending:at (see CLAIM_NOTICED), body. Returns {id, reason, ...}: every note
-- of a message still dead. The note of one that lives again (published again under its id:
-- its body is back) is dropped: told, it would end the record of the new life.
local flat, out = redis.call('HGETALL', KEYS[1]), {}
for i = 1, #flat, 2 do
  if redis.call('HEXISTS', KEYS[3], flat[i]) == 1 then
    redis.call('HDEL', KEYS[1], flat[i])
    redis.call('ZREM', KEYS[2], flat[i])
  else
    out[#out + 1] = flat[i]
    out[#out + 1] = flat[i + 1]
  end
end
return out
"""
)
"""What a consumer that starts tells: the notes of ``CLAIM_NOTICED`` (see there)."""

ACK = Script(
    PRELUDE
    + r"""
-- ARGV: id, token
if not valid(ARGV[1], ARGV[2]) then return 0 end
forget(ARGV[1])
return 1
"""
)

NACK = Script(
    PRELUDE
    + r"""
-- ARGV: id, token, reason, ttl_ms, cap
local id = ARGV[1]
if not valid(id, ARGV[2]) then return 0 end
local body = redis.call('HGET', K_BODY, id)
local prio = redis.call('HGET', K_META, id)
local att = redis.call('HGET', K_ATT, id)
dead(id, body, ARGV[3], prio, att, now_ms(), ARGV[4], ARGV[5])
return 1
"""
)

REQUEUE = Script(
    PRELUDE
    + r"""
-- ARGV: id, token, delay_ms ('' for none), replace_body ('1'/'0'), body, count ('reset',
-- 'kept' or 'earlier': what the delivery count keeps, see Delivery.requeue; none: 'reset')
local id = ARGV[1]
if not valid(id, ARGV[2]) then return 0 end
local now = now_ms()
redis.call('ZREM', K_INFLIGHT, id)
redis.call('HDEL', K_TOK, id)
if ARGV[6] == 'earlier' then
  redis.call('HINCRBY', K_ATT, id, -1)
elseif ARGV[6] ~= 'kept' then
  redis.call('HSET', K_ATT, id, 0)
end
if ARGV[4] == '1' then redis.call('HSET', K_BODY, id, ARGV[5]) end
local delay = tonumber(ARGV[3])
local eta = false
if delay and delay > 0 then eta = now + delay end
schedule(id, redis.call('HGET', K_META, id), eta, now)
notify()
return 1
"""
)

EXTEND = Script(
    PRELUDE
    + r"""
-- ARGV: id, token, lease_ms
if not valid(ARGV[1], ARGV[2]) then return 0 end
redis.call('ZADD', K_INFLIGHT, 'XX', now_ms() + tonumber(ARGV[3]), ARGV[1])
return 1
"""
)

EXTEND_MANY = Script(
    PRELUDE
    + r"""
-- ARGV: lease_ms, id1, token1, id2, token2, ... Returns {1 or 0 per delivery}: one
-- renewal pass of a worker in one call, whatever the number of deliveries it holds.
local deadline = now_ms() + tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV, 2 do
  if valid(ARGV[i], ARGV[i + 1]) then
    redis.call('ZADD', K_INFLIGHT, 'XX', deadline, ARGV[i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""
)

RELEASE = Script(
    PRELUDE
    + r"""
-- ARGV: consumer, id1, token1, unhanded1, id2, ...: a consumer ends; hand its unsettled
-- deliveries back at once. unhanded '1': claimed but never handed to the worker, not a
-- delivery attempt: its count is taken back (else its next delivery would look lost with its
-- holder, a suspect). Its note of its last claim goes (see CLAIM_BODY): it claims no more.
redis.call('DEL', K_INFLIGHT .. ':c:' .. ARGV[1])
local n = 0
for i = 2, #ARGV, 3 do
  if valid(ARGV[i], ARGV[i + 1]) then
    if ARGV[i + 2] == '1' then redis.call('HINCRBY', K_ATT, ARGV[i], -1) end
    back_to_ready(ARGV[i])
    n = n + 1
  end
end
if n > 0 then notify() end
return n
"""
)

CANCEL = Script(
    PRELUDE
    + r"""
-- ARGV: id. Only a message that is waiting (ready or delayed) can be cancelled.
local id = ARGV[1]
if redis.call('HEXISTS', K_TOK, id) == 1 then return 0 end
local removed = redis.call('ZREM', K_READY, id) + redis.call('ZREM', K_DELAYED, id)
if removed == 0 then return 0 end
forget(id)
return 1
"""
)

BRING_FORWARD = Script(
    PRELUDE
    + r"""
-- ARGV: id. A delayed message made ready now (BringForward); 0 when it is not delayed.
local id = ARGV[1]
if redis.call('ZREM', K_DELAYED, id) == 0 then return 0 end
local prio = redis.call('HGET', K_META, id)
if prio then redis.call('ZADD', K_READY, ready_score(prio), id) end
notify()
return 1
"""
)

STATS = Script(
    PRELUDE
    + r"""
-- ARGV: ttl_ms, cap (dead-letter retention). Returns {delayed, in_flight, dead, priority1,
-- count1, priority2, count2, ...}, or -1: call again (see pruned_for_read).
local now = now_ms()
if not pruned_for_read(now) then return -1 end
promote(now)
local out = {redis.call('ZCARD', K_DELAYED), redis.call('ZCARD', K_INFLIGHT),
             redis.call('HLEN', K_DLBODY)}
local lo = '-inf'
while true do
  local first = redis.call('ZRANGEBYSCORE', K_READY, lo, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if not first[1] then break end
  local p = math.floor(tonumber(first[2]) / SPAN)
  local hi = string.format('%.0f', (p + 1) * SPAN)
  out[#out + 1] = p
  out[#out + 1] = redis.call('ZCOUNT', K_READY, string.format('%.0f', p * SPAN), '(' .. hi)
  lo = hi
end
return out
"""
)

DEAD_LETTERS = Script(
    PRELUDE
    + r"""
-- ARGV: ttl_ms, cap, limit. Returns {id, body, meta_json, ...}, oldest first, or -1: call
-- again (see pruned_for_read).
local now = now_ms()
if not pruned_for_read(now) then return -1 end
local limit, ttl = tonumber(ARGV[3]), tonumber(ARGV[1])
local cutoff = ttl and (now - ttl) / 1000
local out, from, seen = {}, 0, 0
-- Past the head, one that died while the clock was set back may be expired: it is dropped
-- instead of listed (looking at no more than 1000 beyond the limit).
while #out < 3 * limit and seen < limit + 1000 do
  local ids = redis.call('ZRANGE', K_DLQ, from, from + limit - 1)
  if #ids == 0 then break end
  seen = seen + #ids
  for _, id in ipairs(ids) do
    if cutoff and dead_expired(id, cutoff) then
      drop_dead(id)
    elseif #out < 3 * limit then
      from = from + 1
      out[#out + 1] = id
      out[#out + 1] = redis.call('HGET', K_DLBODY, id) or ''
      out[#out + 1] = redis.call('HGET', K_DLMETA, id) or '{}'
    end
  end
end
return out
"""
)

DEAD_IDS = r"""
local now = now_ms()
if not pruned_for_read(now) then return -1 end
local ttl = tonumber(ARGV[1])
local cutoff = ttl and (now - ttl) / 1000
local ids
if ARGV[3] == 'all' then
  ids = redis.call('ZRANGE', K_DLQ, 0, 999)
else
  ids = {}
  for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
end
"""
"""The dead letters a script acts on: ARGV ttl_ms, cap (retention, applied first: -1 when
the caller must run the script again), then ``'all'`` (the oldest 1000) or ``'ids'``, ids.
``cutoff`` (or false): a dead letter that died at or before it is expired."""

REQUEUE_DEAD = Script(
    PRELUDE
    + r"""
-- ARGV: ttl_ms, cap, mode ('all' or 'ids'), then ids. 'all' moves at most 1000 per call.
-- KEYS[13], KEYS[14]: pending, pending:at (see CLAIM_NOTICED): the note of a dead letter
-- requeued before its notice was told is dropped with it, in this step. Told later, it would
-- end the record of the message living again: the new run's (buried() fences its save by the
-- token it reads, which the new delivery wrote), or, before that run began, end it so that
-- the run never happens (its begin finds the record final). The dead-lettering it noted is
-- over: the requeue undoes it."""
    + DEAD_IDS
    + r"""local K_PENDING, K_PENDING_AT = KEYS[13], KEYS[14]
local n = 0
for _, id in ipairs(ids) do
  local body = redis.call('HGET', K_DLBODY, id)
  if body and cutoff and dead_expired(id, cutoff) then
    drop_dead(id)  -- died while the clock was set back; expired: not requeued
    body = nil
  end
  if body then
    local meta = cjson.decode(redis.call('HGET', K_DLMETA, id) or '{}')
    local prio = tostring(meta.priority or 0)
    redis.call('HDEL', K_DLBODY, id)
    redis.call('HDEL', K_DLMETA, id)
    redis.call('ZREM', K_DLQ, id)
    redis.call('ZREM', K_READY, id)
    redis.call('ZREM', K_DELAYED, id)
    redis.call('ZREM', K_INFLIGHT, id)
    redis.call('HDEL', K_TOK, id)
    redis.call('HDEL', K_ATT, id)
    redis.call('HSET', K_BODY, id, body)
    redis.call('HSET', K_META, id, prio)
    schedule(id, prio, false, now)
    redis.call('HDEL', K_PENDING, id)
    redis.call('ZREM', K_PENDING_AT, id)
    n = n + 1
  end
end
if n > 0 then notify() end
return n
"""
)
"""Requeue dead letters (see ``DEAD_IDS``); it takes the two keys of ``CLAIM_NOTICED``'s
notes as a thirteenth and a fourteenth and drops the notes of the letters it requeues."""

PURGE_DEAD = Script(
    PRELUDE
    + r"""
-- ARGV: ttl_ms, cap, mode ('all' or 'ids'), then ids. 'all' deletes at most 1000 per call.
-- Returns how many dead letters were deleted (an expired one is deleted, not counted)."""
    + DEAD_IDS
    + r"""local n = 0
for _, id in ipairs(ids) do
  local expired = cutoff and dead_expired(id, cutoff)
  if redis.call('ZREM', K_DLQ, id) == 1 and not expired then n = n + 1 end
  redis.call('HDEL', K_DLBODY, id)
  redis.call('HDEL', K_DLMETA, id)
end
return n
"""
)
