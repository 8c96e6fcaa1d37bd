"""qtasks on RabbitMQ (127.0.0.1:5672) with Redis storage (127.0.0.1:6379): W1, W2 and W3.

Measured the way ``bench/peers`` measures taskiq-aio-pika and celery (amqp): the worker runs in
its own subprocess (``AsyncQueueTasks.run_forever``), a producer subprocess drives the workload,
and results travel through :class:`~qtasks_redis.RedisStorage`, so W2 goes through the
framework's result API (``add_task(timeout=...)``) across processes.

* W1: 10,000 tasks (each INCRs a Redis counter) enqueued one ``add_task`` at a time into a running
  worker with concurrency 10; rate = N / (first enqueue -> counter reaches N).
* W2: 200 sequential ``add_task("echo", i, timeout=5)`` round trips; p50/p95/p99 in ms.
* W3: 2,000 tasks sleeping 10 ms queued while no worker runs, then a worker with concurrency 100
  starts; wall = last task end - first task start as stamped by the tasks (ideal 0.2 s).

Run: ``uv run python bench/rabbitmq_throughput.py [--w1 N] [--w2 N] [--w3 N] [--repeat R]``;
``--split N`` runs only W1 (N tasks) with the producer's time split (publish, record add, CPU
per task of producer and worker).
Each run uses a fresh queue (deleted afterwards) and Redis db 14 (flushed; ``BENCH_REDIS_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
QUEUE = os.environ.get("BENCH_QUEUE", "qtasks-bench")
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "10"))
QUEUE_VERSION = int(os.environ.get("BENCH_QUEUE_VERSION", "0"))
W3_N = int(os.environ.get("BENCH_W3_N", "0"))
SLEEP = 0.010
WARM_KEY, W1_KEY = "bench:warm", "bench:w1"
W3_DONE, W3_FIRST, W3_LAST = "bench:w3", "bench:w3:first", "bench:w3:last"


# --- the app (worker and producer processes) --------------------------------------------------


def build_app() -> Any:
    from qtasks import AsyncQueueTasks, QueueConfig
    from qtasks_rabbitmq import RabbitMQBroker
    from qtasks_redis import RedisGlobalConfig, RedisStorage

    app = AsyncQueueTasks(
        broker=RabbitMQBroker(AMQP_URL, queue=QUEUE, queue_version=QUEUE_VERSION),
        storage=RedisStorage(REDIS_URL, prefix=QUEUE),
        global_config=RedisGlobalConfig(REDIS_URL, prefix=QUEUE),
        config=QueueConfig(max_tasks_process=CONCURRENCY),
    )
    redis_clients: dict[int, Any] = {}
    w3 = {"n": 0, "first": float("inf"), "last": 0.0}

    def redis() -> Any:
        import redis.asyncio

        loop = id(asyncio.get_running_loop())
        if loop not in redis_clients:
            redis_clients[loop] = redis.asyncio.Redis.from_url(REDIS_URL)
        return redis_clients[loop]

    @app.task(name="incr")
    async def incr(key: str) -> None:
        await redis().incr(key)

    @app.task(name="sleep_incr")
    async def sleep_incr() -> None:
        start = time.time()
        await asyncio.sleep(SLEEP)
        w3["n"] += 1
        w3["first"] = min(w3["first"], start)
        w3["last"] = max(w3["last"], time.time())
        if w3["n"] == W3_N:
            await redis().mset(
                {W3_FIRST: repr(w3["first"]), W3_LAST: repr(w3["last"]), W3_DONE: str(W3_N)}
            )

    @app.task(name="echo")
    async def echo(x: int) -> int:
        return x

    return app


def wait_counter(client: Any, key: str, n: int, deadline_s: float) -> float:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = client.get(key)
        if value is not None and int(value) >= n:
            return time.perf_counter()
        time.sleep(0.002)
    raise TimeoutError(f"{key} reached {int(client.get(key) or 0)} of {n}")


def pct(ordered: list[float], q: float) -> float:
    index = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return round(ordered[index], 3)


async def produce(workload: str, n: int) -> dict[str, Any]:
    import redis

    app = build_app()
    counter = redis.Redis.from_url(REDIS_URL)
    try:
        if workload == "warm":
            for _ in range(20):
                await app.add_task("incr", WARM_KEY)
            wait_counter(counter, WARM_KEY, 20, 90)
            return {"warm": 20}
        if workload == "W1":
            for _ in range(20):
                await app.add_task("incr", WARM_KEY)
            wait_counter(counter, WARM_KEY, 20, 90)
            counter.delete(W1_KEY)
            start = time.perf_counter()
            for _ in range(n):
                await app.add_task("incr", W1_KEY)
            enqueued = time.perf_counter()
            done = wait_counter(counter, W1_KEY, n, 60 + n / 20)
            return {
                "rate": round(n / (done - start), 1),
                "enqueue_rate": round(n / (enqueued - start), 1),
            }
        if workload == "W1-split":
            return await split_w1(app, counter, n)
        if workload == "W2":
            for i in range(10):
                await app.add_task("echo", i, timeout=5)
            samples = []
            for i in range(n):
                t0 = time.perf_counter()
                task = await app.add_task("echo", i, timeout=5)
                samples.append((time.perf_counter() - t0) * 1000)
                assert task.returning == i, task
            samples.sort()
            return {
                "p50_ms": pct(samples, 0.5),
                "p95_ms": pct(samples, 0.95),
                "p99_ms": pct(samples, 0.99),
                "mean_ms": round(statistics.fmean(samples), 3),
            }
        if workload == "W3-enqueue":
            counter.delete(W3_DONE, W3_FIRST, W3_LAST)
            for _ in range(n):
                await app.add_task("sleep_incr")
            return {"n": n}
        if workload == "W3-wait":
            wait_counter(counter, W3_DONE, n, 60 + n * SLEEP)
            wall = float(counter.get(W3_LAST) or 0) - float(counter.get(W3_FIRST) or 0)
            return {"wall_s": round(wall, 4), "ideal_s": round(n * SLEEP / CONCURRENCY, 4)}
        raise SystemExit(f"unknown workload {workload!r}")
    finally:
        await app.aclose()
        counter.close()


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU of a process, from ``/proc`` (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def split_w1(app: Any, counter: Any, n: int) -> dict[str, Any]:
    """W1 with the producer's time split: each confirmed publish and each record add timed
    (they overlap), and the CPU per task of this process and of the worker
    (``BENCH_WORKER_PID``)."""
    await app.start()
    publishes: list[float] = []
    adds: list[float] = []
    publish, add = app.broker.publish, app.storage.add

    async def timed_publish(envelope: Any) -> None:
        start = time.perf_counter()
        await publish(envelope)
        publishes.append(time.perf_counter() - start)

    async def timed_add(record: Any, **options: Any) -> None:
        start = time.perf_counter()
        await add(record, **options)
        adds.append(time.perf_counter() - start)

    app.broker.publish, app.storage.add = timed_publish, timed_add
    for _ in range(20):
        await app.add_task("incr", WARM_KEY)
    wait_counter(counter, WARM_KEY, 20, 90)
    publishes.clear()
    adds.clear()
    counter.delete(W1_KEY)
    worker = os.environ.get("BENCH_WORKER_PID", "")
    worker_cpu = cpu_seconds(worker) if worker else 0.0
    cpu, start = cpu_seconds(), time.perf_counter()
    for _ in range(n):
        await app.add_task("incr", W1_KEY)
    enqueued, cpu = time.perf_counter(), cpu_seconds() - cpu
    done = wait_counter(counter, W1_KEY, n, 60 + n / 20)
    ms = 1000 / n
    return {
        "rate": round(n / (done - start), 1),
        "add_task_ms": round((enqueued - start) * ms, 3),
        "publish_p50_ms": round(statistics.median(publishes) * 1000, 3),
        "add_p50_ms": round(statistics.median(adds) * 1000, 3),
        "producer_cpu_ms": round(cpu * ms, 3),
        "worker_cpu_ms": round((cpu_seconds(worker) - worker_cpu) * ms, 3) if worker else None,
    }


async def cleanup() -> None:
    import aio_pika

    from qtasks_rabbitmq import Topology

    topology = Topology(QUEUE)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name in topology.all_queues():
            await channel.queue_delete(name)
        for name in topology.all_exchanges():
            await channel.exchange_delete(name)


# --- the driver -------------------------------------------------------------------------------


class Run:
    def __init__(self, queue: str) -> None:
        self.env = {**os.environ, "BENCH_QUEUE": queue, "PYTHONUNBUFFERED": "1"}

    def call(self, *args: str, **env: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, __file__, *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args}: exit {done.returncode}\n{done.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def worker(self, **env: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, __file__, "worker"],
            env={**self.env, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=None,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_run(w1: int, w2: int, w3: int) -> dict[str, Any]:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    run = Run(f"qtasks-bench-{uuid.uuid4().hex[:8]}")
    out: dict[str, Any] = {}
    try:
        worker = run.worker(BENCH_CONCURRENCY="10")
        try:
            out["W1"] = run.call("W1", str(w1))
            out["W2"] = run.call("W2", str(w2))
        finally:
            stop(worker)
        redis.Redis.from_url(REDIS_URL).flushdb()
        c100 = {"BENCH_CONCURRENCY": "100", "BENCH_W3_N": str(w3)}
        first = run.worker(**c100)
        try:
            run.call("warm", **c100)
        finally:
            stop(first)
        run.call("W3-enqueue", str(w3), **c100)
        worker = run.worker(**c100)
        try:
            out["W3"] = run.call("W3-wait", str(w3), **c100)
        finally:
            stop(worker)
    finally:
        run.call("cleanup")
    return out


def split_run(n: int) -> dict[str, Any]:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    run = Run(f"qtasks-bench-{uuid.uuid4().hex[:8]}")
    try:
        worker = run.worker(BENCH_CONCURRENCY="10")
        try:
            return run.call("W1-split", str(n), BENCH_WORKER_PID=str(worker.pid))
        finally:
            stop(worker)
    finally:
        run.call("cleanup")


def main() -> None:
    workloads = ("worker", "W1", "W1-split", "W2", "W3-enqueue", "W3-wait", "warm")
    if len(sys.argv) > 1 and sys.argv[1] in workloads:
        if sys.argv[1] == "worker":
            build_app().run_forever()
            return
        n = int(sys.argv[2]) if len(sys.argv) > 2 else 0
        print(json.dumps(asyncio.run(produce(sys.argv[1], n))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "cleanup":
        asyncio.run(cleanup())
        print(json.dumps({"cleanup": True}))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--w1", type=int, default=10_000)
    parser.add_argument("--w2", type=int, default=200)
    parser.add_argument("--w3", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--split", type=int, metavar="N", help="only W1 of N tasks, the producer's time split"
    )
    opts = parser.parse_args()
    if opts.split:
        for _ in range(opts.repeat):
            print(json.dumps({**split_run(opts.split), "load": os.getloadavg()[0]}), flush=True)
        return
    for _ in range(opts.repeat):
        result = one_run(opts.w1, opts.w2, opts.w3)
        w1, w2, w3 = result["W1"], result["W2"], result["W3"]
        print(
            f"W1 {w1['rate']:,.0f} tasks/s (enqueue {w1['enqueue_rate']:,.0f}/s) | "
            f"W2 p50 {w2['p50_ms']:.2f} ms p95 {w2['p95_ms']:.2f} ms p99 {w2['p99_ms']:.2f} ms | "
            f"W3 {w3['wall_s']:.2f} s (ideal {w3['ideal_s']:.2f} s) | "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
