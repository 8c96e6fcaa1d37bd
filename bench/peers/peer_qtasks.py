"""qtasks from this workspace: Redis broker+storage+global config, or RabbitMQ broker + Redis
storage (BENCH_BROKER=redis|amqp). Public API only."""

from __future__ import annotations

import os
from typing import Any

import _common as c

BROKER = os.environ.get("BENCH_BROKER", "redis")

try:
    from qtasks import AsyncQueueTasks, QueueConfig
    from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

    if BROKER == "amqp":
        from qtasks_rabbitmq import RabbitMQBroker
except ImportError as exc:
    c.skip(f"qtasks {BROKER} backend not importable yet ({exc})")


def build_app() -> Any:
    if BROKER == "amqp":
        broker: Any = RabbitMQBroker(url=c.AMQP_URL, name=c.QUEUE)
    else:
        broker = RedisBroker(url=c.REDIS_URL, name=c.QUEUE)
    return AsyncQueueTasks(
        broker=broker,
        storage=RedisStorage(url=c.REDIS_URL, name=c.QUEUE),
        global_config=RedisGlobalConfig(url=c.REDIS_URL, name=c.QUEUE),
        config=QueueConfig(max_tasks_process=c.CONCURRENCY),
    )


try:
    app = build_app()
except TypeError as exc:  # constructor not as expected yet
    c.skip(f"qtasks {BROKER} components do not take these arguments yet ({exc})")


@app.task(name="incr")
async def incr(key: str) -> None:
    await c.incr_async(key)


@app.task(name="sleep_incr")
async def sleep_incr() -> None:
    await c.sleep_incr_async()


@app.task(name="echo")
async def echo(x: int) -> int:
    return x


class Ops:
    async def teardown(self) -> None:
        await app.aclose()

    async def incr(self, key: str) -> None:
        await app.add_task("incr", key)

    async def sleep_incr(self) -> None:
        await app.add_task("sleep_incr")

    async def roundtrip(self, i: int) -> int:
        task = await app.add_task("echo", i, timeout=5)
        return int(task.returning)


def worker() -> None:
    app.run_forever()


if __name__ == "__main__":
    c.main(Ops, worker)
