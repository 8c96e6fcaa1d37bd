"""taskiq + taskiq-aio-pika (classic durable queue, like celery's) + taskiq-redis results.

Event loop: the ``taskiq worker`` CLI runs the tasks on a new asyncio default loop (it would take
uvloop, which is not installed)."""

from __future__ import annotations

from typing import Any

import _common as c
from taskiq_aio_pika import AioPikaBroker
from taskiq_aio_pika.exchange import Exchange
from taskiq_aio_pika.queue import Queue, QueueType
from taskiq_redis import RedisAsyncResultBackend

# taskiq-aio-pika 0.6 declares quorum queues by default; classic queues are used here so that
# every RabbitMQ peer runs on the same queue type (celery's default).
broker: Any = AioPikaBroker(
    url=c.AMQP_URL,
    qos=c.CONCURRENCY,
    exchange=Exchange(name=c.QUEUE),
    task_queues=[Queue(name=c.QUEUE, type=QueueType.CLASSIC)],
    dead_letter_queue=Queue(name=f"{c.QUEUE}.dead_letter", type=QueueType.CLASSIC),
).with_result_backend(RedisAsyncResultBackend(redis_url=c.REDIS_URL, result_ex_time=600))


@broker.task(task_name="incr")
async def incr(key: str) -> None:
    await c.incr_async(key)


@broker.task(task_name="sleep_incr")
async def sleep_incr() -> None:
    await c.sleep_incr_async()


@broker.task(task_name="echo")
async def echo(x: int) -> int:
    return x


@broker.task(task_name="signal")
async def signal(port: int, seq: int) -> None:
    c.send_signal(port, seq)


class Ops:
    async def setup(self) -> None:
        await broker.startup()

    async def teardown(self) -> None:
        await broker.shutdown()

    async def incr(self, key: str) -> None:
        await incr.kiq(key)

    async def sleep_incr(self) -> None:
        await sleep_incr.kiq()

    async def signal(self, port: int, seq: int) -> None:
        await signal.kiq(port, seq)

    async def roundtrip(self, i: int) -> int:
        task = await echo.kiq(i)
        result = await task.wait_result(check_interval=c.POLL, timeout=5)
        return int(result.return_value)

    async def cleanup(self) -> None:
        import aio_pika

        connection = await aio_pika.connect(c.AMQP_URL)
        async with connection:
            for name in (c.QUEUE, f"{c.QUEUE}.dead_letter"):
                channel = await connection.channel()
                try:
                    await channel.queue_delete(name)
                except Exception:  # already gone
                    pass
            channel = await connection.channel()
            try:
                await channel.exchange_delete(c.QUEUE)
            except Exception:
                pass


def worker() -> None:
    c.exec_cli(
        "taskiq",
        "worker",
        "peer_taskiq_aio_pika:broker",
        "--workers",
        "1",
        "--max-async-tasks",
        str(c.CONCURRENCY),
        "--log-level",
        "WARNING",
    )


if __name__ == "__main__":
    c.main(Ops, worker)
