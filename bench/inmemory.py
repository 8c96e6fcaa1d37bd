"""In-memory throughput and latency of qtasks (no server).

Prints: throughput of 10,000 no-op tasks (async and sync functions) enqueued one call at a time
into a running worker (concurrency 10), and p50/p95/p99 of 1,000 sequential
``add_task(timeout=...)`` round trips. Run: ``uv run python bench/inmemory.py [N]``.
"""

from __future__ import annotations

import statistics
import sys
import time

import anyio

from qtasks import AsyncQueueTasks, QueueConfig


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def throughput(kind: str, n: int) -> float:
    app = AsyncQueueTasks(config=QueueConfig(max_tasks_process=10, plugins_disabled=["*"]))
    done = anyio.Event()
    count = 0

    if kind == "async":

        @app.task
        async def noop() -> None:
            nonlocal count
            count += 1
            if count == n:
                done.set()

    else:

        @app.task
        def noop() -> None:
            nonlocal count
            count += 1  # runs in a worker thread; += on an int under the GIL is fine here
            if count == n:
                anyio.from_thread.run_sync(done.set)

    async with app:
        start = time.perf_counter()
        for _ in range(n):
            await app.add_task("noop")
        with anyio.fail_after(120):
            await done.wait()
        elapsed = time.perf_counter() - start
    return n / elapsed


async def latency(n: int) -> list[float]:
    app = AsyncQueueTasks(config=QueueConfig(max_tasks_process=10, plugins_disabled=["*"]))

    @app.task
    async def noop() -> None:
        return None

    samples = []
    async with app:
        for _ in range(50):  # warm up
            await app.add_task("noop", timeout=5)
        for _ in range(n):
            start = time.perf_counter()
            await app.add_task("noop", timeout=5)
            samples.append((time.perf_counter() - start) * 1000)
    return samples


async def main(n: int) -> None:
    for kind in ("async", "sync"):
        rate = await throughput(kind, n)
        print(f"throughput {kind:5s} {n} no-op tasks: {rate:10.0f} tasks/s")
    samples = await latency(1000)
    print(
        "latency add_task(timeout=...) x1000: "
        f"p50 {percentile(samples, 0.5):.3f} ms  p95 {percentile(samples, 0.95):.3f} ms  "
        f"p99 {percentile(samples, 0.99):.3f} ms  mean {statistics.mean(samples):.3f} ms"
    )


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
