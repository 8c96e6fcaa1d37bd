"""Scripts that run a storage script and a broker script as one, for a broker and a storage on
the same (non-cluster) Redis server: one round trip instead of two, and atomic, so a crash can no
longer leave a record without its message or a final record without its ack.

Each part is the unchanged body of the storage or broker script after both preludes; the
storage part's keys and arguments come first, their counts are fixed.
"""

from __future__ import annotations

import re

from qtasks_redis import broker_lua, storage_lua
from qtasks_redis.connection import Script
from qtasks_redis.lua_time import second

STORAGE_KEYS = 10
"""Keys of one task record: rec, wake, steps and the seven status indexes."""
BROKER_KEYS = len(broker_lua.KEY_NAMES)
SAVE_ARGS = 10
"""Arguments of the storage's SAVE: uuid, json, status, token, has_fence, fence, force, ttl,
task_name, parent_uuid (and an enqueue's nonce, see :data:`PUBLISH_NEW`)."""


def _keys_from(prelude: str, base: int) -> str:
    """``prelude`` reading its keys ``base`` places further along ``KEYS``."""
    return re.sub(r"KEYS\[(\d+)\]", lambda m: f"KEYS[{int(m.group(1)) + base}]", prelude)


def _body(script: Script, prelude: str) -> str:
    assert script.source.startswith(prelude)
    return script.source[len(prelude) :]


def _combine(
    storage: Script, broker: Script, broker_args: int, *, gate: bool, nonce: bool = False
) -> Script:
    """``storage`` then ``broker``; with ``gate``, the broker part runs only when the storage
    part did not return 0 (1: saved; 2: the record was already final, the task is over).
    Returns the storage part's reply. With ``nonce``, one more argument, the call's nonce:
    passed to SAVE (which stores it in the record), and when the record carries it already,
    nothing runs and the reply is 1, as the earlier run's.

    Both preludes are defined once at the top (the broker's reading its keys after the
    storage's); each body becomes a local function whose ``ARGV`` parameter shadows the
    global, so its early ``return`` statements keep their meaning."""
    run_broker = "if saved ~= 0 then broker(ba) end" if gate else "broker(ba)"
    # A call re-sent after its reply was lost (the lane or redis-py retries it): its first run
    # went through, and the task may have run since.
    replayed = (
        f"""local NONCE = ARGV[{SAVE_ARGS + broker_args + 1}]
if redis.call('HGET', K_REC, 'p') == NONCE then return 1 end
sa[{SAVE_ARGS + 1}] = NONCE
"""
        if nonce
        else ""
    )
    return Script(
        storage_lua.PRELUDE
        + _keys_from(second(broker_lua.PRELUDE), STORAGE_KEYS)
        + f"""
local function storage(ARGV)
{_body(storage, storage_lua.PRELUDE)}
end
local function broker(ARGV)
{_body(broker, broker_lua.PRELUDE)}
end
local sa, ba = {{}}, {{}}
for i = 1, {SAVE_ARGS} do sa[i] = ARGV[i] end
for i = 1, {broker_args} do ba[i] = ARGV[{SAVE_ARGS} + i] end
{replayed}local saved = storage(sa)
{run_broker}
return saved
"""
    )


def _new_fast_path() -> str:
    """Lua run before PUBLISH_NEW's general path: the common enqueue, done before the
    preludes' functions and tables are built (about a quarter of the script's server time,
    paid by every call). It applies to a task whose record does not exist yet, with status
    ``new`` and a message id not stored yet; anything else goes on to the general path, which
    does the same writes for such a task
    (``tests/redis/test_redis_publish_fast_path.py`` runs both on the same calls and compares
    every key). The message's body is written first, with ``HSETNX``: when the id is stored
    already, nothing was written and the general path replaces the message."""
    key = {name: STORAGE_KEYS + 1 + i for i, name in enumerate(broker_lua.KEY_NAMES)}
    new_index = 4 + storage_lua.STATUSES.index("new")
    nonce = SAVE_ARGS + 4 + 1
    # ARGV: SAVE's (uuid, json, status, token, has_fence, fence, force, ttl, task_name,
    # parent), PUBLISH's (id, body, priority, eta), the nonce.
    return f"""do
  local rec = redis.call('HMGET', KEYS[1], 'd', 'p')
  if rec[2] == ARGV[{nonce}] then return 1 end
  if not rec[1] and ARGV[3] == 'new' and ARGV[7] == '1'
      and redis.call('HSETNX', KEYS[{key["body"]}], ARGV[11], ARGV[12]) == 1 then
    redis.call('HSET', KEYS[1], 'd', ARGV[2], 's', 'new', 't', ARGV[4], 'p', ARGV[{nonce}])
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('ZADD', KEYS[{new_index}], now, ARGV[1])
    if ARGV[10] ~= '' then  -- the parent's index of its children
      local children = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[1] - 3) .. ':np:' .. ARGV[10]
      redis.call('ZADD', children, now, ARGV[1])
      local ttl = tonumber(ARGV[8])
      if ttl then redis.call('PEXPIRE', children, ttl) end
    end
    redis.call('HSET', KEYS[{key["meta"]}], ARGV[11], ARGV[13])
    local eta = tonumber(ARGV[14])
    if eta and eta > now then
      redis.call('ZADD', KEYS[{key["delayed"]}], eta, ARGV[11])
    else
      local p = tonumber(ARGV[13]) or 0
      if p > 899 then p = 899 elseif p < -899 then p = -899 end
      local seq = redis.call('INCR', KEYS[{key["seq"]}])
      redis.call('ZADD', KEYS[{key["ready"]}], p * 10000000000000 + seq, ARGV[11])
    end
    if redis.call('RPUSH', KEYS[{key["notify"]}], '1') > 64 then
      redis.call('RPOP', KEYS[{key["notify"]}])
    end
    return 1
  end
end
"""


NEW_FAST_PATH = _new_fast_path()
""":data:`PUBLISH_NEW`'s first part (see :func:`_new_fast_path`)."""

PUBLISH_NEW = Script(
    NEW_FAST_PATH + _combine(storage_lua.SAVE, broker_lua.PUBLISH, 4, gate=False, nonce=True).source
)
"""Storage SAVE (forced: a new record) then broker PUBLISH (id, body, priority, eta_ms), then
the call's nonce (drawn once per call): the same call run again (re-sent after its reply was
lost) finds its nonce in the record and writes nothing, so it never sets a task that ran back
to ``new`` nor queues it again. Another call with the same uuid has another nonce: it
replaces the record and the message, as before. A new task's common case runs first, alone
(:data:`NEW_FAST_PATH`)."""

ACK_FINAL = _combine(storage_lua.SAVE, broker_lua.ACK, 2, gate=True)
"""Storage SAVE fenced by the delivery's token, then, unless the fence refused it, broker ACK
(id, token). Returns SAVE's reply (0, 1 or 2)."""

BEGINS = (
    storage_lua.BEGIN_ONE
    + r"""
-- The begins of a settle-and-begin script (SettleBegin): ARGV[2] is how many, ARGV[3 ..
-- BEGINS_END] hold each one's uuid, token, attempt and worker (the settle's arguments follow);
-- begin_all appends each record's {d, s, t, cr, u, n, a, w} to out, as BEGIN_MANY returns them.
-- A claim whose delivery the queue no longer holds under its token (its lease ran out and
-- another delivery holds the message: the worker stalled) is not begun: its record is
-- returned as it is, the token another's, so that the worker drops the delivery unstarted
-- and the record stays with the delivery that runs the task (its result is not refused).
local BEGINS_END = 2 + 4 * tonumber(ARGV[2])
local function begin_all(out)
  if BEGINS_END < 3 then return end
  local updated, now = updated_at(), now_ms()
  for j = 3, BEGINS_END, 4 do
    local uuid, key = ARGV[j], TAG .. ':r:' .. ARGV[j]
    local cur
    if valid(uuid, ARGV[j + 1]) then
      cur = begin_one(key, uuid, ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], updated, now)
    else
      cur = redis.call('HMGET', key, 'd', 's', 't', 'cr', 'u', 'n', 'a', 'w')
    end
    for k = 1, 8 do out[#out + 1] = cur[k] end
  end
end
"""
)
"""Lua for the scripts that settle and then begin (:data:`ACK_FINALS_BEGIN`, and the workflow
variant): the settle part's arguments start after ``BEGINS_END``, and ``begin_all`` runs once
it is done."""


def _ack_finals(*, begins: bool) -> Script:
    """ACK_FINALS, or with ``begins`` ACK_FINALS then the begins (:data:`BEGINS`)."""
    first = "BEGINS_END" if begins else "1"
    return Script(
        storage_lua.PRELUDE
        + _keys_from(second(broker_lua.PRELUDE), STORAGE_KEYS)
        + f"""
-- ACK_FINAL for several tasks: KEYS are ACK_FINAL's for the first task (its record keys are
-- rebuilt here for every task from the storage's key tag, so this runs only outside Redis
-- Cluster); ARGV: the tag, then per task SAVE's {SAVE_ARGS} arguments and ACK's (id, token).
-- Returns each task's SAVE reply.
local TAG = ARGV[1]
local function storage(ARGV)
{_body(storage_lua.SAVE, storage_lua.PRELUDE)}
end
"""
        + (BEGINS if begins else "")
        + f"""
-- The broker's ACK of each task (valid, then forget) with forget's five writes made once for
-- all the tasks acked, after the loop: nothing in between reads or writes the queue's keys
-- (SAVE writes the storage's only), and an id acked already is not valid again (forget
-- deleted its token).
local acked, is_acked = {{}}, {{}}
local out, base = {{}}, {first}
while base < #ARGV do
  local sa = {{}}
  for i = 1, {SAVE_ARGS} do sa[i] = ARGV[base + i] end
  local uuid = sa[1]
  K_REC, K_WAKE, K_STEPS = TAG .. ':r:' .. uuid, TAG .. ':w:' .. uuid, TAG .. ':s:' .. uuid
  local saved = storage(sa)
  if saved ~= 0 then
    local id = ARGV[base + {SAVE_ARGS} + 1]
    if not is_acked[id] and valid(id, ARGV[base + {SAVE_ARGS} + 2]) then
      is_acked[id] = true
      acked[#acked + 1] = id
    end
  end
  out[#out + 1] = saved
  base = base + {SAVE_ARGS} + 2
end
for i = 1, #acked, 1000 do  -- unpack takes a few thousand values at most
  local ids = {{unpack(acked, i, math.min(i + 999, #acked))}}
  redis.call('ZREM', K_INFLIGHT, unpack(ids))
  redis.call('HDEL', K_BODY, unpack(ids))
  redis.call('HDEL', K_META, unpack(ids))
  redis.call('HDEL', K_ATT, unpack(ids))
  redis.call('HDEL', K_TOK, unpack(ids))
end
"""
        + ("begin_all(out)\n" if begins else "")
        + "return out\n"
    )


ACK_FINALS = _ack_finals(begins=False)
"""ACK_FINAL of many tasks in one call (see :meth:`RedisBroker.ack_finals`)."""

ACK_FINALS_BEGIN = _ack_finals(begins=True)
"""ACK_FINALS, then BEGIN of the records of tasks about to start (see
:meth:`RedisBroker.ack_finals_begin`): ARGV: the tag, how many begins, their arguments
(:data:`BEGINS`), then ACK_FINALS' per-task arguments. Returns each settled task's SAVE
reply, then each begun record's fields."""


CLAIM_BEGIN = Script(
    broker_lua.PRELUDE
    + r"""
-- The broker's CLAIM that also begins each claimed message's record (storage BEGIN), for a
-- worker: one round trip instead of one more per message.
-- KEYS: the queue's keys, then the storage's status indexes (new, process, success, error,
-- cancel, retry, expired). ARGV: CLAIM's, then the storage's key tag, the worker id, the result
-- TTL in ms ('' for none) and how many of the claimed messages start at once: only those
-- are begun, the others are claimed with their record left as it is (all false, as when
-- there is none). Record keys are built here from the tag, so this runs only outside
-- Redis Cluster.
local IDX = {new = KEYS[13], process = KEYS[14], success = KEYS[15], error = KEYS[16],
             cancel = KEYS[17], retry = KEYS[18], expired = KEYS[19]}
local FINAL = {success = true, error = true, cancel = true, expired = true}
local TAG, WORKER, TTL = ARGV[5], ARGV[6], tonumber(ARGV[7])
local to_begin = tonumber(ARGV[8])
local REC_PREFIX = TAG .. ':r:'
local WAKE_TTL = 120000
local begun_at, begun_ms = false, 0  -- the server time, read once per claim
-- The message's attempt (executions made): read from the codec's compact JSON without
-- decoding it when the key occurs once (a kwarg or header named 'attempt' makes two); else
-- decoded. nil when there is none to read. The memory broker reads it by the same rule
-- (qtasks.memory.broker._body_attempt).
-- Only a whole number of up to 13 digits is read: the record's 'a' is written with
-- tostring(attempt + 1), whose 14 significant digits would write a larger number or a
-- fraction as '1e+30' or '2.5', which no reader takes for a count (the claim's reply then
-- stopped the worker's consumer). The worker writes the attempt it decodes itself.
local function body_attempt(body)
  if string.sub(body, 1, 5) == '{"v":' then
    local _, e = string.find(body, '"attempt":', 1, true)
    if e and not string.find(body, '"attempt":', e + 1, true) then
      local n = string.match(body, '^(%d+)[,}]', e + 1)  -- digits, then the value ends
      if n and #n <= 13 then return tonumber(n) end
    end
  end
  local ok, message = pcall(cjson.decode, body)
  if not ok or type(message) ~= 'table' then return nil end
  local a = message.attempt
  if type(a) == 'number' and a == math.floor(a) and a > -1e13 and a < 1e13 then return a end
  return nil
end
-- Appends the record's {d, s, t, cr, u, n, a, w} (as BEGIN returns them), all false when
-- there is no record.
local function on_claim(id, body, token, out)
  if to_begin <= 0 then
    for _ = 1, 8 do out[#out + 1] = false end
    return
  end
  to_begin = to_begin - 1
  local rec = REC_PREFIX .. id
  local cur = redis.call('HMGET', rec, 'd', 's', 't', 'cr', 'u', 'n', 'a', 'w')
  if cur[1] and not FINAL[cur[2]] then
    if (cur[2] == 'process' or cur[2] == 'retry') and cur[3] ~= token then  -- AttemptLog
      redis.call('RPUSH', TAG .. ':at:' .. id, cjson.encode(cur))
      redis.call('HSET', rec, 'k', '1')
    end
    if not begun_at then begun_at, begun_ms = updated_at(), now_ms() end
    local attempt = body_attempt(body)
    if attempt then
      cur[7] = tostring(attempt + 1)
      redis.call('HSET', rec, 's', 'process', 't', token, 'w', WORKER, 'u', begun_at,
                 'a', cur[7])
    else
      redis.call('HSET', rec, 's', 'process', 't', token, 'w', WORKER, 'u', begun_at)
    end
    if IDX[cur[2]] then redis.call('ZREM', IDX[cur[2]], id) end
    redis.call('ZADD', IDX['process'], begun_ms, id)
    cur[2], cur[3], cur[5], cur[8] = 'process', token, begun_at, WORKER
  end
  for i = 1, 8 do out[#out + 1] = cur[i] end
end
-- A message dead-lettered by its delivery limit: its record turns final ('error', with why)
-- under a token no delivery holds, so a late result of its last holder is refused. A record
-- its last delivery began ('process': that run was lost with its worker) keeps when that run
-- began as 'b' (its started_at, read with 'e'), else has none. The fields of each record so
-- ended, {d, s, t, cr, u, n, a, w, e, b}, are appended to ENDED (the reply of CLAIM_BEGIN_WF
-- carries them: the worker fires the dead-letter hook). Returns false (it publishes nothing)
-- and whether it ended the record. Again (a claim re-sent after its reply was lost), it
-- writes nothing: a record the first run ended (``again`` true) is appended to ENDED as
-- stored, while it is still that dead letter's end, since the reply that carried it was lost.
local ENDED = {}
local function append_ended(rec)
  local fields = redis.call('HMGET', rec, 'd', 's', 't', 'cr', 'u', 'n', 'a', 'w', 'e', 'b')
  for i = 1, 10 do ENDED[#ENDED + 1] = fields[i] end
end
local function on_dead(id, reason, again)
  local rec = REC_PREFIX .. id
  if again ~= nil then
    local now = redis.call('HMGET', rec, 's', 't')
    if again and now[1] == 'error' and now[2] == 'dead-letter' then append_ended(rec) end
    return false, false
  end
  local was = redis.call('HMGET', rec, 's', 'u')
  local status = was[1]
  if not status or FINAL[status] then return false, false end
  local updated, now = updated_at(), now_ms()
  redis.call('HSET', rec, 's', 'error', 't', 'dead-letter', 'e', 'dead-lettered: ' .. reason,
             'u', updated)
  if status == 'process' and was[2] then
    redis.call('HSET', rec, 'b', was[2])
  else
    redis.call('HDEL', rec, 'b')
  end
  if IDX[status] then redis.call('ZREM', IDX[status], id) end
  redis.call('ZADD', IDX['error'], now, id)
  -- The task name's index of final records (see storage_lua).
  local ok, v = pcall(cjson.decode, redis.call('HGET', rec, 'd') or '')
  local name = ok and type(v) == 'table' and ((type(v[1]) == 'number' and v[3]) or v.task_name)
  if type(name) == 'string' and name ~= '' then
    redis.call('ZADD', TAG .. ':nf:' .. name, now, id)
  end
  local wake, steps = TAG .. ':w:' .. id, TAG .. ':s:' .. id
  if TTL then
    redis.call('PEXPIRE', rec, TTL)
    redis.call('PEXPIRE', TAG .. ':at:' .. id, TTL)
  end
  redis.call('RPUSH', wake, '1')
  redis.call('PEXPIRE', wake, (TTL and TTL < WAKE_TTL) and TTL or WAKE_TTL)
  if redis.call('EXISTS', steps) == 1 then
    redis.call('XADD', steps, '*', 'k', 'e')
    if TTL then redis.call('PEXPIRE', steps, TTL) else redis.call('PERSIST', steps) end
  end
  append_ended(rec)
  return false, true
end
"""
    + broker_lua.CLAIM_BODY
)
"""CLAIM, beginning every claimed message's record on the way (see :class:`BeginOnClaim`).
The head of :data:`qtasks_redis.workflow_lua.CLAIM_BEGIN_WF`, which the broker runs: that one
also returns the records its dead letters ended."""
