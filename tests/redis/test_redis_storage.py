"""RedisStorage and RedisGlobalConfig against the real Redis, called directly."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import fields

import anyio
import pytest
import redis.asyncio as aioredis

from qtasks.components import GlobalConfig, Storage
from qtasks.config import QueueConfig
from qtasks.errors import ComponentError, SerializationError, TaskTimeoutError
from qtasks.record import TaskRecord, TaskStatus
from qtasks_redis import RedisGlobalConfig, RedisStorage

pytestmark = pytest.mark.anyio


async def make_storage(
    stack: AsyncExitStack, url: str, prefix: str, **config: object
) -> RedisStorage:
    storage = RedisStorage(url, prefix=prefix)
    await storage.start(stack, QueueConfig().merged(**config))
    return storage


def record(uuid: str = "t1", **fields: object) -> TaskRecord:
    rec = TaskRecord(uuid=uuid, task_name="add", args=[1, 2], kwargs={"k": "ü"})
    for name, value in fields.items():
        setattr(rec, name, value)
    return rec


async def test_roundtrip(redis_url: str, prefix: str, stack: AsyncExitStack) -> None:
    storage = await make_storage(stack, redis_url, prefix)
    assert isinstance(storage, Storage)
    original = record(created_at=1712345678.123456, returning={"a": [1, 2.5]})
    await storage.add(original)
    assert await storage.get("t1") == original
    assert await storage.get("missing") is None


async def test_stored_format_is_positional_and_the_earlier_object_format_still_reads(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    storage = await make_storage(stack, redis_url, prefix)
    original = record(created_at=1712345678.5, returning={"a": [1, 2.5]}, eta=1712345999.0)
    await storage.add(original)
    client = aioredis.Redis.from_url(redis_url)
    try:
        key = f"{{{prefix}:rec}}:r:t1"
        stored = json.loads(await client.hget(key, "d"))  # type: ignore[arg-type]  # the field is there
        assert stored[0] == 2 and len(stored) == 1 + len(fields(TaskRecord))
        assert stored[1:4] == ["t1", "add", "new"]
        # A record written by an earlier version (a JSON object) is still read.
        old = {f.name: getattr(original, f.name) for f in fields(TaskRecord)}
        old["status"] = "retry"
        old["unknown_later_field"] = "ignored"
        await client.hset(f"{{{prefix}:rec}}:r:old", mapping={"d": json.dumps(old), "s": "retry"})
        earlier = await storage.get("old")
        assert earlier is not None
        assert (earlier.uuid, earlier.status, earlier.returning, earlier.eta) == (
            "t1",
            TaskStatus.RETRY,
            {"a": [1, 2.5]},
            1712345999.0,
        )
        await client.hset(f"{{{prefix}:rec}}:r:bad", mapping={"d": '[1, "x"]', "s": "new"})
        with pytest.raises(SerializationError):
            await storage.get("bad")
    finally:
        await client.aclose()
    assert await storage.get("t1") == original


async def test_fenced_save(redis_url: str, prefix: str, stack: AsyncExitStack) -> None:
    storage = await make_storage(stack, redis_url, prefix)
    await storage.add(record())
    # The first delivery takes the record (stored token is None, so any fence passes).
    assert await storage.save(record(status=TaskStatus.PROCESS, token="tok1"), fence="tok1")
    # A redelivery takes over without a fence; the old holder is refused from then on.
    assert await storage.save(record(status=TaskStatus.PROCESS, token="tok2"))
    assert not await storage.save(record(status=TaskStatus.SUCCESS, token="tok1"), fence="tok1")
    assert await storage.save(
        record(status=TaskStatus.SUCCESS, token="tok2", returning=3), fence="tok2"
    )
    stored = await storage.get("t1")
    assert stored is not None
    assert (stored.status, stored.returning) == (TaskStatus.SUCCESS, 3)
    # A final record is never overwritten by a non-final one.
    assert not await storage.save(record(status=TaskStatus.PROCESS, token="tok2"))


async def test_final_records_expire(redis_url: str, prefix: str, stack: AsyncExitStack) -> None:
    storage = await make_storage(stack, redis_url, prefix, result_ttl=0.3)
    await storage.add(record("a"))
    await storage.add(record("b"))
    await storage.save(record("a", status=TaskStatus.SUCCESS))
    assert await storage.stats() == {"new": 1, "success": 1}
    with anyio.fail_after(3):
        while await storage.get("a") is not None:  # noqa: ASYNC110 - Redis TTL expiry fires no event
            await anyio.sleep(0.05)
    assert await storage.get("b") is not None  # not final: kept
    assert await storage.stats() == {"new": 1}


async def test_wait_is_woken(redis_url: str, prefix: str, stack: AsyncExitStack) -> None:
    storage = await make_storage(stack, redis_url, prefix)
    await storage.add(record())
    woken: list[float] = []

    async def waiter() -> None:
        rec = await storage.wait("t1", timeout=5)
        assert rec.status is TaskStatus.SUCCESS
        woken.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        for _ in range(3):  # every waiter wakes, not just one
            tg.start_soon(waiter)
        await anyio.sleep(0.3)
        saved = time.monotonic()
        await storage.save(record(status=TaskStatus.SUCCESS))
    assert len(woken) == 3
    assert max(woken) - saved < 0.1
    assert (await storage.wait("t1", timeout=0)).status is TaskStatus.SUCCESS


async def test_wait_times_out(redis_url: str, prefix: str, stack: AsyncExitStack) -> None:
    storage = await make_storage(stack, redis_url, prefix)
    await storage.add(record())
    start = time.monotonic()
    with pytest.raises(TaskTimeoutError):
        await storage.wait("t1", timeout=0.3)
    assert 0.25 < time.monotonic() - start < 1.0


async def test_cancel(redis_url: str, prefix: str, stack: AsyncExitStack) -> None:
    storage = await make_storage(stack, redis_url, prefix)
    assert await storage.cancel("unknown", "why") is None
    await storage.add(record())
    cancelled = await storage.cancel("t1", "operator said so")
    assert cancelled is not None
    assert (cancelled.status, cancelled.cancel_reason) == (TaskStatus.CANCEL, "operator said so")
    assert cancelled.updated_at >= cancelled.created_at
    assert await storage.get("t1") == cancelled
    assert (await storage.wait("t1", timeout=1)).status is TaskStatus.CANCEL
    # A final record is returned unchanged, and a late worker cannot revive it.
    again = await storage.cancel("t1", "twice")
    assert again is not None
    assert again.cancel_reason == "operator said so"
    assert not await storage.save(record(status=TaskStatus.PROCESS))
    assert await storage.stats() == {"cancel": 1}


async def test_steps_followed_live(redis_url: str, prefix: str, stack: AsyncExitStack) -> None:
    storage = await make_storage(stack, redis_url, prefix)
    await storage.add(record())
    assert await storage.add_step("t1", {"i": 0}) == 0
    seen: list[object] = []

    async def follow() -> None:
        async for value in storage.steps("t1"):
            seen.append(value)

    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            for i in range(1, 4):
                await anyio.sleep(0.05)
                assert await storage.add_step("t1", {"i": i}) == i
            await storage.save(record(status=TaskStatus.SUCCESS))
    assert seen == [{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}]
    stored = await storage.get("t1")
    assert stored is not None
    assert stored.steps == 4
    # After the end, a new follower reads what is stored and stops; ``start`` skips.
    with anyio.fail_after(2):
        assert [v async for v in storage.steps("t1", start=2)] == [{"i": 2}, {"i": 3}]


async def test_steps_follower_of_task_without_steps_ends(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    storage = await make_storage(stack, redis_url, prefix)
    await storage.add(record())
    seen: list[object] = []

    async def follow() -> None:
        seen.extend([v async for v in storage.steps("t1")])

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await anyio.sleep(0.2)
            await storage.save(record(status=TaskStatus.ERROR))
    assert seen == []


async def test_global_config(redis_url: str, prefix: str, stack: AsyncExitStack) -> None:
    gc = RedisGlobalConfig(redis_url, prefix=prefix)
    await gc.start(stack, QueueConfig())
    assert isinstance(gc, GlobalConfig)
    assert await gc.get("ns", "a", "dflt") == "dflt"
    await gc.set("ns", "a", {"x": [1, "ü"]})
    assert await gc.get("ns", "a") == {"x": [1, "ü"]}
    assert not await gc.set_if_absent("ns", "a", 1)
    assert await gc.set_if_absent("ns", "b", 2, ttl=0.2)
    assert await gc.increment("ns", "n") == 1
    assert await gc.increment("ns", "n", 2.5) == 3.5
    assert await gc.get_all("ns") == {"a": {"x": [1, "ü"]}, "b": 2, "n": 3.5}
    with anyio.fail_after(2):
        while "b" in await gc.get_all("ns"):  # noqa: ASYNC110 - Redis TTL expiry fires no event
            await anyio.sleep(0.05)
    assert await gc.delete("ns", "a")
    assert not await gc.delete("ns", "a")
    await gc.set("ns", "s", "text")
    with pytest.raises(ComponentError):
        await gc.increment("ns", "s")
    await gc.clear("ns")
    assert await gc.get_all("ns") == {}
    await gc.heartbeat("w1", {"pid": 1, "running": 2}, ttl=0.3)
    await gc.heartbeat("w2", {"pid": 2, "running": 0}, ttl=30)
    assert set(await gc.workers()) == {"w1", "w2"}
    with anyio.fail_after(2):
        while "w1" in await gc.workers():  # noqa: ASYNC110 - Redis TTL expiry fires no event
            await anyio.sleep(0.05)
    assert await gc.workers() == {"w2": {"pid": 2, "running": 0}}


async def test_no_keys_left_without_ttl_after_final(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    storage = await make_storage(stack, redis_url, prefix, result_ttl=60)
    await storage.add(record())
    await storage.add_step("t1", 1)
    await storage.save(record(status=TaskStatus.SUCCESS))
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{{{prefix}:rec}}:[rws]:*")]
        assert len(keys) == 3
        for key in keys:
            assert await client.pttl(key) > 0, key
    finally:
        await client.aclose()


async def test_trimming_by_the_writes_keeps_the_entries_of_records_that_exist(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """The saves that trim the indexes of final records (one server millisecond in 16) remove
    the entries of records that expired, and only those: a record kept without a TTL (a
    running workflow's member) or with a longer one (a member of a workflow that ended) stays
    in the status and task-name indexes, and leaves them once its record is gone."""
    storage = await make_storage(stack, redis_url, prefix, result_ttl=0.3)
    for uuid in ("held", "longer", "expired"):
        await storage.save(record(uuid, status=TaskStatus.SUCCESS))
    tag = storage.key_tag
    client = aioredis.Redis.from_url(redis_url)
    stack.push_async_callback(client.aclose)
    await client.persist(f"{tag}:r:held")
    await client.pexpire(f"{tag}:r:longer", 60_000)
    indexes = (f"{tag}:i:success", f"{tag}:nf:add")

    async def listed(uuid: str) -> list[bool]:
        return [await client.zscore(key, uuid) is not None for key in indexes]

    async def save_until(done: Callable[[], Awaitable[bool]], what: str) -> None:
        n = 0
        with anyio.fail_after(5):
            while not await done():
                n += 1
                await storage.save(record(f"filler-{n}", status=TaskStatus.SUCCESS))
        assert n, f"{what} before any save"

    async def expired_unlisted() -> bool:
        return await listed("expired") == [False, False]

    await save_until(expired_unlisted, "the expired record was unlisted")
    assert await listed("held") == [True, True]
    assert await listed("longer") == [True, True]
    await client.delete(f"{tag}:r:held")  # as when its workflow ended and its TTL ran out

    async def held_unlisted() -> bool:
        return await listed("held") == [False, False]

    await save_until(held_unlisted, "the held record was unlisted")
    assert await listed("longer") == [True, True]


async def _follow_until_the_stream_exists(
    storage: RedisStorage, client: aioredis.Redis, uuid: str
) -> None:
    """A live follower of ``uuid`` (its follow makes the steps stream), left once the stream
    is there."""

    async def follow() -> None:
        async for _ in storage.steps(uuid):
            pass

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            while not await client.exists(f"{storage.key_tag}:s:{uuid}"):  # noqa: ASYNC110 - a remote key
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("ttl", [None, 60])
async def test_a_records_steps_are_kept_exactly_as_long_as_the_record(
    redis_url: str, prefix: str, stack: AsyncExitStack, ttl: int | None
) -> None:
    """Review r19 #7, item 3: the steps stream a follower made while the task ran expired
    after 24 h while the record stayed (forever with no ``result_ttl``, or ``result_ttl``
    when longer): a stream now has no TTL while its record has none, and the record's once
    final; a step after the end (a cancel as the generator yielded) is refused, so it makes
    no stream beside the record."""
    storage = await make_storage(stack, redis_url, prefix, result_ttl=ttl)
    client = aioredis.Redis.from_url(redis_url)
    rec_key, steps_key = (f"{{{prefix}:rec}}:{kind}:t1" for kind in ("r", "s"))
    try:
        await storage.add(record())
        await _follow_until_the_stream_exists(storage, client, "t1")
        assert await client.pttl(steps_key) == -1  # as the record: not final, kept
        await storage.add_step("t1", 0)
        assert await client.pttl(steps_key) == await client.pttl(rec_key) == -1
        await storage.save(record(status=TaskStatus.SUCCESS))
        if ttl is None:
            assert await client.pttl(steps_key) == await client.pttl(rec_key) == -1
        else:
            assert 0 < await client.pttl(rec_key) - 1000 <= await client.pttl(steps_key)

        await storage.add(record(uuid="t2"))
        await storage.cancel("t2", "stop")  # no stream yet: the final write made none
        assert await storage.add_step("t2", "late") is None
        assert not await client.exists(f"{{{prefix}:rec}}:s:t2")
    finally:
        await client.aclose()


async def test_a_step_of_an_unknown_task_leaves_no_key(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """A step with no record, fenced or not, is refused and makes no steps stream: nothing
    would ever expire or delete one (its TTL comes from the record's final write)."""
    storage = await make_storage(stack, redis_url, prefix, result_ttl=60)
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await storage.add_step("ghost", "orphan") is None
        assert await storage.add_step("ghost", "orphan", fence="some-token") is None
        assert await client.keys(f"*{prefix}*") == []
    finally:
        await client.aclose()
