"""taskiq + taskiq-redis: RedisStreamBroker (the at-least-once one) + RedisAsyncResultBackend.

Event loop: the ``taskiq worker`` CLI runs the tasks on a new asyncio default loop (it would take
uvloop, which is not installed)."""

from __future__ import annotations

from typing import Any

import _common as c
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

broker: Any = RedisStreamBroker(url=c.REDIS_URL, queue_name=c.QUEUE).with_result_backend(
    RedisAsyncResultBackend(redis_url=c.REDIS_URL, result_ex_time=600)
)


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
        # wait_result polls; its default interval is 0.2 s.
        result = await task.wait_result(check_interval=c.POLL, timeout=5)
        return int(result.return_value)


def worker() -> None:
    c.exec_cli(
        "taskiq",
        "worker",
        "peer_taskiq_redis:broker",
        "--workers",
        "1",
        "--max-async-tasks",
        str(c.CONCURRENCY),
        "--log-level",
        "WARNING",
    )


if __name__ == "__main__":
    c.main(Ops, worker)
