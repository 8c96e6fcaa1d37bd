"""A worker's memory over a long run: RSS after every N tasks of a mixed stream (no leak: flat).

The stream repeats ten tasks: eight no-ops, one that raises (its error and traceback stored),
one async generator of two steps. The producer (this process) enqueues them one ``enqueue`` at
a time in rounds of ``--round`` tasks and waits for each round's last one; the worker is a
subprocess at concurrency 10 (its ``qtasks`` loggers at CRITICAL, so the failing task's log
line is not printed each time). After each round it prints the worker's RSS (VmRSS) and its
high-water mark (VmHWM) from /proc. Records are kept ``--result-ttl`` seconds (default 60), as
a long-running deployment keeps them; Redis's ``used_memory`` is printed at the start and the
end (it holds about that many seconds of records).

On ``QTASKS_BENCH_REDIS`` (default ``redis://127.0.0.1:6379/0``) under a fresh key prefix,
deleted afterwards.

Run: ``uv run python bench/soak.py [--rounds 12] [--round 20000] [--result-ttl 60]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid

import anyio
import redis
from redis_throughput import URL, clean

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

WORKER = """
import logging, sys
from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
url, prefix, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
app = AsyncQueueTasks(
    broker=RedisBroker(url, prefix=prefix),
    storage=RedisStorage(url, prefix=prefix),
    global_config=RedisGlobalConfig(url, prefix=prefix),
    config=QueueConfig(
        max_tasks_process=10, plugins_disabled=["*"], result_ttl=ttl
    ),
)

@app.task
async def noop(i: int) -> int:
    return i

@app.task
async def boom(i: int) -> int:
    raise ValueError(i)

@app.task
async def steps(i: int):
    yield i
    yield i + 1

logging.getLogger("qtasks").setLevel(logging.CRITICAL)  # not each failure's line
app.run_forever()
"""

NAMES = ["noop"] * 8 + ["boom", "steps"]


def memory(pid: int) -> tuple[float, float]:
    """VmRSS and VmHWM of ``pid`` in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def produce(
    worker: subprocess.Popen[bytes], prefix: str, rounds: int, size: int, ttl: float
) -> None:
    client = redis.Redis.from_url(URL)
    app = AsyncQueueTasks(
        broker=RedisBroker(URL, prefix=prefix),
        storage=RedisStorage(URL, prefix=prefix),
        global_config=RedisGlobalConfig(URL, prefix=prefix),
        config=QueueConfig(plugins_disabled=["*"], result_ttl=ttl),
    )
    try:
        await app.start()
        print(f"Redis used_memory at start {client.info('memory')['used_memory'] / 2**20:.1f} MiB")
        started = time.monotonic()
        for done in range(1, rounds + 1):
            last = None
            for i in range(size):
                last = await app.enqueue(NAMES[i % len(NAMES)], [i], {})
            assert last is not None
            await app.wait(last.uuid, 300)
            rss, hwm = memory(worker.pid)
            print(
                f"{done * size:>8} tasks  worker RSS {rss:6.1f} MiB  peak {hwm:6.1f} MiB  "
                f"({time.monotonic() - started:6.1f} s)",
                flush=True,
            )
        used = client.info("memory")["used_memory"] / 2**20
        print(f"Redis used_memory at the end {used:.1f} MiB (results kept {ttl:g} s)")
    finally:
        await app.aclose()
        client.close()


def main(rounds: int, size: int, ttl: float) -> None:
    prefix = f"soak-{uuid.uuid4().hex[:8]}"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, URL, prefix, str(ttl)])
    try:
        anyio.run(produce, worker, prefix, rounds, size, ttl)
    finally:
        worker.terminate()
        worker.wait(30)
        clean(prefix)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--round", type=int, default=20_000)
    parser.add_argument("--result-ttl", type=float, default=60.0)
    args = parser.parse_args()
    main(args.rounds, args.round, args.result_ttl)
