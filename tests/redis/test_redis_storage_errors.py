"""The storage's errors are storage errors: a lost server raises StorageConnectionError (also a
BrokerConnectionError and a ConnectionError, as before it existed), never a raw redis-py one."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from redis_procs import start_server

from qtasks.config import QueueConfig
from qtasks.errors import (
    BrokerConnectionError,
    ComponentError,
    StorageConnectionError,
    StorageError,
)
from qtasks_redis import RedisStorage

pytestmark = pytest.mark.anyio


async def test_a_lost_server_raises_a_storage_connection_error(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        storage = RedisStorage(server.url, options={"redis_retries": 0})
        async with AsyncExitStack() as stack:
            await storage.start(stack, QueueConfig())
            assert await storage.get("nothing") is None
            server.kill()
            with pytest.raises(StorageConnectionError) as caught:
                await storage.get("nothing")
            error = caught.value
            for kind in (StorageError, BrokerConnectionError, ConnectionError, ComponentError):
                assert isinstance(error, kind), kind
            assert f"127.0.0.1:{server.port}" in str(error)
    finally:
        server.close()


async def test_a_wait_goes_on_through_a_server_restart(tmp_path: Path) -> None:
    """A waiter blocked for a record when its server restarts: the wait is tried again (as
    the storage's other calls are) with the time it has left, and returns the final record
    saved after the restart (before, the fast lane's blocking call raised at once)."""
    import anyio

    from qtasks.record import TaskRecord, TaskStatus

    server = start_server(tmp_path)  # the AOF on: the record outlives the restart
    try:
        storage = RedisStorage(server.url)
        async with AsyncExitStack() as stack:
            await storage.start(stack, QueueConfig())
            record = TaskRecord(uuid="restart-wait", task_name="t")
            await storage.add(record)
            got: list[TaskRecord] = []

            async def wait() -> None:
                got.append(await storage.wait(record.uuid, timeout=30))

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                with anyio.fail_after(10):
                    while not await blocked_in_blmove(server.port):  # noqa: ASYNC110 - a server-side state
                        await anyio.sleep(0.01)
                server.kill()
                server.start()
                record.status, record.returning = TaskStatus.SUCCESS, 7
                with anyio.fail_after(20):
                    assert await storage.save(record)
            assert (got[0].status, got[0].returning) == (TaskStatus.SUCCESS, 7)
    finally:
        server.close()


async def blocked_in_blmove(port: int) -> bool:
    """Whether a client of the server on ``port`` is blocked in ``BLMOVE`` now."""
    import redis.asyncio

    client = redis.asyncio.Redis(port=port)
    try:
        return any(c.get("cmd") == "blmove" for c in await client.client_list())
    finally:
        await client.aclose()


async def test_a_record_field_that_does_not_read_is_an_invalid_record_not_a_dead_consumer(
    redis_url: str, prefix: str
) -> None:
    """A record whose step count (``n``, a field beside ``d``, as the attempt ``a`` is) is
    not a count: ``int()`` of it raised a plain ``ValueError`` out of the claim that begins the
    record, which the worker's consumer did not survive. Now the record is invalid
    (``SerializationError``): the claim leaves it to the worker, which dead-letters the
    message ("stored task record unreadable") and serves on."""
    import redis.asyncio as aioredis

    from qtasks import AsyncQueueTasks, TaskStatus
    from qtasks.errors import SerializationError
    from qtasks.messages import Message
    from qtasks.record import record_of
    from qtasks_redis import RedisBroker
    from qtasks_testing.contract.bad_input import Outcomes

    storage = RedisStorage(redis_url, prefix=prefix)
    app = AsyncQueueTasks(
        "bad-field", broker=RedisBroker(redis_url, prefix=prefix, queue="q"), storage=storage
    )

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    seen = Outcomes()
    app.add_plugin(seen)
    message = Message(uuid="bad-field", task_name="add", args=[1, 2])
    async with app:
        await storage.add(record_of(message))
        client = aioredis.Redis.from_url(redis_url)
        try:
            await client.hset(storage.record_key(message.uuid), "n", "1e+30")
        finally:
            await client.aclose()
        await app.broker.publish(app.codec.encode(message))
        await seen.wait({message.uuid}, timeout=10)
        with pytest.raises(SerializationError, match="stored task record is not valid"):
            await storage.get(message.uuid)
        after = await app.add_task("add", 2, 2, timeout=10)
    assert seen.rejected["bad-field"].startswith("stored task record unreadable: ")
    assert (after.status, after.returning) == (TaskStatus.SUCCESS, 4)
