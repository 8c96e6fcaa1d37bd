"""qtasks from this workspace: Redis broker+storage+global config, or RabbitMQ broker + Redis
storage (BENCH_BROKER=redis|amqp). Public API only.

Event loop: ``run_forever`` runs the worker on qtasks' own loop (``qtasks.loop``: asyncio's
selector loop on an epoll selector whose timers fire on time, not rounded up to the next ms)."""

from __future__ import annotations

import os
from typing import Any

import _common as c

BROKER = os.environ.get("BENCH_BROKER", "redis")

try:
    from qtasks import AsyncQueueTasks, QueueConfig, chord
    from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

    if BROKER == "amqp":
        from qtasks_rabbitmq import RabbitMQBroker, Topology
except ImportError as exc:
    c.skip(f"qtasks {BROKER} backend not importable yet ({exc})")


def build_app() -> Any:
    if BROKER == "amqp":
        # BENCH_QUEUE_VERSION: try another classic queue version (0: the broker's default).
        version = int(os.environ.get("BENCH_QUEUE_VERSION", "0"))
        broker: Any = RabbitMQBroker(c.AMQP_URL, queue=c.QUEUE, queue_version=version)
    else:
        broker = RedisBroker(c.REDIS_URL, queue=c.QUEUE)
    return AsyncQueueTasks(
        broker=broker,
        storage=RedisStorage(c.REDIS_URL),
        global_config=RedisGlobalConfig(c.REDIS_URL),
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


@app.task(name="signal")
async def signal(port: int, seq: int) -> None:
    c.send_signal(port, seq)


@app.task(name="count")
async def count(results: list[int]) -> int:
    return len(results)


class Ops:
    async def teardown(self) -> None:
        await app.aclose()

    async def incr(self, key: str) -> None:
        await app.add_task("incr", key)

    async def sleep_incr(self) -> None:
        await app.add_task("sleep_incr")

    async def signal(self, port: int, seq: int) -> None:
        await app.add_task("signal", port, seq)

    async def roundtrip(self, i: int) -> int:
        task = await app.add_task("echo", i, timeout=5)
        return int(task.returning)

    async def chord(self, n: int) -> int:
        """W4: ``run_workflow(chord(echo.map(range(n)), count.s()))``."""
        workflow = await app.run_workflow(chord(echo.map(range(n)), count.s()))
        done = await workflow.wait_result(60 + n / 20)
        return int(done.result)

    async def cleanup(self) -> None:
        if BROKER != "amqp":
            return
        import aio_pika

        topology = Topology(queue=c.QUEUE)
        connection = await aio_pika.connect(c.AMQP_URL)
        async with connection:
            for name in topology.all_queues():
                channel = await connection.channel()
                try:
                    await channel.queue_delete(name)
                except Exception:  # never declared or already gone
                    pass
            for name in topology.all_exchanges():
                channel = await connection.channel()
                try:
                    await channel.exchange_delete(name)
                except Exception:
                    pass


def worker() -> None:
    app.run_forever()


if __name__ == "__main__":
    c.main(Ops, worker)
