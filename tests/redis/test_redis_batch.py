"""The batched calls of a worker's renewal pass on Redis: ``extend_many`` (LeaseBatch) and
``cancelled`` (CancelCheck), each one script call for many deliveries or records."""

from __future__ import annotations

from contextlib import AsyncExitStack

import anyio
import pytest
import redis.asyncio as aioredis

from qtasks.components import CancelCheck, LeaseBatch
from qtasks.config import QueueConfig
from qtasks.messages import Envelope
from qtasks.record import TaskRecord, TaskStatus
from qtasks_redis import RedisBroker, RedisStorage

pytestmark = pytest.mark.anyio


async def test_extend_many_renews_held_leases_and_refuses_stale_ones(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    broker = RedisBroker(redis_url, prefix=prefix, queue="q")
    assert isinstance(broker, LeaseBatch)
    await broker.start(stack, QueueConfig(lease=60))
    for i in range(3):
        await broker.publish(Envelope(f"m{i}", b"x"))
    client = aioredis.Redis.from_url(redis_url)
    stack.push_async_callback(client.aclose)
    inflight = f"{{{prefix}:q}}:inflight"
    async with broker.consume(prefetch=3) as it:
        with anyio.fail_after(3):
            held = [await it.__anext__() for _ in range(3)]
        assert await held[2].ack()
        # Their deadlines set in the past: a renewal moves them a lease (60 s) past now. (Read
        # as they were, the renewal could land in the claim's millisecond and change nothing.)
        await client.zadd(inflight, {d.id: 1 for d in held[:2]}, xx=True)
        assert await broker.extend_many(held) == [True, True, False]
        now_ms = (await client.time())[0] * 1000
        for d in held[:2]:
            deadline = await client.zscore(inflight, d.id)
            assert deadline is not None and deadline >= now_ms + 59_000
        assert await client.zscore(inflight, "m2") is None
        assert await broker.extend_many([]) == []
        for d in held[:2]:
            assert await d.ack()


async def test_cancelled_names_the_cancelled_records_with_their_reasons(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    storage = RedisStorage(redis_url, prefix=prefix)
    assert isinstance(storage, CancelCheck)
    await storage.start(stack, QueueConfig())
    uuids = [f"u{i}" for i in range(1500)]  # more than one script call's worth
    for uuid in uuids:
        await storage.add(TaskRecord(uuid=uuid, task_name="t"))
    await storage.cancel("u3", "three")
    await storage.cancel("u1200", "far")
    record = await storage.get("u7")
    assert record is not None
    record.status = TaskStatus.SUCCESS
    assert await storage.save(record)
    found = await storage.cancelled([*uuids, "unknown"])
    assert found == {"u3": "three", "u1200": "far"}
    assert await storage.cancelled([]) == {}
