"""The Redis components on uvloop, the event loop many asyncio services run on: uvloop's
transports implement ``asyncio.Transport`` without subclassing it, which the fast lane once
refused (every connection failed with a timeout)."""

from __future__ import annotations

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

uvloop = pytest.importorskip("uvloop", reason="uvloop is in the dev group; not installed here")


def test_tasks_round_trip_on_uvloop(redis_url: str, prefix: str) -> None:
    async def main() -> list[int]:
        import asyncio

        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        app = AsyncQueueTasks(
            broker=RedisBroker(redis_url, prefix=prefix, queue="uv"),
            storage=RedisStorage(redis_url, prefix=prefix),
            global_config=RedisGlobalConfig(redis_url, prefix=prefix),
            config=QueueConfig(max_tasks_process=4),
        )

        @app.task(name="double")
        async def double(x: int) -> int:
            return 2 * x

        with anyio.fail_after(20):  # before the fix: connecting timed out, again and again
            async with app:
                tasks = [await app.add_task("double", i) for i in range(20)]
                done = [await app.wait(task.uuid, timeout=10) for task in tasks]
        return [task.returning for task in done]

    results = anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    assert results == [2 * i for i in range(20)]
