"""streaq: Redis streams + Functions; results through pub/sub (``task.result``).

Event loop: ``streaq run`` runs the worker through anyio on its asyncio backend, asyncio's
default loop (uvloop is not installed)."""

from __future__ import annotations

import _common as c
from streaq import Worker

worker_app = Worker(redis_url=c.REDIS_URL, queue_name=c.QUEUE, concurrency=c.CONCURRENCY)


@worker_app.task(name="incr")
async def incr(key: str) -> None:
    await c.incr_async(key)


@worker_app.task(name="sleep_incr")
async def sleep_incr() -> None:
    await c.sleep_incr_async()


@worker_app.task(name="echo")
async def echo(x: int) -> int:
    return x


@worker_app.task(name="signal")
async def signal(port: int, seq: int) -> None:
    c.send_signal(port, seq)


class Ops:
    async def setup(self) -> None:
        self._ctx = worker_app.__asynccontextmanager__()
        await self._ctx.__aenter__()

    async def teardown(self) -> None:
        await self._ctx.__aexit__(None, None, None)

    async def incr(self, key: str) -> None:
        await incr.enqueue(key)

    async def sleep_incr(self) -> None:
        await sleep_incr.enqueue()

    async def signal(self, port: int, seq: int) -> None:
        await signal.enqueue(port, seq)

    async def roundtrip(self, i: int) -> int:
        task = await echo.enqueue(i)
        result = await task.result(5)
        return int(result.result)


def worker() -> None:
    c.exec_cli("streaq", "run", "peer_streaq:worker_app")


if __name__ == "__main__":
    c.main(Ops, worker)
