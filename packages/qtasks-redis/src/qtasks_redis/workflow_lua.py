"""Lua for workflows (:class:`~qtasks.components.WorkflowStore`) and bulk publishing.

A workflow ``W`` keeps, under the storage's hash tag ``TAG`` (one slot with its records):

- ``TAG:f:W:c``  HASH gate -> counter (members still to succeed before it opens)
- ``TAG:f:W:m``  HASH gate -> JSON ``[[id, priority, delay_ms], ...]``, the messages it
  publishes, whose bodies are in ``TAG:f:W:b`` (HASH id -> body, raw bytes)
- ``TAG:f:W:n``  HASH member uuid -> the gate it feeds (``!on_error`` -> the error callback)
- ``TAG:f:W:o``  HASH gate -> the member that opened it
- ``TAG:f:W:d``  SET of the members whose end was counted (a repeated call changes nothing)
- ``TAG:f:W:a``  LIST of every member (the error gate cancels those not final)

all expiring with the workflow's record once it ended (a day when results do not expire), and
deleted at once by ``cancel_workflow`` (a member that ends later finds the record final and
reads them only); and ``TAG:wf``, a ZSET of every workflow (id -> microseconds created, so
that workflows made in one millisecond keep their order), for listing. Its entries outlive
their records, which expire with the results: the listing removes those it meets, and each
new workflow's :data:`INDEX` checks a few older than the result TTL (see there).

and its own record (uuid ``W``) is a task record: its status is the workflow's.

A member's final record is kept while its workflow runs (a later step, or the workflow's
result, reads it): the step that counts a success takes off the TTL its save gave, and the
step that ends the workflow gives every member's record the result TTL from then
(:data:`CANCEL_FLOW` for a cancel).

:data:`MEMBER_DONE` is the storage's own call (a broker that does not share the server
publishes what it returns); the shared server's :data:`ACK_FINALS_WF` runs the same code
after each fenced save, publishing the opened gates' messages into the queue and acking, in
one script.

Over ~500 lines: Lua source, the workflow scripts sharing one set of helpers.
"""

from __future__ import annotations

from qtasks_redis import broker_lua, shared_lua, storage_lua
from qtasks_redis.connection import Script
from qtasks_redis.lua_time import SERVER_TIME, second
from qtasks_redis.shared_lua import SAVE_ARGS as _SAVE_ARGS
from qtasks_redis.shared_lua import STORAGE_KEYS as _STORAGE_KEYS
from qtasks_redis.shared_lua import _body, _keys_from

WF_PRELUDE = r"""
local function wf_key(w, kind) return TAG .. ':f:' .. w .. ':' .. kind end

local function rec_keys(uuid)  -- point the storage prelude's functions at one record
  K_REC, K_WAKE, K_STEPS = TAG .. ':r:' .. uuid, TAG .. ':w:' .. uuid, TAG .. ':s:' .. uuid
end

local function stamp() return updated_at(), now_ms() end

-- Turn a record that is not final yet final (as the storage's CANCEL does), writing the
-- override field (e: error, cr: cancel reason) when given; returns its old status or false.
local function end_record(uuid, status, field, text, ttl)
  rec_keys(uuid)
  local f = redis.call('HMGET', K_REC, 's', 'd', 'k')
  local cur = f[1]
  if not cur or FINAL[cur] then return false end
  local updated, now = stamp()
  redis.call('HSET', K_REC, 's', status, 'u', updated)
  if field then redis.call('HSET', K_REC, field, text) end
  index(uuid, cur, status, now)
  -- The task name's index of final records and the parent's, as the storage's SAVE keeps
  -- them (the name and parent are read from the record: a rare path).
  local name, parent = record_name(f[2] or '')
  named(uuid, name, cur, status, now, ttl)
  parented(uuid, parent, now, ttl)
  finished(ttl)
  if f[3] and ttl then redis.call('PEXPIRE', TAG .. ':at:' .. uuid, ttl) end  -- AttemptLog
  if cur == 'process' and status == 'cancel' then
    redis.call('PUBLISH', TAG .. ':cancels', cjson.encode({uuid, text}))
  end
  return cur
end

-- The workflow ended: its gates are kept for as long as its record (a day when results never
-- expire), for a redelivered member that finds it over.
local function expire_flow(w, ttl)
  for _, kind in ipairs({'c', 'm', 'n', 'o', 'd', 'a', 'b'}) do
    redis.call('PEXPIRE', wf_key(w, kind), ttl or 86400000)
  end
end

-- A member's record (with its steps and attempts) that must outlive its own TTL: ttl nil
-- keeps it (its workflow runs), else it expires ttl from now.
local function keep(uuid, ttl)
  for _, kind in ipairs({':r:', ':s:', ':at:'}) do
    if ttl then redis.call('PEXPIRE', TAG .. kind .. uuid, ttl)
    else redis.call('PERSIST', TAG .. kind .. uuid) end
  end
end

-- The workflow w ended (or is cancelled): every member's record expires ttl from now, as its
-- own record does (nothing when results do not expire). Once per workflow: O(members).
local function release(w, ttl)
  if not ttl then return end
  for _, m in ipairs(redis.call('LRANGE', wf_key(w, 'a'), 0, -1)) do keep(m, ttl) end
end

-- The member uuid of workflow w ended with status (its record is stored): see
-- WorkflowStore.member_done. Returns the opened gate's name, or false.
local function member_done(w, uuid, status, err, ttl)
  local gate = 'error'
  if status == 'success' then gate = redis.call('HGET', wf_key(w, 'n'), uuid) end
  rec_keys(w)
  local own = redis.call('HGET', K_REC, 's')
  if not own or FINAL[own] then
    -- Over. Read only, so a cancelled workflow whose gates were deleted gets none back: the
    -- member that opened a gate gets it again (its redelivery publishes what it opened).
    if gate and redis.call('HGET', wf_key(w, 'o'), gate) == uuid then return gate end
    expire_flow(w, ttl)  -- its gates (if still there) go with its record
    return false
  end
  -- Running: a success's record is read by a later step or the result, so its save's TTL is
  -- taken off (again, for a save run twice) until the workflow ends (release).
  if status == 'success' and ttl then keep(uuid, nil) end
  if redis.call('SADD', wf_key(w, 'd'), uuid) == 0 then
    if gate and redis.call('HGET', wf_key(w, 'o'), gate) == uuid then return gate end
    return false
  end
  if not gate then return false end
  if status == 'success' then
    if redis.call('HINCRBY', wf_key(w, 'c'), gate, -1) ~= 0 then return false end
    redis.call('HSET', wf_key(w, 'o'), gate, uuid)
    if gate == 'final' then
      end_record(w, 'success', false, '', ttl)
      local on_error = redis.call('HGET', wf_key(w, 'n'), '!on_error')
      if on_error then  -- never needed now: not left 'new' for ever
        end_record(on_error, 'cancel', 'cr', 'workflow ' .. w .. ' succeeded', ttl)
      end
      release(w, ttl)
      expire_flow(w, ttl)
    end
    return gate
  end
  local on_error = redis.call('HGET', wf_key(w, 'n'), '!on_error')
  if uuid == on_error then return false end  -- the error callback failing opens nothing
  redis.call('HSET', wf_key(w, 'o'), 'error', uuid)
  end_record(w, 'error', 'e', err, ttl)
  release(w, ttl)
  expire_flow(w, ttl)
  local reason = 'workflow ' .. w .. ' failed: ' .. err
  for _, m in ipairs(redis.call('LRANGE', wf_key(w, 'a'), 0, -1)) do
    if m ~= uuid and m ~= on_error then end_record(m, 'cancel', 'cr', reason, ttl) end
  end
  return gate
end

-- The messages of gate g of workflow w: {id, body, priority, delay_ms} each.
local function gate_messages(w, g)
  local out = {}
  local listed = redis.call('HGET', wf_key(w, 'm'), g)
  if not listed then return out end
  for _, m in ipairs(cjson.decode(listed)) do
    out[#out + 1] = {m[1], redis.call('HGET', wf_key(w, 'b'), m[1]), m[2], m[3]}
  end
  return out
end
"""

MEMBER_DONE = Script(
    storage_lua.PRELUDE
    + "local TAG = ARGV[1]\n"
    + WF_PRELUDE
    + r"""
-- KEYS: the storage's keys of the member's record. ARGV: TAG, ttl_ms, workflow, uuid,
-- status, error text. Returns the opened gate's messages, flat: id, body, priority, delay_ms.
local opened = member_done(ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[2]))
local out = {}
if opened then
  for _, m in ipairs(gate_messages(ARGV[3], opened)) do
    for i = 1, 4 do out[#out + 1] = m[i] end
  end
end
return out
"""
)

CANCEL_FLOW = Script(
    storage_lua.PRELUDE
    + "local TAG = ARGV[1]\n"
    + WF_PRELUDE
    + r"""
-- WorkflowStore.cancel_workflow, once the workflow's record turned 'cancel'. ARGV: TAG,
-- ttl_ms ('' for none), workflow. Its members' records get the TTL, then its keys are
-- deleted.
local w = ARGV[3]
release(w, tonumber(ARGV[2]))
for _, kind in ipairs({'c', 'm', 'n', 'o', 'd', 'a', 'b'}) do redis.call('DEL', wf_key(w, kind)) end
return 1
"""
)
"""The end of a cancelled workflow: its members' records expire, its keys are deleted."""

REPUBLISH = Script(
    r"""
-- WorkflowStore.republish. KEYS: record keys. Returns, per record, its publish generation
-- ('g') raised by one when its status is 'new', else 0 (begun, ended or gone).
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 's') == 'new' then
    out[i] = redis.call('HINCRBY', key, 'g', 1)
  else
    out[i] = 0
  end
end
return out
"""
)
"""Raise the publish generation of the records still ``new`` (see :class:`WorkflowStore`)."""

ADD_GATES = Script(
    r"""
-- KEYS: c, m, n, b, a of one workflow. ARGV: on_error uuid ('' for none), the number of
-- gates G, then G x (gate, counter, messages JSON), then (id, body) pairs of the gates'
-- messages up to the member list marker '|', then the members to append to the list.
local g = tonumber(ARGV[2])
local i = 3
for _ = 1, g do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
  i = i + 3
end
if ARGV[1] ~= '' then redis.call('HSET', KEYS[3], '!on_error', ARGV[1]) end
while ARGV[i] ~= '|' do
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
  i = i + 2
end
i = i + 1
local members = {}
for j = i, #ARGV do members[#members + 1] = ARGV[j] end
for j = 1, #members, 1000 do
  redis.call('RPUSH', KEYS[5], unpack(members, j, math.min(j + 999, #members)))
end
return 1
"""
)
"""The gates of a new workflow (feeds are written with :data:`ADD_FEEDS`)."""

INDEX = Script(
    SERVER_TIME
    + r"""
-- KEYS: TAG:wf. ARGV: TAG, the workflow's id, its creation time (µs), the result TTL in ms
-- ('' for none: no record expires). Lists the workflow, then removes the entries whose
-- record is gone among 8 of those created more than a TTL ago (only those can have
-- expired). The 8 start at a rank drawn from the clock, so workflows running for longer
-- than the TTL, oldest of all, do not hide the expired ones behind them; an add removes up
-- to 8 and adds one, so expired entries do not pile up (pruned only by listing before, the
-- index of a cluster whose workflows were never listed grew by one a workflow for ever).
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
local ttl = tonumber(ARGV[4])
if not ttl then return 0 end
local t = server_time()
local cutoff = (tonumber(t[1]) * 1000 - ttl) * 1000 + tonumber(t[2])  -- µs, exact in a double
local old = redis.call('ZCOUNT', KEYS[1], '-inf', string.format('(%.0f', cutoff))
if old == 0 then return 0 end
local gone = {}
local function check(from, to)
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], from, to)) do
    if redis.call('EXISTS', ARGV[1] .. ':r:' .. id) == 0 then gone[#gone + 1] = id end
  end
end
if old <= 8 then
  check(0, old - 1)
else  -- 8 in a row from any rank, wrapping round: every rank as likely
  local start = tonumber(t[2]) % old
  check(start, math.min(start + 7, old - 1))
  if start + 7 >= old then check(0, start + 7 - old) end
end
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
return #gone
"""
)
"""List a new workflow in ``TAG:wf``, pruning a few expired entries (returns how many)."""

ADD_FEEDS = Script(
    r"""
-- KEYS: n of one workflow. ARGV: (member uuid, gate) pairs.
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""
)

_PUBLISH_OPENED = """
-- Publish the messages of the gate ``opened`` of workflow w (nothing when it is false), each
-- due its delay after now, appending their ids to the list ``ids`` when given; after
-- ``broker_publish`` and the workflow prelude. With ``again`` (the member was counted
-- before: this settle is a repeat), only the messages not sent yet: of a step still 'new'
-- whose message is not in the queue (a PUBLISH would replace a queued or delivered copy).
local function publish_opened(w, opened, ids, again)
  if not opened then return end
  for _, m in ipairs(gate_messages(w, opened)) do
    if not again or (redis.call('HGET', TAG .. ':r:' .. m[1], 's') == 'new'
        and redis.call('HEXISTS', K_BODY, m[1]) == 0) then
      local eta = ''
      if tonumber(m[4]) > 0 then eta = tostring(now_ms() + tonumber(m[4])) end
      broker_publish({m[1], m[2], m[3], eta})
      if ids then ids[#ids + 1] = m[1] end
    end
  end
end
"""

_TWO_PRELUDES = storage_lua.PRELUDE + _keys_from(second(broker_lua.PRELUDE), _STORAGE_KEYS)

_FUNCTIONS = (
    f"""
local function storage(ARGV)
{_body(storage_lua.SAVE, storage_lua.PRELUDE)}
end
local function broker_publish(ARGV)
{_body(broker_lua.PUBLISH, broker_lua.PRELUDE)}
end
local function broker_ack(ARGV)
{_body(broker_lua.ACK, broker_lua.PRELUDE)}
end
"""
    + _PUBLISH_OPENED
)


def _ack_finals_wf(*, begins: bool) -> Script:
    """ACK_FINALS_WF, or with ``begins`` ACK_FINALS_WF then the begins
    (:data:`~qtasks_redis.shared_lua.BEGINS`; their fields come before the published ids)."""
    first = "BEGINS_END" if begins else "1"
    return Script(
        _TWO_PRELUDES
        + "local TAG = ARGV[1]\n"
        + WF_PRELUDE
        + _FUNCTIONS
        + (shared_lua.BEGINS if begins else "")
        + f"""
-- SharedServer.ack_finals with workflows: KEYS are the storage's keys of the first task's
-- record, then the queue's; ARGV: TAG, then per task SAVE's {_SAVE_ARGS} arguments, ACK's
-- (id, token), the task's workflow ('' for none) and the error text naming it. After an
-- accepted save of a workflow member, its gate is counted down and an opened gate's messages
-- are published, before the ack: one atomic change. A save accepted again (the record was
-- final already with this token: the script runs again for a reply that was lost) publishes
-- only what was not sent (publish_opened's ``again``). Returns each task's SAVE reply, then
-- the ids of the messages so published.
local out, base, ids = {{}}, {first}, {{}}
while base < #ARGV do
  local sa = {{}}
  for i = 1, {_SAVE_ARGS} do sa[i] = ARGV[base + i] end
  local uuid = sa[1]
  rec_keys(uuid)
  local at = base + {_SAVE_ARGS}
  local w = ARGV[at + 3]
  local was = w ~= '' and redis.call('HGET', K_REC, 's')
  local saved = storage(sa)
  if saved == 1 and w ~= '' then
    local opened = member_done(w, uuid, sa[3], ARGV[at + 4], tonumber(sa[8]))
    publish_opened(w, opened, ids, was and FINAL[was])
  end
  if saved ~= 0 then broker_ack({{ARGV[at + 1], ARGV[at + 2]}}) end
  out[#out + 1] = saved
  base = at + 4
end
"""
        + ("begin_all(out)\n" if begins else "")
        + """for _, id in ipairs(ids) do out[#out + 1] = id end
return out
"""
    )


ACK_FINALS_WF = _ack_finals_wf(begins=False)
"""SharedServer.ack_finals when a workflow member is among the tasks."""

ACK_FINALS_WF_BEGIN = _ack_finals_wf(begins=True)
"""ACK_FINALS_WF, then the begins (:data:`~qtasks_redis.shared_lua.ACK_FINALS_BEGIN`'s
arguments with the workflow script's per-task ones)."""

_FRESH_BATCH = r"""
-- A batch's record keys, and whether it is fresh: every record 'new' and none stored yet.
-- Its records' arguments start at ARGV[first], stride apart, each with its uuid first and
-- its status third.
local function fresh_batch(first, stride)
  local recs, fresh = {}, #ARGV >= first
  for at = first, #ARGV, stride do
    recs[#recs + 1] = TAG .. ':r:' .. ARGV[at]
    if ARGV[at + 2] ~= 'new' then fresh = false end
  end
  if fresh and redis.call('EXISTS', unpack(recs)) ~= 0 then fresh = false end
  return recs, fresh
end
"""

PUBLISH_NEW_MANY = Script(
    _TWO_PRELUDES
    + "local TAG = ARGV[1]\n"
    + WF_PRELUDE
    + _FUNCTIONS
    + _FRESH_BATCH
    + """
-- BulkPublishNew: KEYS as ACK_FINALS_WF; ARGV: TAG, ttl_ms, the call's nonce (as
-- shared_lua.PUBLISH_NEW's, stored in each record as 'p'), then per task the record's uuid,
-- JSON, status, token, task name and parent uuid ('' for none) (SAVE, forced) and the
-- message's id, body, priority and eta_ms (PUBLISH): 10 a task instead of SAVE's and
-- PUBLISH's 14 (fewer to encode and send).
local ttl, NONCE = ARGV[2], ARGV[3]
local n = (#ARGV - 3) / 10
-- A batch of fresh tasks (no record nor message of it exists yet, as with new uuids: the
-- usual case) costs one write per record; each index, hash and queue is written once for
-- the whole batch. Any other batch goes task by task through SAVE and PUBLISH, as add_task.
local recs, fresh = fresh_batch(4, 10)
local ids = {}
for i = 0, n - 1 do ids[i + 1] = ARGV[10 + i * 10] end
if fresh then
  for _, body in ipairs(redis.call('HMGET', K_BODY, unpack(ids))) do
    if body then fresh = false break end
  end
end
if not fresh then
  -- This call run again (re-sent after its reply was lost): its first run wrote every
  -- record of the batch, with the nonce, and their tasks may have run since. Nothing is
  -- written; the reply is the first run's.
  for _, rec in ipairs(recs) do
    if redis.call('HGET', rec, 'p') == NONCE then return 1 end
  end
end
if fresh then
  local now = now_ms()
  local seq = redis.call('INCRBY', K_SEQ, n) - n
  local new, bodies, metas, ready, delayed = {}, {}, {}, {}, {}
  for i = 0, n - 1 do
    local base, id = 3 + i * 10, ids[i + 1]
    K_REC = recs[i + 1]
    redis.call('HSET', K_REC, 'd', ARGV[base + 2], 's', 'new', 't', ARGV[base + 4], 'p', NONCE)
    new[#new + 1] = now
    new[#new + 1] = ARGV[base + 1]
    parented(ARGV[base + 1], ARGV[base + 6], now, tonumber(ttl))
    bodies[#bodies + 1] = id
    bodies[#bodies + 1] = ARGV[base + 8]
    metas[#metas + 1] = id
    metas[#metas + 1] = ARGV[base + 9]
    local eta = tonumber(ARGV[base + 10])
    if eta and eta > now then
      delayed[#delayed + 1] = eta
      delayed[#delayed + 1] = id
    else  -- ready_score's, with the batch's sequence numbers
      local p = tonumber(ARGV[base + 9]) or 0
      if p > 899 then p = 899 elseif p < -899 then p = -899 end
      ready[#ready + 1] = p * SPAN + seq + i + 1
      ready[#ready + 1] = id
    end
  end
  redis.call('ZADD', IDX.new, unpack(new))
  redis.call('HSET', K_BODY, unpack(bodies))
  redis.call('HSET', K_META, unpack(metas))
  if #ready > 0 then redis.call('ZADD', K_READY, unpack(ready)) end
  if #delayed > 0 then redis.call('ZADD', K_DELAYED, unpack(delayed)) end
  notify()
  return 1
end
for base = 3, #ARGV - 1, 10 do
  rec_keys(ARGV[base + 1])
  storage({ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4], '0', '', '1', ttl,
           ARGV[base + 5], ARGV[base + 6], NONCE})
  broker_publish({ARGV[base + 7], ARGV[base + 8], ARGV[base + 9], ARGV[base + 10]})
end
return 1
"""
)

ADD_MANY = Script(
    storage_lua.PRELUDE
    + f"""
local function save(ARGV)
{_body(storage_lua.SAVE, storage_lua.PRELUDE)}
end
-- BulkAdd: KEYS as SAVE's (of the batch's first record); ARGV: TAG, then per record SAVE's
-- ten (forced). A batch of new records none of which is stored yet costs one HSET each and
-- one ZADD of the index; any other batch goes record by record through SAVE.
local TAG = ARGV[1]
{_FRESH_BATCH}
local n = (#ARGV - 1) / 10
local recs, fresh = fresh_batch(2, 10)
if fresh then
  local now = now_ms()
  local new = {{}}
  for i = 0, n - 1 do
    local b = 1 + i * 10
    K_REC = recs[i + 1]
    redis.call('HSET', K_REC, 'd', ARGV[b + 2], 's', 'new', 't', ARGV[b + 4])
    new[#new + 1] = now
    new[#new + 1] = ARGV[b + 1]
    parented(ARGV[b + 1], ARGV[b + 10], now, tonumber(ARGV[b + 8]))
  end
  redis.call('ZADD', IDX.new, unpack(new))
  return 1
end
for b = 1, #ARGV - 1, 10 do
  local uuid = ARGV[b + 1]
  K_REC, K_WAKE, K_STEPS = TAG .. ':r:' .. uuid, TAG .. ':w:' .. uuid, TAG .. ':s:' .. uuid
  save({{uuid, ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5], ARGV[b + 6], ARGV[b + 7],
        ARGV[b + 8], ARGV[b + 9], ARGV[b + 10]}})
end
return 1
"""
)

PUBLISH_MANY = Script(
    broker_lua.PRELUDE
    + f"""
local function broker_publish(ARGV)
{_body(broker_lua.PUBLISH, broker_lua.PRELUDE)}
end
-- BulkPublish: ARGV: per message PUBLISH's (id, body, priority, eta_ms).
for base = 0, #ARGV - 1, 4 do
  broker_publish({{ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]}})
end
return 1
"""
)

_CLAIM_HEAD = shared_lua.CLAIM_BEGIN.source[: -len(broker_lua.CLAIM_BODY)]
assert shared_lua.CLAIM_BEGIN.source.endswith(broker_lua.CLAIM_BODY)
assert broker_lua.CLAIM_BODY.endswith("return out\n")

CLAIM_BEGIN_WF = Script(
    _CLAIM_HEAD
    # The storage prelude over CLAIM_BEGIN's keys: its status indexes are KEYS[13..18]; the
    # record keys it would read (KEYS[10..12]) are set by rec_keys before any use.
    + _keys_from(second(storage_lua.PRELUDE), 9)
    + WF_PRELUDE
    + f"""
local function broker_publish(ARGV)
{_body(broker_lua.PUBLISH, broker_lua.PRELUDE)}
end
{_PUBLISH_OPENED}
local record_dead = on_dead
local CLAIM_PUBLISHED = {{}}
-- A workflow member dead-lettered by its delivery limit fails its workflow, as a member that
-- failed after its retries does (its error gate publishes the error callback).
-- A member whose record its last worker already ended as dead-lettered (the lease of its
-- last allowed delivery ran out while it ran) and that died before telling its workflow is
-- counted here: ``again``, as a repeat (member_done is idempotent, publish_opened skips what
-- was sent). Returns whether it published (CLAIM_BODY then pops the ready set again: before,
-- a claim that had popped it short deleted the callback's wake-up, and the callback waited
-- for an idle consumer's next claim, up to min(lease, 5 s)).
local function on_dead(id, reason, repeated)
  local rec = TAG .. ':r:' .. id
  local was = redis.call('HGET', rec, 's')
  local again = was == 'error' and redis.call('HGET', rec, 't') == 'dead-letter'
  local _, ended = record_dead(id, reason, repeated)
  if not was or (FINAL[was] and not again) then return false, ended end
  local ok, d = pcall(cjson.decode, redis.call('HGET', rec, 'd') or '')
  if not ok or type(d) ~= 'table' then return false, ended end
  local w, task = d.workflow, d.task_name
  if d[1] == 1 or d[1] == 2 then w, task = d[#d], d[3] end
  if type(w) ~= 'string' then return false, ended end
  local err = 'member ' .. id .. ' (' .. tostring(task) .. ') error: dead-lettered: ' .. reason
  local before = #CLAIM_PUBLISHED
  publish_opened(w, member_done(w, id, 'error', err, TTL), CLAIM_PUBLISHED, again)
  return #CLAIM_PUBLISHED > before, ended
end
"""
    # When it published or ended anything, two elements go last (the reply is otherwise a
    # wait then 13 elements per delivery, so two over say they are there): the ids it
    # published, comma-separated ('' for none), and the fields of the records its dead
    # letters ended, 10 per record (on_dead's ENDED).
    + broker_lua.CLAIM_BODY.removesuffix("return out\n")
    + """if #CLAIM_PUBLISHED > 0 or #ENDED > 0 then
  out[#out + 1] = table.concat(CLAIM_PUBLISHED, ',')
  out[#out + 1] = ENDED
end
return out
"""
)
"""CLAIM_BEGIN whose dead-lettering of a workflow member also fails its workflow."""
