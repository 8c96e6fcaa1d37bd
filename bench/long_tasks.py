"""Long tasks and the prefetch on Redis: how long W workers of one slot each take to run N tasks
of S seconds enqueued at once, with the default prefetch and with ``prefetch`` set.

Every worker is an app in this process (its own broker, storage and global config objects, one
queue and one key prefix on ``QTASKS_BENCH_REDIS``, default ``redis://127.0.0.1:6379/0``),
started one after the other on a backlog of the N tasks (enqueued first). The tasks sleep ``S``
seconds; wall = last task end - first task start, as the tasks stamp them
(ideal: ``ceil(N / W) * S``). A worker that holds messages beyond its free slot keeps them
waiting behind its long task while another worker is idle, which is what the default prefetch no
longer does once runs are seen to be long (:mod:`qtasks.hold`). ``prefetch 10`` is what the
default held before that change.

Run: ``uv run python bench/long_tasks.py [--workers 3] [--tasks 12] [--seconds 0.2]
[--prefetch default,0,10]``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import uuid
from contextlib import AsyncExitStack

import anyio
import redis

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

URL = os.environ.get("QTASKS_BENCH_REDIS", "redis://127.0.0.1:6379/0")


async def makespan(workers: int, tasks: int, seconds: float, prefetch: int | None) -> float:
    """Seconds from the first task's start to the last one's end."""
    prefix = f"bench-long-{uuid.uuid4().hex[:8]}"
    stamps: list[tuple[float, float]] = []
    done = anyio.Event()

    def worker(name: str) -> AsyncQueueTasks:
        app = AsyncQueueTasks(
            name,
            broker=RedisBroker(URL, prefix=prefix, queue="long"),
            storage=RedisStorage(URL, prefix=prefix),
            global_config=RedisGlobalConfig(URL, prefix=prefix),
            config=QueueConfig(
                max_tasks_process=1, prefetch=prefetch, plugins_disabled=["*"], log_level="ERROR"
            ),
        )

        @app.task(name="long")
        async def long() -> None:
            start = time.monotonic()
            await anyio.sleep(seconds)
            stamps.append((start, time.monotonic()))
            if len(stamps) == tasks:
                done.set()

        return app

    apps = [worker(f"w{i}") for i in range(workers)]
    producer = worker("producer")  # enqueues only: never served
    try:
        # A backlog the workers start on (a deploy, a burst while they were busy).
        for _ in range(tasks):
            await producer.add_task("long")
        async with AsyncExitStack() as stack:
            for app in apps:
                await stack.enter_async_context(app)
            with anyio.fail_after(tasks * seconds + 30):
                await done.wait()
        await producer.aclose()
    finally:
        client = redis.Redis.from_url(URL)
        for key in client.scan_iter(f"*{prefix}*", count=1000):
            client.delete(key)
    return max(end for _, end in stamps) - min(start for start, _ in stamps)


async def main(opts: argparse.Namespace) -> None:
    ideal = math.ceil(opts.tasks / opts.workers) * opts.seconds
    print(
        f"{opts.tasks} tasks of {opts.seconds} s on {opts.workers} workers of one slot "
        f"(ideal {ideal:.2f} s), Redis {URL}"
    )
    for name in opts.prefetch.split(","):
        prefetch = None if name == "default" else int(name)
        wall = await makespan(opts.workers, opts.tasks, opts.seconds, prefetch)
        print(f"prefetch {name}: {wall:.3f} s ({wall / ideal:.2f}x ideal)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=0.2)
    parser.add_argument("--prefetch", default="default,0,10")
    anyio.run(main, parser.parse_args())
