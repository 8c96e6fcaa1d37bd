"""qtasks on Redis: throughput, latency and concurrency (the W1/W2/W3 workloads of bench/peers).

The worker runs in a subprocess (as in production), the producer in this process, both on the
local Redis (``QTASKS_BENCH_REDIS``, default ``redis://127.0.0.1:6379/0``) under a fresh key
prefix that is deleted afterwards.

- W1: 10,000 no-op tasks enqueued one call at a time into a running worker (concurrency 10);
  tasks/s from the first enqueue until every record is final.
- W2: 200 sequential ``add_task(timeout=...)`` round trips; p50/p95/p99 in ms.
- W3: 2,000 tasks sleeping 10 ms at concurrency 100; wall time vs the ideal 0.2 s.
- Peak RSS of the worker process (from /proc, VmHWM).

Run: ``uv run python bench/redis_throughput.py [W1 count]``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import anyio
import redis

from qtasks import AsyncQueueTasks
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

URL = os.environ.get("QTASKS_BENCH_REDIS", "redis://127.0.0.1:6379/0")

WORKER = """
import sys, anyio
from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
url, prefix, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
app = AsyncQueueTasks(
    broker=RedisBroker(url, prefix=prefix, queue="bench"),
    storage=RedisStorage(url, prefix=prefix),
    global_config=RedisGlobalConfig(url, prefix=prefix),
    config=QueueConfig(max_tasks_process=concurrency, prefetch=concurrency, log_level="WARNING"),
)

@app.task
async def noop() -> None:
    return None

@app.task
async def sleep10() -> None:
    await anyio.sleep(0.01)

app.run_forever()
"""


def producer(prefix: str) -> AsyncQueueTasks:
    return AsyncQueueTasks(
        broker=RedisBroker(URL, prefix=prefix, queue="bench"),
        storage=RedisStorage(URL, prefix=prefix),
        global_config=RedisGlobalConfig(URL, prefix=prefix),
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wait_workers(app: AsyncQueueTasks, n: int) -> None:
    with anyio.fail_after(30):
        while len(await app.global_config.workers()) < n:  # noqa: ASYNC110 - heartbeats
            await anyio.sleep(0.05)


async def wait_all_final(app: AsyncQueueTasks, n: int) -> None:
    """Until ``n`` records are final; stats are read from Redis, ~every 5 ms."""
    while True:  # the bench asks Redis; there is no event to wait on across processes
        stats = await app.storage.stats()
        if stats.get("success", 0) + stats.get("error", 0) >= n:
            return
        await anyio.sleep(0.005)


class Worker:
    def __init__(self, prefix: str, concurrency: int, tmp: Path) -> None:
        script = tmp / "worker.py"
        script.write_text(WORKER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), URL, prefix, str(concurrency)],
            stdout=subprocess.DEVNULL,
        )

    def stop(self) -> float:
        rss = peak_rss_mib(self.proc.pid)
        self.proc.terminate()
        self.proc.wait(30)
        return rss


async def run(n: int) -> None:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # W1 and W2: one worker, concurrency 10.
            app = producer(prefix)
            await app.start()
            worker = Worker(prefix, 10, Path(tmp))
            await wait_workers(app, 1)
            start = time.perf_counter()
            for _ in range(n):
                await app.add_task("noop")
            await wait_all_final(app, n)
            w1 = n / (time.perf_counter() - start)
            latencies = []
            for _ in range(200):
                t0 = time.perf_counter()
                await app.add_task("noop", timeout=10)
                latencies.append((time.perf_counter() - t0) * 1000)
            rss_10 = worker.stop()
            await app.aclose()
            clean(prefix)

            # W3: one worker, concurrency 100, 2,000 tasks of 10 ms.
            app = producer(prefix)
            await app.start()
            worker = Worker(prefix, 100, Path(tmp))
            await wait_workers(app, 1)
            start = time.perf_counter()
            for _ in range(2000):
                await app.add_task("sleep10")
            await wait_all_final(app, 2000)
            w3 = time.perf_counter() - start
            rss_100 = worker.stop()
            await app.aclose()
        finally:
            clean(prefix)
    print(f"W1 throughput: {w1:,.0f} tasks/s ({n} no-op tasks, concurrency 10)")
    p50, p95, p99 = (percentile(latencies, q) for q in (0.5, 0.95, 0.99))
    mean = statistics.fmean(latencies)
    print(f"W2 latency: p50 {p50:.2f} ms, p95 {p95:.2f} ms, p99 {p99:.2f} ms (mean {mean:.2f})")
    print(f"W3 concurrency: {w3:.3f} s for 2,000 x 10 ms at 100 (ideal 0.200 s)")
    print(f"worker peak RSS: {rss_10:.1f} MiB (concurrency 10), {rss_100:.1f} MiB (100)")


def clean(prefix: str) -> None:
    client = redis.Redis.from_url(URL)
    keys = list(client.scan_iter(match=f"{{{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


if __name__ == "__main__":
    anyio.run(run, int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
