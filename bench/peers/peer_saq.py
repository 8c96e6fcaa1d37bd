"""SAQ: Redis lists (BLMOVE) + Lua; results through ``queue.apply`` (polls job status).

Event loop: the ``saq`` CLI runs the worker on a new asyncio default loop (uvloop is not
installed)."""

from __future__ import annotations

from typing import Any

import _common as c
from saq import Queue

queue = Queue.from_url(c.REDIS_URL, name=c.QUEUE)


async def incr(ctx: dict[str, Any], *, counter: str) -> None:
    # Not ``key``: SAQ reserves that keyword for the job key (uniqueness).
    await c.incr_async(counter)


async def sleep_incr(ctx: dict[str, Any]) -> None:
    await c.sleep_incr_async()


async def echo(ctx: dict[str, Any], *, x: int) -> int:
    return x


async def signal(ctx: dict[str, Any], *, port: int, seq: int) -> None:
    c.send_signal(port, seq)


settings = {
    "queue": queue,
    "functions": [incr, sleep_incr, echo, signal],
    "concurrency": c.CONCURRENCY,
}


class Ops:
    async def setup(self) -> None:
        await queue.connect()

    async def teardown(self) -> None:
        await queue.disconnect()

    async def incr(self, key: str) -> None:
        await queue.enqueue("incr", counter=key)

    async def sleep_incr(self) -> None:
        await queue.enqueue("sleep_incr")

    async def signal(self, port: int, seq: int) -> None:
        await queue.enqueue("signal", port=port, seq=seq)

    async def roundtrip(self, i: int) -> int:
        # ``job.refresh(until_complete=...)`` (pub/sub) checks the status before it subscribes,
        # so a job that finishes in between is only seen at the timeout; ``apply`` polls.
        return int(await queue.apply("echo", timeout=5, poll_interval=c.POLL, x=i))


def worker() -> None:
    c.exec_cli("saq", "peer_saq.settings", "--workers", "1")


if __name__ == "__main__":
    c.main(Ops, worker)
