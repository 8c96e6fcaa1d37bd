"""arq: sorted-set queue polled by the worker; results polled by ``job.result``.

Event loop: the worker runs its tasks on asyncio's default loop (``run_worker``; uvloop is not
installed), polling the queue every ``poll_delay``."""

from __future__ import annotations

from typing import Any

import _common as c
from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import run_worker


async def incr(ctx: dict[str, Any], key: str) -> None:
    await c.incr_async(key)


async def sleep_incr(ctx: dict[str, Any]) -> None:
    await c.sleep_incr_async()


async def echo(ctx: dict[str, Any], x: int) -> int:
    return x


async def signal(ctx: dict[str, Any], port: int, seq: int) -> None:
    c.send_signal(port, seq)


class WorkerSettings:
    functions = [incr, sleep_incr, echo, signal]
    redis_settings = RedisSettings.from_dsn(c.REDIS_URL)
    queue_name = c.QUEUE
    max_jobs = c.CONCURRENCY
    poll_delay = c.POLL  # default 0.5 s
    keep_result = 600
    max_tries = 1


class Ops:
    pool: Any = None

    async def setup(self) -> None:
        self.pool = await create_pool(
            RedisSettings.from_dsn(c.REDIS_URL), default_queue_name=c.QUEUE
        )

    async def teardown(self) -> None:
        await self.pool.aclose()

    async def incr(self, key: str) -> None:
        await self.pool.enqueue_job("incr", key)

    async def sleep_incr(self) -> None:
        await self.pool.enqueue_job("sleep_incr")

    async def signal(self, port: int, seq: int) -> None:
        await self.pool.enqueue_job("signal", port, seq)

    async def roundtrip(self, i: int) -> int:
        job = await self.pool.enqueue_job("echo", i)
        return int(await job.result(timeout=5, poll_delay=c.POLL))  # default poll 0.5 s


def worker() -> None:
    run_worker(WorkerSettings)  # type: ignore[arg-type]


if __name__ == "__main__":
    c.main(Ops, worker)
