"""The trimming of RedisStorage's indexes of final records after a long idle spell: one script
call looks at a bounded number of entries, however many expired meanwhile (``storage_lua.trim``).
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from test_redis_storage import make_storage, record

from qtasks.components import RecordQuery
from qtasks.record import TaskStatus
from qtasks_redis.storage import RedisStorage

pytestmark = pytest.mark.anyio

EXPIRED = 50_000
"""Entries of records that expired, left on the success index as after a long idle spell."""
MOST = 5_000
"""Most entries one script call may look at (a few thousand: a few ms of the server's time)."""
KEPT = [f"old-{i:06d}" for i in range(0, EXPIRED, 7001)]
"""Entries among them whose record still exists (kept past the TTL, as a workflow's members)."""


def _names(members: Any) -> list[str]:
    """ZSET members as read by redis-py (bytes), as text."""
    return [member.decode() for member in members]


async def _fill(storage: RedisStorage, raw: aioredis.Redis) -> tuple[str, float]:
    """The success index holding :data:`EXPIRED` entries a day old, three to a millisecond
    (so a trim may stop inside one), of which :data:`KEPT` have a record; returns the index
    key and the score below which they all are."""
    for uuid in KEPT:
        await storage.save(record(uuid, status=TaskStatus.SUCCESS))
    key = storage.index_keys[2]
    base = (time.time() - 86_400) * 1000 // 1
    async with raw.pipeline(transaction=False) as pipe:
        for start in range(0, EXPIRED, 5000):
            chunk = range(start, min(start + 5000, EXPIRED))
            pipe.zadd(key, {f"old-{i:06d}": base + i // 3 for i in chunk})
        await pipe.execute()
    return key, base + EXPIRED


async def _save_until_trimmed(
    storage: RedisStorage, raw: aioredis.Redis, key: str, below: float, n: int
) -> tuple[int, int]:
    """Final saves, one at a time, until one of them trimmed ``key``; returns how many of its
    entries below ``below`` are left, and the number of the last save."""
    before = await raw.zcount(key, "-inf", f"({below}")
    with anyio.fail_after(10):
        while True:
            n += 1
            await storage.save(record(f"new-{n}", status=TaskStatus.SUCCESS))
            left = int(await raw.zcount(key, "-inf", f"({below}"))
            if left < before:
                return left, n


async def test_one_save_trims_a_bounded_part_of_a_long_backlog(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """Item 1: the first trim after an idle spell looked at every entry below the cutoff in one
    script call (~1 us each, the whole server blocked meanwhile); it now looks at
    :data:`MOST` at most, the next saves going on from where it stopped, so that the backlog
    is emptied of the expired ones, and the kept ones stay (looked at once: on ``<tag>:tk``)."""
    storage = await make_storage(stack, redis_url, prefix, result_ttl=60)
    raw = aioredis.Redis.from_url(redis_url)
    stack.push_async_callback(raw.aclose)
    key, below = await _fill(storage, raw)
    left, n = await _save_until_trimmed(storage, raw, key, below, 0)
    assert EXPIRED - MOST <= left < EXPIRED
    # Where it stopped: the index key's field stays a number (as earlier versions read it).
    assert float(await raw.hget(f"{storage.key_tag}:tm", key) or "nan") < below
    calls = 1
    with anyio.fail_after(60):
        while left > len(KEPT):
            left, n = await _save_until_trimmed(storage, raw, key, below, n)
            calls += 1
    assert calls >= EXPIRED // MOST
    assert sorted(_names(await raw.zrangebyscore(key, "-inf", f"({below}"))) == KEPT
    tk = set(_names(await raw.zrange(f"{storage.key_tag}:tk", 0, -1)))
    assert tk == {f"{len(uuid)}:{uuid}{key}" for uuid in KEPT}


async def test_stats_counts_no_expired_record_while_a_backlog_is_left(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """A save's bounded trim leaves most of the backlog; ``stats`` trims it all (a bounded
    script call at a time) before it counts."""
    storage = await make_storage(stack, redis_url, prefix, result_ttl=60)
    raw = aioredis.Redis.from_url(redis_url)
    stack.push_async_callback(raw.aclose)
    key, below = await _fill(storage, raw)
    assert (await _save_until_trimmed(storage, raw, key, below, 0))[0] > EXPIRED - MOST
    saved = await raw.zcount(key, below, "+inf")
    assert await storage.stats() == {"success": saved + len(KEPT)}
    assert await raw.zcard(key) == saved + len(KEPT)


async def test_query_lists_no_expired_record_while_a_backlog_is_left(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """The entries a bounded trim left are skipped by ``query`` (they have no record)."""
    storage = await make_storage(stack, redis_url, prefix, result_ttl=60)
    raw = aioredis.Redis.from_url(redis_url)
    stack.push_async_callback(raw.aclose)
    key, below = await _fill(storage, raw)
    assert (await _save_until_trimmed(storage, raw, key, below, 0))[0] > EXPIRED - MOST
    saved = set(_names(await raw.zrangebyscore(key, below, "+inf")))
    listed: list[str] = []
    cursor = None
    with anyio.fail_after(30):
        while True:
            query = RecordQuery(status=TaskStatus.SUCCESS, limit=500, cursor=cursor)
            page = await storage.query(query)
            listed.extend(r.uuid for r in page.records)
            if page.cursor is None:
                break
            cursor = page.cursor
    assert sorted(listed) == sorted(saved | set(KEPT))


async def test_a_record_expiring_as_it_is_trimmed_is_looked_at_again_when_gone(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """Item 3: a record whose TTL ends in the very millisecond of a trim still exists (Redis
    expires a key once the time is past its own; ``PTTL`` answers 0), and its entry was kept
    on ``<tag>:tk`` for a whole ``result_ttl`` as if it had no TTL; in a tight loop of saves,
    0.6 % of them. It is now looked at again a millisecond later."""
    storage = await make_storage(stack, redis_url, prefix, result_ttl=60)
    raw = aioredis.Redis.from_url(redis_url)
    stack.push_async_callback(raw.aclose)
    key, tag = storage.index_keys[2], storage.key_tag
    seconds, micro = await raw.time()
    start = seconds * 1000 + micro // 1000
    # Entries whose records expire a millisecond after their score + TTL (a save that set the
    # TTL a little after it read the time), one a millisecond over the next 3 s: whenever the
    # trim runs, one of them expires in its very millisecond.
    async with raw.pipeline(transaction=False) as pipe:
        for i in range(3000):
            score = start - 60_000 + i
            pipe.zadd(key, {f"edge-{i:04d}": score})
            pipe.hset(f"{tag}:r:edge-{i:04d}", "d", "x")
            pipe.pexpireat(f"{tag}:r:edge-{i:04d}", score + 60_000 + 1)
        await pipe.execute()
    before = int(await raw.zcard(key))
    n = 0
    with anyio.fail_after(2.5):
        while await raw.hlen(f"{tag}:tm") == 0:
            n += 1
            await storage.save(record(f"new-{n}", status=TaskStatus.SUCCESS))
    seconds, micro = await raw.time()
    after = seconds * 1000 + micro // 1000
    assert int(await raw.zcard(key)) < before + n  # the trim removed the expired ones
    kept: list[Any] = await raw.zrange(f"{tag}:tk", 0, -1, withscores=True)
    due = [float(score) for _, score in kept]
    assert due, "no record expired in the trim's millisecond"
    assert max(due) <= after + 1, [d - after for d in due]
