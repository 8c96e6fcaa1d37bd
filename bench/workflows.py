"""Workflows and bulk enqueue, measured side by side in one run.

- B1 bulk enqueue on Redis: ``task.add_tasks(range(N))`` from one producer (records and queue
  entries, one script per 1,000), against the same N tasks one ``add_task`` at a time.
- B2 bulk enqueue on RabbitMQ with publisher confirms (a Redis storage for the records):
  ``add_tasks`` of N, and the broker's ``publish_many`` alone.
- C1 a chord of N no-op members (then a no-op callback) against the same N no-op tasks on their
  own (``add_tasks``, done when the storage counts N successes), one worker process
  (concurrency 16) on Redis.
- C2 a 100-step chain of no-ops against 100 single-task round trips (``add_task(...,
  timeout=...)`` one after the other), same worker.

Every figure is printed; nothing is asserted. The machine the results in ``bench/results`` come
from is shared (2 cores, other engineers' test runs): expect noise of tens of percent.

Run: ``uv run --all-packages python bench/workflows.py [--n 10000] [--bulk 20000]
[--only B2]`` (``--only`` takes B1, B2 or C; repeat it for several).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid

import anyio
import redis

from qtasks import AsyncQueueTasks, QueueConfig, chain, chord
from qtasks.components import Broker
from qtasks.messages import Envelope
from qtasks_rabbitmq import RabbitMQBroker
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

URL = os.environ.get("QTASKS_BENCH_REDIS", "redis://127.0.0.1:6379/0")
AMQP = os.environ.get("QTASKS_BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")

WORKER = """
import sys
from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_rabbitmq import RabbitMQBroker
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
url, prefix = sys.argv[1], sys.argv[2]
app = AsyncQueueTasks(
    broker=RedisBroker(url, prefix=prefix, queue="bench"),
    storage=RedisStorage(url, prefix=prefix),
    global_config=RedisGlobalConfig(url, prefix=prefix),
    config=QueueConfig(max_tasks_process=16, log_level="WARNING", plugins_disabled=["*"]),
)

@app.task
async def noop(x: int) -> int:
    return x

@app.task
async def done(xs: list[int]) -> int:
    return len(xs)

app.run_forever()
"""


def redis_app(prefix: str, broker: Broker | None = None) -> AsyncQueueTasks:
    app = AsyncQueueTasks(
        broker=broker or RedisBroker(URL, prefix=prefix, queue="bench"),
        storage=RedisStorage(URL, prefix=prefix),
        global_config=RedisGlobalConfig(URL, prefix=prefix),
        config=QueueConfig(log_level="WARNING", plugins_disabled=["*"]),
    )

    @app.task
    async def noop(x: int) -> int:
        return x

    @app.task
    async def done(xs: list[int]) -> int:
        return len(xs)

    return app


def delete(prefix: str) -> None:
    client = redis.Redis.from_url(URL)
    for key in client.scan_iter(match=f"*{prefix}*", count=10_000):
        client.delete(key)
    client.close()


async def b1_redis_bulk(n: int) -> str:
    prefix = f"bench-wf-{uuid.uuid4().hex[:8]}"
    app = redis_app(prefix)
    try:
        await app.start()
        noop = app.tasks["noop"]
        await noop.add_tasks(range(100))  # warm-up: connections, scripts loaded
        started = time.perf_counter()
        await noop.add_tasks(range(n))
        bulk = n / (time.perf_counter() - started)
        one = min(n, 5000)
        started = time.perf_counter()
        for i in range(one):
            await noop.add_task(i)
        single = one / (time.perf_counter() - started)
    finally:
        await app.aclose()
        delete(prefix)
    return f"B1 Redis bulk enqueue {bulk:,.0f} tasks/s (add_task one at a time {single:,.0f}/s)"


async def b2_rabbitmq_bulk(n: int) -> str:
    prefix = f"bench-wf-{uuid.uuid4().hex[:8]}"
    queue = f"bench-wf-{uuid.uuid4().hex[:8]}"
    broker = RabbitMQBroker(AMQP, queue=queue)
    app = redis_app(prefix, broker)
    try:
        await app.start()
        noop = app.tasks["noop"]
        await noop.add_tasks(range(100))
        started = time.perf_counter()
        await noop.add_tasks(range(n))
        bulk = n / (time.perf_counter() - started)
        envelopes = [Envelope(uuid.uuid4().hex, b'{"x":1}') for _ in range(n)]
        started = time.perf_counter()
        await broker.publish_many(envelopes)
        publish = n / (time.perf_counter() - started)
    finally:
        await app.aclose()
        delete(prefix)
        await _delete_queue(broker)
    return (
        f"B2 RabbitMQ bulk enqueue with confirms {bulk:,.0f} tasks/s (records in Redis); "
        f"publish_many alone {publish:,.0f} msgs/s"
    )


async def _delete_queue(broker: RabbitMQBroker) -> None:
    import aio_pika

    topology = broker.topology
    connection = await aio_pika.connect(AMQP)
    try:
        for name in topology.all_queues():
            channel = await connection.channel()
            await channel.queue_delete(name)
        for name in topology.all_exchanges():
            channel = await connection.channel()
            await channel.exchange_delete(name)
    finally:
        await connection.close()


async def _successes(app: AsyncQueueTasks, n: int) -> None:
    # A producer-side count, polled as bench/redis_throughput.py polls its counter.
    while (await app.storage.stats()).get("success", 0) < n:  # noqa: ASYNC110
        await anyio.sleep(0.005)


async def c_workflows(n: int) -> list[str]:
    prefix = f"bench-wf-{uuid.uuid4().hex[:8]}"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, URL, prefix])  # noqa: ASYNC220
    app = redis_app(prefix)
    lines = []
    try:
        noop, done = app.tasks["noop"], app.tasks["done"]
        await (await noop.add_task(0)).wait_result(30)  # the worker is up
        await app.flush_all()
        started = time.perf_counter()
        await noop.add_tasks(range(n))
        await _successes(app, n)
        alone = time.perf_counter() - started
        await app.flush_all()
        started = time.perf_counter()
        wf = await app.run_workflow(chord(noop.map(range(n)), done.s()))
        result = await wf.wait_result(300)
        with_chord = time.perf_counter() - started
        assert result.result == n, result
        lines.append(
            f"C1 chord of {n:,} no-ops {with_chord:.2f} s vs the {n:,} tasks alone "
            f"{alone:.2f} s: {with_chord / alone:.2f}x (target <= 1.5x)"
        )
        steps = 100
        started = time.perf_counter()
        for i in range(steps):
            await noop.add_task(i, timeout=30)
        single = (time.perf_counter() - started) / steps
        started = time.perf_counter()
        flow = chain(noop.s(0), *(noop.s() for _ in range(steps - 1)))
        result = await (await app.run_workflow(flow)).wait_result(120)
        per_step = (time.perf_counter() - started) / steps
        assert result.status == "success", result
        lines.append(
            f"C2 {steps}-step chain {per_step * 1000:.2f} ms/step vs single-task round trip "
            f"{single * 1000:.2f} ms: {single / per_step:.0%} of round-trip speed "
            "(target >= 50 %)"
        )
    finally:
        worker.terminate()
        worker.wait(20)
        await app.aclose()
        delete(prefix)
    return lines


async def main(n: int, bulk: int, only: list[str]) -> None:
    print(
        f"# bench/workflows.py  n={n} bulk={bulk} only={','.join(only) or 'all'}  "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    if not only or "B1" in only:
        print(await b1_redis_bulk(bulk), flush=True)
    if not only or "B2" in only:
        print(await b2_rabbitmq_bulk(n), flush=True)
    if not only or "C" in only:
        for line in await c_workflows(n):
            print(line, flush=True)
    print(f"# load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--bulk", type=int, default=20_000)
    parser.add_argument("--only", action="append", choices=["B1", "B2", "C"], default=[])
    options = parser.parse_args()
    anyio.run(main, options.n, options.bulk, options.only)
