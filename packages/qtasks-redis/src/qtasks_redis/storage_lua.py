"""The storage's Lua scripts. Keys of one task (all under the storage's hash tag):

1. ``rec``    HASH: ``d`` record JSON, ``s`` status, ``t`` token, and overrides written by
              :meth:`cancel` (``cr`` reason, ``u`` updated_at), :meth:`begin` (``u``, ``a``
              attempt, ``w`` worker), :meth:`add_step` (``n`` steps; ``sn`` its last
              call's nonce; ``st`` the fence of the last fenced step, ``sr`` how many
              restart markers the steps hold) and the broker's claim when
              it dead-letters the message (``e`` error, ``u``, ``s``, ``t``); ``g`` the
              publish generation (workflow_lua.REPUBLISH), which no other write changes;
              ``p`` the nonce of the enqueue call that wrote it (see :data:`SAVE`)
2. ``wake``   LIST: one token pushed when the record turns final; waiters ``BLMOVE`` it onto
              itself, so every waiter wakes and the token stays for late comers (short TTL)
3. ``steps``  STREAM of generator steps (``k``=``s``), plus ``r`` (a new run starts over,
              ``v`` its run number: ``StepsRestarted``), ``o`` (a follower is present) and
              ``e`` (the record is final) markers; no TTL of its own: it expires with the
              record (``finished``), so it lives exactly as long
4-10.         ZSET per status (new, process, success, error, cancel, retry, expired): uuid -> ms,
              for :meth:`stats` and :meth:`query` without scanning the keyspace

and, per task name (keys built from the tag, in the same slot), ``<tag>:nf:<name>``: ZSET of
the final records of that name (uuid -> ms final), so the dashboard lists the finished tasks of
one name among millions; records that are not final are few (queued and running ones) and found
through the status indexes. Entries of expired records are removed from the indexes of final
records by some writes (see ``prune``), by :meth:`stats` and by the queries that meet them;
an entry stays while its record exists, however old (see ``trim``: a workflow's members are
kept past ``result_ttl``), with ``<tag>:tm`` and ``<tag>:tk`` for the trimming's own use.

Over ~500 lines: the storage's scripts share one Lua prelude (the keys, ``index``, ``trim``,
``prune``), which each script's source starts with; split, a script would read in two files.
"""

from __future__ import annotations

from qtasks_redis.connection import Script
from qtasks_redis.lua_time import SERVER_TIME

STATUSES = ("new", "process", "success", "error", "cancel", "retry", "expired")

PRELUDE = (
    SERVER_TIME
    + r"""
local K_REC, K_WAKE, K_STEPS = KEYS[1], KEYS[2], KEYS[3]
local IDX = {new = KEYS[4], process = KEYS[5], success = KEYS[6], error = KEYS[7],
             cancel = KEYS[8], retry = KEYS[9], expired = KEYS[10]}
local FINAL = {success = true, error = true, cancel = true, expired = true}
local WAKE_TTL = 120000

local function index(uuid, old, new, now)
  if old and IDX[old] then redis.call('ZREM', IDX[old], uuid) end
  if IDX[new] then redis.call('ZADD', IDX[new], now, uuid) end
end

-- The name and parent of a stored record from its JSON ('d'): formats 1 and 2 are
-- [format, uuid, task_name, ...] with parent_uuid at 16 (qtasks_redis.storage._V1).
local function record_name(d)
  local ok, v = pcall(cjson.decode, d)
  if not ok or type(v) ~= 'table' then return nil, nil end
  local name, parent
  if v[1] == 1 or v[1] == 2 then name, parent = v[3], v[16] else
    name, parent = v.task_name, v.parent_uuid end
  if type(parent) ~= 'string' then parent = nil end
  return name, parent
end

-- Trimming an index of final records: an entry stays while its record exists. Entries older
-- than the TTL are nearly all of records that expired; the others are of records kept longer
-- (a running workflow's members, workflow_lua.keep, until a TTL after it ended; or a record
-- another app saved with a longer TTL), still listed, as MemoryStorage lists them. So a trim
-- looks once at each entry that fell below now - ttl since the trims of that index got to
-- (mark_of), a thousand at a time and TRIM_MOST a call (a call blocks the whole server: after
-- an idle spell, a million took 0.9 s): it removes those whose record is gone and puts the
-- others on TAG:tk (ZSET '<#uuid>:<uuid><index key>' -> when to look at it again: when its
-- record's TTL ends, or a TTL from now while it has none), of which each trim looks at those
-- due (a thousand at most). An index with none kept costs about 1 us an entry instead of 0.2
-- for removing by score (one EXISTS a thousand entries), and each kept entry one look per TTL.
local TRIM_MOST = 2000

-- Where the trims of an index got to: TAG:tm, field index key -> ms: every entry below ms was
-- looked at; field '>' .. index key (index keys start with '{') -> '<ms>:<uuid>': those of ms
-- up to uuid too (a trim stopped inside ms), apart so that earlier versions read numbers.
local function mark_of(marks, key)
  local got = redis.call('HMGET', marks, key, '>' .. key)
  local ms = tonumber(got[1])
  local at, uuid = string.match(got[2] or '', '^([^:]+):(.*)$')
  if ms and at and tonumber(at) == ms then return ms, uuid end
  return ms, nil
end

-- a <= b as a ZSET orders members (memcmp): Lua's '<' follows the server's locale.
local function not_after(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a <= #b
end

-- Whether the entry (score, uuid) is before the mark (ms, after): looked at already.
local function before_mark(score, uuid, ms, after)
  return ms ~= nil and (score < ms or (after ~= nil and score == ms and not_after(uuid, after)))
end

-- When to look again at a kept entry whose record has left ms to live (PTTL; 0: gone in 1 ms,
-- Redis expires a key once the time is past its own), or has no TTL (a TTL from now).
local function due(now, left, ttl)
  return left >= 0 and now + left + 1 or now + ttl
end

local RECHECKED = false
local function recheck(tag, now, ttl)
  if RECHECKED then return end
  RECHECKED = true
  local kept, marks = tag .. ':tk', {}
  for _, entry in ipairs(redis.call('ZRANGEBYSCORE', kept, '-inf', now, 'LIMIT', 0, 1000)) do
    local n, rest = string.match(entry, '^(%d+):(.*)$')
    local uuid, key = string.sub(rest, 1, tonumber(n)), string.sub(rest, tonumber(n) + 1)
    local left = redis.call('PTTL', tag .. ':r:' .. uuid)
    local score = redis.call('ZSCORE', key, uuid)
    marks[key] = marks[key] or {mark_of(tag .. ':tm', key)}
    if left == -2 then redis.call('ZREM', key, uuid) end
    local mark = marks[key]
    if left ~= -2 and score and before_mark(tonumber(score), uuid, mark[1], mark[2]) then
      redis.call('ZADD', kept, due(now, left, ttl), entry)
    else  -- gone, or no longer below the trimmed time: the trims meet it if need be
      redis.call('ZREM', kept, entry)
    end
  end
end

-- Returns true when it stopped at TRIM_MOST (entries below the cutoff may be left).
local function trim(tag, key, now, ttl)
  recheck(tag, now, ttl)
  local marks, cutoff = tag .. ':tm', now - ttl
  local ms, after = mark_of(marks, key)
  if ms and ms >= cutoff then return false end
  local rec, kept, skip, looked, stop = tag .. ':r:', tag .. ':tk', 0, 0, nil
  if after then  -- the entries of ms up to after that were kept are first in the range
    repeat
      local same, n = redis.call('ZRANGEBYSCORE', key, ms, ms, 'LIMIT', skip, 1000), 0
      while n < #same and not_after(same[n + 1], after) do n = n + 1 end
      skip = skip + n
    until n < 1000
  end
  while true do
    local size = math.min(1000, TRIM_MOST - looked)
    -- The entries kept so far stay first in the range (by score, then uuid): skipped.
    local reply = redis.call('ZRANGEBYSCORE', key, ms or '-inf', '(' .. cutoff, 'WITHSCORES',
                             'LIMIT', skip, size)
    local batch, records = {}, {}
    for i = 1, #reply, 2 do
      batch[#batch + 1] = reply[i]
      records[#records + 1] = rec .. reply[i]
    end
    if #batch == 0 then break end
    looked = looked + #batch
    local gone = batch
    if redis.call('EXISTS', unpack(records)) > 0 then  -- rare: look at each
      gone = {}
      for i, uuid in ipairs(batch) do
        local left = redis.call('PTTL', records[i])
        if left == -2 then
          gone[#gone + 1] = uuid
        else
          redis.call('ZADD', kept, due(now, left, ttl), #uuid .. ':' .. uuid .. key)
          skip = skip + 1
        end
      end
    end
    if #gone > 0 then redis.call('ZREM', key, unpack(gone)) end
    if #batch < size then break end
    if looked >= TRIM_MOST then stop = {reply[#reply], batch[#batch]} break end
  end
  if stop then
    redis.call('HSET', marks, key, stop[1], '>' .. key, stop[1] .. ':' .. stop[2])
  elseif looked > 0 or after then
    redis.call('HSET', marks, key, cutoff)
    redis.call('HDEL', marks, '>' .. key)
  end
  return stop ~= nil
end

-- Trimmed by the writes that add to an index, but only at one server millisecond in 16 (and
-- once per script call): enough to bound its size, at a sixteenth of the cost. Queries skip
-- and remove the entries they find without a record meanwhile.
local PRUNED = {}
local function prune(tag, key, now, ttl)
  if now % 16 ~= 0 or PRUNED[key] then return end
  PRUNED[key] = true
  trim(tag, key, now, ttl)
end

-- After index(): the task-name index of final records, and the pruning of the final indexes.
-- Nothing for a record that is not final and was not: publishing and beginning cost nothing.
local function named(uuid, name, old, new, now, ttl)
  if not FINAL[new] and not (old and FINAL[old]) then return end
  local tag = string.sub(K_REC, 1, #K_REC - #uuid - 3)
  if FINAL[new] and ttl then prune(tag, IDX[new], now, ttl) end
  if type(name) ~= 'string' or name == '' then return end
  if FINAL[new] then
    local final = tag .. ':nf:' .. name
    redis.call('ZADD', final, now, uuid)
    if ttl then prune(tag, final, now, ttl) end
  elseif old and FINAL[old] then  -- a deliberate reset (add) of a final record
    redis.call('ZREM', tag .. ':nf:' .. name, uuid)
  end
end

-- The index of the tasks a task added (its children), by the time of their last write; a
-- child's every save adds it again, so it stays while the children change, and expires a TTL
-- after the last of them was written.
local function parented(uuid, parent, now, ttl)
  if parent == nil or parent == '' then return end
  local key = string.sub(K_REC, 1, #K_REC - #uuid - 3) .. ':np:' .. parent
  redis.call('ZADD', key, now, uuid)
  if ttl then redis.call('PEXPIRE', key, ttl) end
end

-- Before a delivery begins a record another delivery began (it was retried, or its worker
-- was lost): keep that attempt's fields {d, s, t, cr, u, n, a, w} on the task's attempt list
-- (qtasks.components.AttemptLog). A first attempt keeps nothing.
-- The record's field 'k' says it has such a list, which its final save expires with it.
local function keep_attempt(rec, uuid, cur, token)
  if (cur[2] == 'process' or cur[2] == 'retry') and cur[3] ~= token then
    redis.call('RPUSH', string.sub(rec, 1, #rec - #uuid - 3) .. ':at:' .. uuid, cjson.encode(cur))
    redis.call('HSET', rec, 'k', '1')
  end
end

-- Storage.begin's check of a copy of publish generation gen: true when the record's
-- ('g', raised by the workflows' REPUBLISH) is greater (a stale copy, never begun). cur is
-- HMGET's reply with 'g' ninth, taken off so cur is what the begin scripts return.
local function stale_copy(cur, gen)
  local g = cur[9]
  cur[9] = nil
  return g and tonumber(g) > (gen or 0)
end

-- The record just turned final: expire it, wake waiters, end step followers. The wake list
-- never outlives the record, so a record that does not exist has no stale wake-up.
local function finished(ttl)
  if ttl then redis.call('PEXPIRE', K_REC, ttl) end
  redis.call('RPUSH', K_WAKE, '1')
  redis.call('PEXPIRE', K_WAKE, (ttl and ttl < WAKE_TTL) and ttl or WAKE_TTL)
  if redis.call('EXISTS', K_STEPS) == 1 then
    redis.call('XADD', K_STEPS, '*', 'k', 'e')
    if ttl then redis.call('PEXPIRE', K_STEPS, ttl) else redis.call('PERSIST', K_STEPS) end
  end
end
"""
)

SAVE = Script(
    PRELUDE
    + r"""
-- ARGV: uuid, json, status, token, has_fence, fence, force, ttl_ms ('' for none), task_name,
-- parent_uuid ('' for none), and from an enqueue script only, its call's nonce: written as
-- 'p', which no other write changes, so a re-sent enqueue finds that it ran (PUBLISH_NEW).
-- force: '1' replaces any stored record, '0' checks fence and finality, 'n' writes only
-- when no record is stored (a new task's record racing its first delivery).
-- Returns 1 when written, 0 when refused by the fence (another attempt owns the task), 2 when
-- refused because the stored record is final with another status (the task is over: a
-- cancel made while it ran stays a cancel; its holder may ack).
local uuid, status, token = ARGV[1], ARGV[3], ARGV[4]
local cur = redis.call('HMGET', K_REC, 'd', 's', 't', 'k')
if ARGV[7] == 'n' and cur[1] then return 0 end
if ARGV[7] ~= '1' and cur[1] then
  if ARGV[5] == '1' and cur[3] ~= '' and cur[3] ~= ARGV[6] then return 0 end
  if FINAL[cur[2]] and cur[2] ~= status then return 2 end
end
local old = false
if cur[1] then old = cur[2] end
if ARGV[11] then
  redis.call('HSET', K_REC, 'd', ARGV[2], 's', status, 't', token, 'p', ARGV[11])
else
  redis.call('HSET', K_REC, 'd', ARGV[2], 's', status, 't', token)
end
-- 'b' (when a dead-lettered run began) goes with 'e', which it is read with: a requeue's reset
-- keeps the token 'dead-letter', and its hash must hold nothing else of the dead letter.
if old then redis.call('HDEL', K_REC, 'cr', 'u', 'a', 'w', 'e', 'b') end
if old and ARGV[7] == '1' then  -- replaced: the attempts kept and the steps were the old one's
  redis.call('HDEL', K_REC, 'k', 'n', 'sn', 'st', 'sr')
  redis.call('DEL', string.sub(K_REC, 1, #K_REC - #uuid - 3) .. ':at:' .. uuid, K_STEPS)
end
local now = now_ms()
index(uuid, old, status, now)
named(uuid, ARGV[9], old, status, now, tonumber(ARGV[8]))
parented(uuid, ARGV[10], now, tonumber(ARGV[8]))
if FINAL[status] then
  finished(tonumber(ARGV[8]))
  if cur[4] and ARGV[8] ~= '' then  -- earlier attempts kept (keep_attempt)
    redis.call('PEXPIRE', string.sub(K_REC, 1, #K_REC - #uuid - 3) .. ':at:' .. uuid, ARGV[8])
  end
elseif old then
  redis.call('PERSIST', K_REC)
  redis.call('DEL', K_WAKE)  -- a reset record must not see an old wake-up
end
return 1
"""
)

CANCEL = Script(
    PRELUDE
    + r"""
-- ARGV: uuid, reason, ttl_ms, channel. Returns {d, s, t, cr, u, n, a, w, s before the call}
-- or nil when unknown. A cancel of a record in 'process' is published on channel (the
-- workers' cancel feed), as a JSON array [uuid, reason].
local cur = redis.call('HMGET', K_REC, 'd', 's')
if not cur[1] then return false end
if not FINAL[cur[2]] then
  local now, updated = now_ms(), updated_at()
  redis.call('HSET', K_REC, 's', 'cancel', 'cr', ARGV[2], 'u', updated)
  index(ARGV[1], cur[2], 'cancel', now)
  local name, parent = record_name(cur[1])
  named(ARGV[1], name, cur[2], 'cancel', now, tonumber(ARGV[3]))
  parented(ARGV[1], parent, now, tonumber(ARGV[3]))
  finished(tonumber(ARGV[3]))
  if ARGV[3] ~= '' then
    redis.call('PEXPIRE', string.sub(K_REC, 1, #K_REC - #ARGV[1] - 3) .. ':at:' .. ARGV[1], ARGV[3])
  end
  if cur[2] == 'process' and ARGV[4] ~= '' then
    redis.call('PUBLISH', ARGV[4], cjson.encode({ARGV[1], ARGV[2]}))
  end
end
local out = redis.call('HMGET', K_REC, 'd', 's', 't', 'cr', 'u', 'n', 'a', 'w')
out[9] = cur[2]
return out
"""
)

BEGIN = Script(
    PRELUDE
    + r"""
-- ARGV: uuid, json (the record as a new 'process' attempt, or '' to get nil back when there
-- is no record: the caller then sends it), token, attempt, worker, generation.
-- Returns {d, s, t, cr, u, n, a, w}: unchanged when final or a stale copy, else after
-- marking the attempt.
local cur = redis.call('HMGET', K_REC, 'd', 's', 't', 'cr', 'u', 'n', 'a', 'w', 'g')
local stale = stale_copy(cur, tonumber(ARGV[6]))
if cur[1] and (FINAL[cur[2]] or stale) then return cur end
if not cur[1] and ARGV[2] == '' then return false end
local updated, now = updated_at(), now_ms()
if not cur[1] then
  redis.call('HSET', K_REC, 'd', ARGV[2], 's', 'process', 't', ARGV[3], 'u', updated)
  index(ARGV[1], false, 'process', now)
  return {ARGV[2], 'process', ARGV[3], false, updated, false, false, false}
end
keep_attempt(K_REC, ARGV[1], cur, ARGV[3])
redis.call('HSET', K_REC, 's', 'process', 't', ARGV[3], 'a', ARGV[4], 'w', ARGV[5],
           'u', updated)
index(ARGV[1], cur[2], 'process', now)
cur[2], cur[3], cur[5], cur[7], cur[8] = 'process', ARGV[3], updated, ARGV[4], ARGV[5]
return cur
"""
)

ADD_STEP = Script(
    PRELUDE
    + r"""
-- ARGV: value_json, nonce, fence ('' for none). Returns the step's index, or -1 when refused:
-- no record (a stream beside none would be expired or deleted by nothing), a final one (the
-- task is over: a late step changes neither 'n' nor the stream), or, with a fence, a token
-- that is not the fence (a newer delivery began the task). Steps are added one at a time: a
-- call re-sent after its reply was lost (the lane or redis-py retries it) finds its nonce as
-- the record's 'sn' and appends nothing again. The first step of a run (fence) after steps
-- of another is preceded by a restart marker.
local cur = redis.call('HMGET', K_REC, 'sn', 'n', 'd', 's', 't', 'st')
if cur[1] == ARGV[2] then return tonumber(cur[2]) - 1 end
if not cur[3] or FINAL[cur[4]] then return -1 end
local fence = ARGV[3]
if fence ~= '' then
  if cur[5] and cur[5] ~= '' and cur[5] ~= fence then return -1 end
  if cur[6] ~= fence then
    if tonumber(cur[2] or '0') > 0 then
      local run = redis.call('HINCRBY', K_REC, 'sr', 1) + 1
      redis.call('XADD', K_STEPS, '*', 'k', 'r', 'v', run)
    end
    redis.call('HSET', K_REC, 'st', fence)
  end
end
redis.call('XADD', K_STEPS, '*', 'k', 's', 'v', ARGV[1])
redis.call('HSET', K_REC, 'sn', ARGV[2])
return redis.call('HINCRBY', K_REC, 'n', 1) - 1
"""
)

FOLLOW = Script(
    PRELUDE
    + r"""
-- ARGV: last_id. Returns {final (0/1), id1, kind1, value1, ...} of entries after last_id.
-- A follower of an unfinished task makes sure the stream exists, so that the final save
-- appends the end marker that wakes it. No TTL: the record has none while it is not final,
-- and the final save gives the stream the record's.
local status = redis.call('HGET', K_REC, 's')
local final = (status and FINAL[status]) or (redis.call('HEXISTS', K_REC, 'd') == 0)
if not final and redis.call('EXISTS', K_STEPS) == 0 then
  redis.call('XADD', K_STEPS, '*', 'k', 'o')
end
local out = {final and 1 or 0}
for _, entry in ipairs(redis.call('XRANGE', K_STEPS, '(' .. ARGV[1], '+')) do
  local f = entry[2]
  local kind, value = '', ''
  for i = 1, #f, 2 do
    if f[i] == 'k' then kind = f[i + 1] elseif f[i] == 'v' then value = f[i + 1] end
  end
  out[#out + 1] = entry[1]
  out[#out + 1] = kind
  out[#out + 1] = value
end
return out
"""
)

STATS = Script(
    PRELUDE
    + r"""
-- ARGV: ttl_ms ('' for none). Returns {count_new, count_process, ..., more} in STATUSES
-- order, then 1 when a trim stopped at TRIM_MOST (the counts may hold expired records: the
-- caller calls again), else 0.
local ttl = tonumber(ARGV[1])
local now = now_ms()
local out, more = {}, 0
for _, name in ipairs({'new', 'process', 'success', 'error', 'cancel', 'retry', 'expired'}) do
  -- K_REC is the record key of uuid '': the tag, then ':r:'.
  if ttl and FINAL[name] and trim(string.sub(K_REC, 1, #K_REC - 3), IDX[name], now, ttl) then
    more = 1
  end
  out[#out + 1] = redis.call('ZCARD', IDX[name])
end
out[#out + 1] = more
return out
"""
)

BEGIN_ONE = r"""
-- BEGIN of a record that exists, for the scripts that begin many (IDX and FINAL defined):
-- marks it 'process' for the attempt (token, attempt, worker) at server time (updated, now),
-- keeping the attempt it replaces (AttemptLog); returns {d, s, t, cr, u, n, a, w}, unchanged
-- when final or a stale copy, all false when there is no record. Every claim here has
-- publish generation 0 (the worker begins the others alone, with BEGIN), so any 'g' makes
-- it a stale copy of a workflow step published again.
local function begin_one(key, uuid, token, attempt, worker, updated, now)
  local cur = redis.call('HMGET', key, 'd', 's', 't', 'cr', 'u', 'n', 'a', 'w', 'g')
  local g = cur[9]
  cur[9] = nil
  if cur[1] and not FINAL[cur[2]] and not g then
    if (cur[2] == 'process' or cur[2] == 'retry') and cur[3] ~= token then  -- AttemptLog
      redis.call('RPUSH', string.sub(key, 1, #key - #uuid - 3) .. ':at:' .. uuid,
                 cjson.encode(cur))
      redis.call('HSET', key, 'k', '1')
    end
    redis.call('HSET', key, 's', 'process', 't', token, 'a', attempt, 'w', worker,
               'u', updated)
    if IDX[cur[2]] then redis.call('ZREM', IDX[cur[2]], uuid) end
    redis.call('ZADD', IDX['process'], now, uuid)
    cur[2], cur[3], cur[5], cur[7], cur[8] = 'process', token, updated, attempt, worker
  end
  return cur
end
"""
"""A Lua function shared by :data:`BEGIN_MANY` and the shared server's settle-and-begin."""

BEGIN_MANY = Script(
    SERVER_TIME
    + r"""
-- BEGIN of several records that exist. KEYS: one record key per task, then the seven status
-- indexes (new, process, success, error, cancel, retry, expired). ARGV: for each task its
-- uuid, token, attempt and worker. Returns {d, s, t, cr, u, n, a, w} per task, in order:
-- unchanged when final or a stale copy (publish generation 0, see BEGIN), all false when
-- there is no record (the caller begins that one with BEGIN).
local n = #KEYS - 7
local IDX = {new = KEYS[n + 1], process = KEYS[n + 2], success = KEYS[n + 3],
             error = KEYS[n + 4], cancel = KEYS[n + 5], retry = KEYS[n + 6],
             expired = KEYS[n + 7]}
local FINAL = {success = true, error = true, cancel = true, expired = true}
"""
    + BEGIN_ONE
    + r"""
local updated, now = updated_at(), now_ms()
local out = {}
for i = 1, n do
  local j = (i - 1) * 4
  local cur = begin_one(KEYS[i], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], ARGV[j + 4], updated, now)
  for k = 1, 8 do out[#out + 1] = cur[k] end
end
return out
"""
)
"""BEGIN of many records in one call (the worker's :class:`~qtasks.components.BeginMany`)."""

CANCELLED = Script(
    r"""
-- KEYS: record keys. Returns {i, reason, ...} for each record whose status is 'cancel'; the
-- reason is '' for a cancel stored by SAVE (its reason is in the record JSON, 'd').
local out = {}
for i = 1, #KEYS do
  local f = redis.call('HMGET', KEYS[i], 's', 'cr')
  if f[1] == 'cancel' then
    out[#out + 1] = i
    out[#out + 1] = f[2] or ''
  end
end
return out
"""
)
"""Which of many records are cancelled (the worker's cancel check, one call per pass)."""
