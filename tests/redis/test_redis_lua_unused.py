"""The Lua the server runs is the script's source without the local functions it never calls
(qtasks_redis.lua_unused): each would cost a closure on every call."""

from __future__ import annotations

import pytest
import redis

from qtasks_redis import broker_lua, shared_lua, storage_lua, workflow_lua
from qtasks_redis.connection import Script
from qtasks_redis.lua_unused import without_unused

SOURCE = """
local K = KEYS[1]
local function helper(x) return x .. 'end' end  -- a comment naming unused
local function unused(x)
  if x then
    for i = 1, 2 do x = helper(x) end
  end
  return unused(x)  -- only itself calls it
end
local function called_by_unused_only() return 1 end
local function nested()
  local function inner() return "unused" end
  return inner()
end
local s = [[ called_by_unused_only ]]
return {helper(K), nested()}
"""


def test_drops_the_functions_nothing_else_calls() -> None:
    code = without_unused(SOURCE)
    assert "local function unused(" not in code
    assert "local function helper(" in code
    assert "local function nested(" in code
    assert "local function inner(" in code  # not top-level: left as it is
    # Named only in a string and by the dropped function: dropped once that one is.
    assert "local function called_by_unused_only(" not in code
    assert "[[ called_by_unused_only ]]" in code


def test_a_source_without_unused_functions_is_unchanged() -> None:
    source = "local function f() return 1 end\nreturn f()\n"
    assert without_unused(source) == source


def test_unbalanced_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="unbalanced"):
        without_unused("local function f() if x then return 1 end\n")


def test_the_hot_scripts_leave_out_what_they_never_call() -> None:
    # PUBLISH_NEW: the broker's claim and dead-letter helpers, the storage's begin helpers.
    for name in ("promote", "dead", "prune_dead", "keep_attempt", "stale_copy", "forget"):
        assert f"local function {name}(" in shared_lua.PUBLISH_NEW.source
        assert f"local function {name}(" not in shared_lua.PUBLISH_NEW.code
    for name in ("index", "named", "parented", "finished", "schedule", "notify"):
        assert f"local function {name}(" in shared_lua.PUBLISH_NEW.code
    # ACK_FINALS settles: nothing of publishing.
    for name in ("schedule", "notify", "ready_score", "promote"):
        assert f"local function {name}(" not in shared_lua.ACK_FINALS.code
    assert "local function valid(" in shared_lua.ACK_FINALS.code


SCRIPTS = [
    (f"{module.__name__}.{name}", value)
    for module in (broker_lua, storage_lua, shared_lua, workflow_lua)
    for name, value in vars(module).items()
    if isinstance(value, Script)
]


@pytest.mark.parametrize(("name", "script"), SCRIPTS, ids=[name for name, _ in SCRIPTS])
def test_every_script_compiles_and_is_run_by_its_sha(
    redis_url: str, name: str, script: Script
) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.script_load(script.code) == script.sha, name
    finally:
        client.close()
