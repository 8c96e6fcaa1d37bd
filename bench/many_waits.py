"""Many results awaited at once on Redis: connections held and time to the last result.

N no-op tasks are enqueued while no worker runs, N ``app.wait(uuid)`` calls are started in
one producer process and left waiting, then a worker (concurrency 50, a subprocess) starts.
Printed: the Redis clients the waits added (``CLIENT LIST`` before the waits and once they
all wait, so the Redis must not be shared with other work while it runs), and the time from
the worker's start to the last result, with the results' rate over that time.

``--wait-connections K`` sets ``redis_wait_connections`` (default: the storage's default):
past K waits, the rest share two connections (qtasks_redis.watch); a value at least N makes
every wait block on a connection of its own, as before session 23.

Run: ``uv run python bench/many_waits.py [--n 2000] [--wait-connections K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

URL = os.environ.get("QTASKS_BENCH_REDIS", "redis://127.0.0.1:6379/0")

WORKER = """
import sys
from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
url, prefix = sys.argv[1], sys.argv[2]
app = AsyncQueueTasks(
    broker=RedisBroker(url, prefix=prefix, queue="bench"),
    storage=RedisStorage(url, prefix=prefix),
    global_config=RedisGlobalConfig(url, prefix=prefix),
    config=QueueConfig(max_tasks_process=50, log_level="WARNING", plugins_disabled=["*"]),
)

@app.task(name="noop")
async def noop(i: int) -> int:
    return i

app.run_forever()
"""


def app_for(prefix: str, waits: int | None) -> AsyncQueueTasks:
    extra = {} if waits is None else {"redis_wait_connections": waits}
    return AsyncQueueTasks(
        broker=RedisBroker(URL, prefix=prefix, queue="bench"),
        storage=RedisStorage(URL, prefix=prefix),
        global_config=RedisGlobalConfig(URL, prefix=prefix),
        config=QueueConfig(plugins_disabled=["*"], extra=extra),
    )


async def run(n: int, waits: int | None) -> None:
    prefix = f"bench-waits-{uuid.uuid4().hex[:8]}"
    admin = redis.Redis.from_url(URL)
    app = app_for(prefix, waits)
    try:
        tasks = [await app.add_task("noop", i) for i in range(n)]
        before = len(admin.client_list())
        done = 0

        async def wait(task_uuid: str) -> None:
            nonlocal done
            await app.wait(task_uuid, 120)
            done += 1

        waiting = [asyncio.ensure_future(wait(t.uuid)) for t in tasks]
        # Until the waits' connections stop growing (every wait blocked or watched).
        seen, still = -1, 0
        while still < 5:
            await asyncio.sleep(0.1)
            now = len(admin.client_list())
            still = still + 1 if now == seen else 0
            seen = now
        added = seen - before
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "worker.py"
            script.write_text(WORKER)
            start = time.perf_counter()
            worker = subprocess.Popen([sys.executable, str(script), URL, prefix])  # noqa: ASYNC220
            try:
                await asyncio.gather(*waiting)
                wall = time.perf_counter() - start
            finally:
                worker.terminate()
                worker.wait(30)
        assert done == n
        print(
            f"{n} waits (redis_wait_connections={'default' if waits is None else waits}): "
            f"{added} Redis connections added while waiting; last result {wall:.2f} s after "
            f"the worker's start ({n / wall:,.0f} results/s, worker start-up included)"
        )
    finally:
        await app.aclose()
        for key in admin.scan_iter(match=f"*{prefix}*", count=10_000):
            admin.delete(key)
        admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--wait-connections", type=int, default=None)
    opts = parser.parse_args()
    asyncio.run(run(opts.n, opts.wait_connections))


if __name__ == "__main__":
    main()
