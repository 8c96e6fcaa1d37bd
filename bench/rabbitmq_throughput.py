"""qtasks on RabbitMQ (127.0.0.1:5672): W1, W2 and W3.

W1: 10,000 no-op tasks enqueued one call at a time into a running worker (concurrency 10), tasks/s.
W2: 200 sequential ``add_task(timeout=...)`` round trips, p50/p95/p99 in ms.
W3: 2,000 tasks sleeping 10 ms at concurrency 100, wall time against the ideal 0.2 s.
One process; results in the in-memory storage. Each run uses a fresh queue and deletes it.
Run: ``uv run python bench/rabbitmq_throughput.py [W1_COUNT]``.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid

import aio_pika
import anyio

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_rabbitmq import RabbitMQBroker, Topology

URL = "amqp://guest:guest@127.0.0.1:5672/"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def make_app(concurrency: int) -> AsyncQueueTasks:
    broker = RabbitMQBroker(URL, queue=f"qtasks-bench-{uuid.uuid4().hex[:8]}")
    return AsyncQueueTasks(
        broker=broker, config=QueueConfig(max_tasks_process=concurrency, prefetch=concurrency)
    )


async def drop(app: AsyncQueueTasks) -> None:
    assert isinstance(app.broker, RabbitMQBroker)
    topology: Topology = app.broker.topology
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for name in topology.all_queues():
            await channel.queue_delete(name)
        for name in topology.all_exchanges():
            await channel.exchange_delete(name)


async def w1(n: int) -> float:
    app = make_app(10)
    done = anyio.Event()
    count = 0

    @app.task
    async def noop() -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    async with app:
        start = time.perf_counter()
        for _ in range(n):
            await app.add_task("noop")
        with anyio.fail_after(300):
            await done.wait()
        elapsed = time.perf_counter() - start
    await drop(app)
    return n / elapsed


async def w2(n: int) -> list[float]:
    app = make_app(10)

    @app.task
    async def noop() -> None:
        return None

    samples = []
    async with app:
        for _ in range(20):
            await app.add_task("noop", timeout=10)
        for _ in range(n):
            start = time.perf_counter()
            await app.add_task("noop", timeout=10)
            samples.append((time.perf_counter() - start) * 1000)
    await drop(app)
    return samples


async def w3(n: int) -> float:
    app = make_app(100)
    done = anyio.Event()
    count = 0

    @app.task
    async def nap() -> None:
        nonlocal count
        await anyio.sleep(0.01)
        count += 1
        if count == n:
            done.set()

    async with app:
        start = time.perf_counter()
        for _ in range(n):
            await app.add_task("nap")
        with anyio.fail_after(300):
            await done.wait()
        elapsed = time.perf_counter() - start
    await drop(app)
    return elapsed


async def main(n: int) -> None:
    rate = await w1(n)
    print(f"W1 {n} no-op tasks, concurrency 10: {rate:8.0f} tasks/s")
    samples = await w2(200)
    print(
        f"W2 200 round trips: p50 {percentile(samples, 0.5):.2f} ms, "
        f"p95 {percentile(samples, 0.95):.2f} ms, p99 {percentile(samples, 0.99):.2f} ms "
        f"(mean {statistics.mean(samples):.2f} ms)"
    )
    elapsed = await w3(2000)
    print(f"W3 2000 x 10 ms sleeps, concurrency 100: {elapsed:.2f} s (ideal 0.20 s)")


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
