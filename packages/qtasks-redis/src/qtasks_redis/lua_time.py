"""The server time in the Lua scripts: ``TIME`` read once per script call.

Both preludes (:mod:`~qtasks_redis.broker_lua`, :mod:`~qtasks_redis.storage_lua`) start with
:data:`SERVER_TIME`. A script made of both keeps the first copy only (:func:`second`), so the
storage's and the broker's parts of one call read one instant, in one ``TIME`` call: a script
is atomic, so nothing it does needs the clock to move on inside it.
"""

from __future__ import annotations

SERVER_TIME = r"""
local SERVER_NOW = false
-- The server's TIME, read once per script call.
local function server_time()
  if not SERVER_NOW then SERVER_NOW = redis.call('TIME') end
  return SERVER_NOW
end
local function now_ms()
  local t = server_time()
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The server time as a record's updated_at: '<seconds>.<microseconds>'.
local function updated_at()
  local t = server_time()
  return t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end
"""


def second(prelude: str) -> str:
    """``prelude`` placed after another one in the same script: without its own copy of the
    time functions, which the first one's serve."""
    if prelude.count(SERVER_TIME) != 1:
        raise ValueError("the prelude does not hold the time functions exactly once")
    return prelude.replace(SERVER_TIME, "")
