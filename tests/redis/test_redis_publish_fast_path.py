"""PUBLISH_NEW's fast path (a new task's common enqueue, run before the preludes) writes what
the general path writes: the same calls, run once through the whole script and once through
the script without its fast path, on two key prefixes, leave the same keys, values, scores
and TTLs, and return the same replies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis
from redis_keys import delete_redis_keys, new_redis_prefix

from qtasks_redis import RedisBroker, RedisStorage, shared_lua
from qtasks_redis.connection import Script

GENERAL = Script(shared_lua.PUBLISH_NEW.source.removeprefix(shared_lua.NEW_FAST_PATH))
SPAN = 10**13


class Side:
    """One prefix and the script it runs."""

    def __init__(self, client: redis.Redis, url: str, prefix: str, script: Script) -> None:
        self.client, self.prefix, self.script = client, prefix, script
        self.storage = RedisStorage(url, prefix=prefix)
        self.broker = RedisBroker(url, prefix=prefix, queue="q")
        self.sha = client.script_load(script.code)

    def publish(self, uuid: str, nonce: str, **over: Any) -> Any:
        args = {
            "json": json.dumps({"uuid": uuid}),
            "status": "new",
            "token": "",
            "has_fence": "0",
            "fence": "",
            "force": "1",
            "ttl": "86400000",
            "task_name": "t",
            "parent": "",
            "id": uuid,
            "body": f"body of {uuid}",
            "priority": "0",
            "eta": "",
        } | over
        keys = (*self.storage._keys(uuid), *self.broker.keys)
        argv = (uuid, *args.values(), nonce)
        return self.client.evalsha(self.sha, len(keys), *keys, *argv)

    def dump(self) -> dict[str, Any]:
        """Every key of the prefix, named without it: its value, and whether it has a TTL.
        Scores that are server times (ms) are replaced by 'time'."""
        out: dict[str, Any] = {}
        for raw in self.client.scan_iter(match=f"*{self.prefix}*", count=1000):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            kind = cast(bytes, self.client.type(key)).decode()
            value: Any
            if kind == "hash":
                value = sorted(self.client.hgetall(key).items())
            elif kind == "zset":
                pairs = cast(
                    "list[tuple[bytes, float]]", self.client.zrange(key, 0, -1, withscores=True)
                )
                value = [(m, "time" if 10**12 < s < SPAN else s) for m, s in pairs]
            elif kind == "list":
                value = self.client.lrange(key, 0, -1)
            else:
                value = self.client.get(key)
            out[key.replace(self.prefix, "P")] = (kind, value, self.client.pttl(key) > 0)
        return out


@pytest.fixture
def sides(redis_url: str, redis_prefix: str) -> Iterator[tuple[Side, Side]]:
    client = redis.Redis.from_url(redis_url)
    other = new_redis_prefix()
    try:
        yield (
            Side(client, redis_url, redis_prefix, shared_lua.PUBLISH_NEW),
            Side(client, redis_url, other, GENERAL),
        )
    finally:
        delete_redis_keys(redis_url, other)
        client.close()


def both(sides: tuple[Side, Side], uuid: str, nonce: str, **over: Any) -> None:
    fast, general = sides
    assert fast.publish(uuid, nonce, **over) == general.publish(uuid, nonce, **over)
    assert fast.dump() == general.dump()


def test_the_general_path_is_the_script_without_its_first_part() -> None:
    assert shared_lua.PUBLISH_NEW.source.startswith(shared_lua.NEW_FAST_PATH)
    assert GENERAL.source != shared_lua.PUBLISH_NEW.source
    assert "HSETNX" not in GENERAL.code


def test_new_tasks_of_every_priority(sides: tuple[Side, Side]) -> None:
    for n, priority in enumerate(("0", "5", "-3", "2000", "-2000", "x")):
        both(sides, f"u{n}", f"n{n}", priority=priority)
    # The lowest score first: -2000, clamped to -899.
    assert sides[0].client.zrange(f"{{{sides[0].prefix}:q}}:ready", 0, 0) == [b"u4"]


def test_the_same_call_sent_again_writes_nothing(sides: tuple[Side, Side]) -> None:
    both(sides, "u1", "n1")
    both(sides, "u1", "n1")
    assert sides[0].client.zcard(f"{{{sides[0].prefix}:q}}:ready") == 1


def test_what_the_fast_path_leaves_to_the_general_one(sides: tuple[Side, Side]) -> None:
    both(sides, "u1", "n1")
    both(sides, "u1", "n2")  # the same uuid again: replaces record and message
    both(sides, "u2", "n3", parent="u1")
    both(sides, "u2b", "n3b", parent="u1", ttl="")
    both(sides, "u3", "n4", eta="99999999999999")
    both(sides, "u3b", "n4b", eta="1")  # due already
    both(sides, "u4", "n5", status="success")
    both(sides, "u5", "n6", force="n")
    # A message whose record is gone (expired, deleted): the general path replaces it.
    for side in sides:
        side.client.delete(side.storage._keys("u1")[0])
    both(sides, "u1", "n7")


def test_the_wake_up_list_stays_short(sides: tuple[Side, Side]) -> None:
    for n in range(70):
        both(sides, f"u{n}", f"n{n}")
    assert sides[0].client.llen(f"{{{sides[0].prefix}:q}}:notify") == 64


def test_the_fast_path_takes_a_new_tasks_common_case_only(
    redis_url: str, redis_prefix: str
) -> None:
    # The fast path's last statement made to say that it ran.
    ran = shared_lua.NEW_FAST_PATH.rsplit("return 1", 1)
    assert len(ran) == 2
    probe = Script("return 'fast'".join(ran) + GENERAL.source)
    client = redis.Redis.from_url(redis_url)
    try:
        side = Side(client, redis_url, redis_prefix, probe)
        assert side.publish("u1", "n1") == b"fast"
        assert side.publish("u1", "n1") == 1  # sent again
        assert side.publish("u2", "n2", priority="7") == b"fast"
        assert side.publish("u3", "n3", parent="u2") == b"fast"
        assert side.publish("u4", "n4", eta="99999999999999") == b"fast"
        for n, over in enumerate(({"status": "success"}, {"force": "n"})):
            assert side.publish(f"v{n}", f"m{n}", **over) == 1, over
        assert side.publish("u1", "n5") == 1  # its record exists
        client.delete(side.storage._keys("u1")[0])
        assert side.publish("u1", "n6") == 1  # its message exists
    finally:
        client.close()
