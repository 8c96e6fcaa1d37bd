"""The Redis global config: namespaced JSON values with TTLs, and worker heartbeats.

A namespace ``ns`` is the hash tag ``{<prefix>:gc:ns}``: its values are string keys
``{...}:k:<key>`` (so Redis expires them itself) and ``{...}:idx`` is a ZSET key -> expiry (ms,
``+inf`` for none) that lists them without scanning the keyspace.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from typing import Any, Self

from redis.exceptions import ResponseError

from qtasks.config import QueueConfig
from qtasks.errors import ComponentError, SerializationError
from qtasks_redis.connection import (
    DEFAULT_URL,
    Client,
    RedisTarget,
    Script,
    SharedClient,
    check_options,
    common_options,
    delete_matching,
    glob_escape,
)
from qtasks_redis.failures import guarded
from qtasks_redis.flow import RedisFlowControl
from qtasks_redis.lua_time import SERVER_TIME

_PRELUDE = (
    SERVER_TIME
    + r"""
local function put(idx, key, name, value, ttl)
  if ttl then
    -- Names whose keys expired go as new ones with a TTL come (a timer claims one per tick:
    -- pruned only by get_all, the index grew by 86,400 names a day for a 1 s timer).
    local now = now_ms()
    redis.call('ZREMRANGEBYSCORE', idx, '-inf', now)
    redis.call('SET', key, value, 'PX', ttl)
    redis.call('ZADD', idx, now + ttl, name)
  else
    redis.call('SET', key, value)
    redis.call('ZADD', idx, '+inf', name)
  end
end
"""
)

# KEYS: idx, key. ARGV: name, value, ttl_ms ('' for none), only_if_absent ('1'/'0')
_SET = Script(
    _PRELUDE
    + r"""
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
put(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]))
return 1
"""
)

# KEYS: idx, key. ARGV: name, amount
_INCREMENT = Script(
    _PRELUDE
    + r"""
local new = redis.call('INCRBYFLOAT', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[1], 'NX', '+inf', ARGV[1])
return new
"""
)

# KEYS: idx, key. ARGV: name
_DELETE = Script(
    r"""
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('DEL', KEYS[2])
"""
)

# KEYS: idx, key. ARGV: name, value (JSON)
_DELETE_IF_EQUAL = Script(
    r"""
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('DEL', KEYS[2])
"""
)

# KEYS: idx. ARGV: key prefix. Returns {name, value, ...} of live keys.
_GET_ALL = Script(
    _PRELUDE
    + r"""
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms())
local out = {}
for _, name in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local value = redis.call('GET', ARGV[1] .. name)
  if value then
    out[#out + 1] = name
    out[#out + 1] = value
  else
    redis.call('ZREM', KEYS[1], name)
  end
end
return out
"""
)

# KEYS: idx. ARGV: key prefix
_CLEAR = Script(
    r"""
for _, name in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('DEL', ARGV[1] .. name)
end
redis.call('DEL', KEYS[1])
return 1
"""
)


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"cannot store as JSON: {exc}") from exc


def _ttl_ms(ttl: float | None) -> str:
    return "" if ttl is None else str(max(int(ttl * 1000), 1))


class RedisGlobalConfig(RedisFlowControl):
    """A Redis-backed :class:`~qtasks.components.GlobalConfig`, with
    :class:`~qtasks.components.FlowControl` (see :mod:`qtasks_redis.flow`).

    ``get_all`` and ``clear`` are atomic per namespace; a namespace lives in one cluster slot.
    Rate limits, unique holds and TTLs are timed by the Redis server, never by ``app.clock``
    (so a test harness's fake clock does not move them).
    """

    default_url = DEFAULT_URL
    """The address used when no URL is given (logged by the configuration)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "qtasks",
        cluster: bool = False,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.target = RedisTarget.parse(url, cluster=cluster)
        self.prefix = prefix
        self._options = check_options(dict(options or {}))
        self._shared = SharedClient(self.target, "RedisGlobalConfig", lane=False)

    @classmethod
    def from_config(cls, config: QueueConfig) -> Self:
        """Built from ``config.global_config_url`` and ``config.extra`` (``redis_prefix``,
        ``redis_cluster`` and client options ``redis_*``)."""
        return cls(config.global_config_url, **common_options(config.extra))

    def __repr__(self) -> str:
        return f"RedisGlobalConfig({self.target.where}, prefix={self.prefix!r})"

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        await self._shared.acquire(stack, {**config.extra, **self._options})

    def _require(self) -> Client:
        return self._shared.get()

    async def flush(self) -> int:
        """Delete every namespace of this prefix; return how many keys (for
        ``app.flush_all``)."""
        client = self._require()
        count = 0
        for start in (f"{{{self.prefix}:gc:", f"{{{self.prefix}:flow}}"):
            count += await delete_matching(self.target, client, glob_escape(start) + "*")
        return count

    def _names(self, namespace: str) -> tuple[str, str]:
        """The namespace's index key and the prefix of its value keys."""
        tag = f"{{{self.prefix}:gc:{namespace}}}"
        return f"{tag}:idx", f"{tag}:k:"

    async def _run(self, script: Script, keys: tuple[str, ...], *args: Any) -> Any:
        client = self._require()
        return await guarded(self.target, script(client, keys, args))

    async def get(self, namespace: str, key: str, default: Any = None) -> Any:
        client = self._require()
        _, prefix = self._names(namespace)
        raw = await guarded(self.target, client.get(prefix + key))
        return default if raw is None else json.loads(raw)

    async def set(self, namespace: str, key: str, value: Any, *, ttl: float | None = None) -> None:
        idx, prefix = self._names(namespace)
        await self._run(_SET, (idx, prefix + key), key, _dumps(value), _ttl_ms(ttl), "0")

    async def set_if_absent(
        self, namespace: str, key: str, value: Any, *, ttl: float | None = None
    ) -> bool:
        idx, prefix = self._names(namespace)
        done = await self._run(_SET, (idx, prefix + key), key, _dumps(value), _ttl_ms(ttl), "1")
        return bool(done)

    async def delete(self, namespace: str, key: str) -> bool:
        idx, prefix = self._names(namespace)
        return bool(await self._run(_DELETE, (idx, prefix + key), key))

    async def delete_if_equal(self, namespace: str, key: str, value: Any) -> bool:
        """See :class:`~qtasks.components.CompareDelete` (compared as the JSON stored)."""
        idx, prefix = self._names(namespace)
        return bool(await self._run(_DELETE_IF_EQUAL, (idx, prefix + key), key, _dumps(value)))

    async def get_all(self, namespace: str) -> dict[str, Any]:
        idx, prefix = self._names(namespace)
        reply = await self._run(_GET_ALL, (idx,), prefix)
        return {reply[i].decode(): json.loads(reply[i + 1]) for i in range(0, len(reply), 2)}

    async def clear(self, namespace: str) -> None:
        idx, prefix = self._names(namespace)
        await self._run(_CLEAR, (idx,), prefix)

    async def increment(self, namespace: str, key: str, amount: float = 1) -> float:
        idx, prefix = self._names(namespace)
        try:
            new = await self._run(_INCREMENT, (idx, prefix + key), key, repr(float(amount)))
        except ResponseError as exc:  # the stored value is not a number
            raise ComponentError(f"cannot increment {namespace}/{key}: {exc}") from exc
        return float(new)

    async def heartbeat(self, worker_id: str, info: dict[str, Any], ttl: float) -> None:
        await self.set("workers", worker_id, dict(info), ttl=ttl)

    async def workers(self) -> dict[str, dict[str, Any]]:
        return await self.get_all("workers")

    async def end_heartbeat(self, worker_id: str) -> None:
        """See :class:`~qtasks.components.HeartbeatEnd`."""
        await self.delete("workers", worker_id)
