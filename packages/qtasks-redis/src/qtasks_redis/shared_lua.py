"""Scripts that run a storage script and a broker script as one, for a broker and a storage on
the same (non-cluster) Redis server: one round trip instead of two, and atomic, so a crash can no
longer leave a record without its message or a final record without its ack.

Each part is the unchanged source of the storage or broker script, wrapped in a local function
whose ``KEYS`` and ``ARGV`` parameters shadow the globals, so both run exactly as they do alone.
The storage part's keys and arguments come first; their counts are fixed.
"""

from __future__ import annotations

from qtasks_redis import broker_lua, storage_lua
from qtasks_redis.connection import Script

STORAGE_KEYS = 9
"""Keys of one task record: rec, wake, steps and the six status indexes."""
BROKER_KEYS = len(broker_lua.KEY_NAMES)
SAVE_ARGS = 8
"""Arguments of the storage's SAVE: uuid, json, status, token, has_fence, fence, force, ttl."""


def _combine(storage: Script, broker: Script, broker_args: int, *, gate: bool) -> Script:
    """``storage`` then ``broker``; with ``gate``, the broker part runs only when the storage
    part returned 1. Returns the storage part's reply."""
    run_broker = "if saved == 1 then broker(bk, ba) end" if gate else "broker(bk, ba)"
    return Script(
        f"""
local function storage(KEYS, ARGV)
{storage.source}
end
local function broker(KEYS, ARGV)
{broker.source}
end
local sk, bk, sa, ba = {{}}, {{}}, {{}}, {{}}
for i = 1, {STORAGE_KEYS} do sk[i] = KEYS[i] end
for i = 1, {BROKER_KEYS} do bk[i] = KEYS[{STORAGE_KEYS} + i] end
for i = 1, {SAVE_ARGS} do sa[i] = ARGV[i] end
for i = 1, {broker_args} do ba[i] = ARGV[{SAVE_ARGS} + i] end
local saved = storage(sk, sa)
{run_broker}
return saved
"""
    )


PUBLISH_NEW = _combine(storage_lua.SAVE, broker_lua.PUBLISH, 4, gate=False)
"""Storage SAVE (forced: a new record) then broker PUBLISH (id, body, priority, eta_ms)."""

ACK_FINAL = _combine(storage_lua.SAVE, broker_lua.ACK, 2, gate=True)
"""Storage SAVE fenced by the delivery's token, then, when accepted, broker ACK (id, token)."""
