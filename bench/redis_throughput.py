"""qtasks on Redis: W1 throughput, W2 latency, W3 concurrency, measured as bench/peers does.

The workloads and their timing follow ``bench/peers/_common.py`` and ``bench/peers/run.py``
exactly, so these figures compare with the peers' table:

- W1: 20 warm-up tasks, then 10,000 tasks enqueued one ``add_task`` call at a time into a
  running worker (concurrency 10); each task INCRs a Redis counter; rate = N / (first enqueue ->
  the counter reaches N, polled every 2 ms by the producer). CPU per task of the producer (its
  2 ms polls included), the worker and the Redis server (``INFO cpu``: the whole server's, the
  task's own INCR and the polls included), and their total.
- W2: 10 warm-up round trips, then 200 sequential ``add_task("echo", i, timeout=5)``; each
  result is checked; nearest-rank p50/p95/p99 in ms.
- W3: a worker is started and stopped (warm-up), 2,000 tasks sleeping 10 ms are queued while no
  worker runs, then a worker with concurrency 100 starts; wall = last task end - first task
  start, as stamped by the tasks themselves (ideal 2,000 x 10 ms / 100 = 0.2 s).
- SC (only with ``--only SC``, not in the peers' set): the round trip through a side channel,
  as issue 21 words it: 20 warm-up, then 500 sequential ``add_task("signal", port, i)`` into the
  c=10 worker; the task sends one UDP datagram to the producer on loopback, and the time from
  the ``add_task`` call to that datagram's arrival is taken (enqueue, pickup, execute; not the
  settle). Nearest-rank p50/p95/p99 in ms.
- Peak RSS of each worker process (VmHWM from /proc).

The worker runs in a subprocess with the same configuration as the peers' qtasks script
(``QueueConfig(max_tasks_process=C)``, defaults otherwise), the producer in this process, both on
``QTASKS_BENCH_REDIS`` (default ``redis://127.0.0.1:6379/0``) under a fresh key prefix that is
deleted afterwards.

Run: ``uv run python bench/redis_throughput.py [--w1 N] [--w2 N] [--w3 N] [--only W1,W2,W3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import redis

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
import _common  # bench/peers' shared workload code (stdlib and redis-py only)

URL = os.environ.get("QTASKS_BENCH_REDIS", "redis://127.0.0.1:6379/0")
SLEEP = 0.010

# The task bodies are those of bench/peers/_common.py: one async redis-py client per worker,
# W3 stamps kept in the worker and written once by the N-th task.
WORKER = """
import asyncio, socket, sys, time, redis.asyncio
from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
url, prefix, concurrency, w3_n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
app = AsyncQueueTasks(
    broker=RedisBroker(url, prefix=prefix, queue="bench"),
    storage=RedisStorage(url, prefix=prefix),
    global_config=RedisGlobalConfig(url, prefix=prefix),
    # Entry-point plugins off: the dev environment installs a test plugin ("audit") that the
    # peers' venv (and a user's install) does not have.
    config=QueueConfig(max_tasks_process=concurrency, log_level="WARNING", plugins_disabled=["*"]),
)
client = redis.asyncio.Redis.from_url(url)
SLEEP = 0.010
w3 = {"n": 0, "first": float("inf"), "last": 0.0}

@app.task(name="incr")
async def incr(key: str) -> None:
    await client.incr(key)

udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

@app.task(name="signal")
async def signal(port: int, seq: int) -> None:
    udp.sendto(str(seq).encode(), ("127.0.0.1", port))

@app.task(name="echo")
async def echo(x: int) -> int:
    return x

@app.task(name="sleep_incr")
async def sleep_incr(done: str, first: str, last: str) -> None:
    start = time.time()
    await asyncio.sleep(SLEEP)
    end = time.time()
    w3["n"] += 1
    w3["first"] = min(w3["first"], start)
    w3["last"] = max(w3["last"], end)
    if w3["n"] == w3_n:
        await client.mset({first: repr(w3["first"]), last: repr(w3["last"]), done: str(w3_n)})

app.run_forever()
"""


def producer(prefix: str) -> AsyncQueueTasks:
    return AsyncQueueTasks(
        broker=RedisBroker(URL, prefix=prefix, queue="bench"),
        storage=RedisStorage(URL, prefix=prefix),
        global_config=RedisGlobalConfig(URL, prefix=prefix),
        config=QueueConfig(plugins_disabled=["*"]),
    )


def pct(sorted_ms: list[float], q: float) -> float:
    """Nearest rank: the smallest sample with at least ``q`` of the samples at or below it
    (bench/peers/_common.py's, unrounded)."""
    index = max(0, min(len(sorted_ms) - 1, math.ceil(q * len(sorted_ms)) - 1))
    return sorted_ms[index]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(client: redis.Redis) -> float:
    """User + system CPU time of the Redis server so far (``INFO cpu``: the whole server's,
    its main thread and the others, so nothing else should use it while measuring)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def wait_counter(client: redis.Redis, key: str, n: int, deadline_s: float) -> float:
    """Poll ``key`` every 2 ms until it reaches ``n`` (as the peers' harness does)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = client.get(key)
        if value is not None and int(value) >= n:
            return time.perf_counter()
        time.sleep(0.002)
    raise TimeoutError(f"{key} did not reach {n} in {deadline_s:.0f} s")


class Worker:
    def __init__(self, prefix: str, concurrency: int, tmp: Path, w3_n: int = 0) -> None:
        script = tmp / "worker.py"
        script.write_text(WORKER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), URL, prefix, str(concurrency), str(w3_n)],
            stdout=subprocess.DEVNULL,
        )

    def stop(self) -> float:
        rss = peak_rss_mib(self.proc.pid)
        self.proc.terminate()
        self.proc.wait(30)
        return rss


async def warm(app: AsyncQueueTasks, counter: redis.Redis, key: str) -> None:
    for _ in range(20):
        await app.add_task("incr", key)
    wait_counter(counter, key, 20, 90)


@contextlib.asynccontextmanager
async def warm_worker(
    prefix: str, tmp: Path, key: str, out: dict[str, str] | None = None
) -> AsyncIterator[tuple[AsyncQueueTasks, redis.Redis, Worker]]:
    """A started producer, a counter client and a c=10 worker that ran 20 warm-up tasks; the
    worker's peak RSS goes in ``out`` when given."""
    counter = redis.Redis.from_url(URL)
    app = producer(prefix)
    await app.start()
    worker = Worker(prefix, 10, tmp)
    try:
        await warm(app, counter, key)
        yield app, counter, worker
    finally:
        rss = worker.stop()
        if out is not None:
            out["RSS c=10"] = f"{rss:.1f} MiB"
        await app.aclose()
        counter.close()


async def w1_w2(prefix: str, tmp: Path, n1: int, n2: int, out: dict[str, str]) -> None:
    async with warm_worker(prefix, tmp, f"{prefix}:warm", out) as (app, counter, worker):
        if n1:
            key = f"{prefix}:w1"
            cpu = (time.process_time(), cpu_seconds(worker.proc.pid), server_cpu(counter))
            start = time.perf_counter()
            for _ in range(n1):
                await app.add_task("incr", key)
            enqueued = time.perf_counter()
            done = wait_counter(counter, key, n1, 60 + n1 / 20)
            mine = (time.process_time() - cpu[0]) / n1 * 1e6
            theirs = (cpu_seconds(worker.proc.pid) - cpu[1]) / n1 * 1e6
            server = (server_cpu(counter) - cpu[2]) / n1 * 1e6
            out["W1"] = (
                f"{n1 / (done - start):,.0f} tasks/s ({n1} tasks, concurrency 10; "
                f"enqueue alone {n1 / (enqueued - start):,.0f}/s; CPU per task: "
                f"producer {mine:.0f} us incl. polling, worker {theirs:.0f} us, "
                f"Redis {server:.0f} us; total {mine + theirs + server:.0f} us)"
            )
        if n2:
            for i in range(10):
                await app.add_task("echo", i, timeout=5)
            latencies = []
            for i in range(n2):
                t0 = time.perf_counter()
                task = await app.add_task("echo", i, timeout=5)
                latencies.append((time.perf_counter() - t0) * 1000)
                if task.returning != i:
                    raise AssertionError(f"round trip {i} returned {task.returning!r}")
            latencies.sort()
            p50, p95, p99 = (pct(latencies, q) for q in (0.5, 0.95, 0.99))
            mean = sum(latencies) / len(latencies)
            out["W2"] = (
                f"p50 {p50:.2f} ms, p95 {p95:.2f} ms, p99 {p99:.2f} ms "
                f"(mean {mean:.2f}, max {latencies[-1]:.2f}; {n2} round trips)"
            )


async def w3(prefix: str, tmp: Path, n: int, out: dict[str, str]) -> None:
    counter = redis.Redis.from_url(URL)
    app = producer(prefix)
    await app.start()
    try:
        first = Worker(prefix, 100, tmp)
        try:
            await warm(app, counter, f"{prefix}:warm3")
            startup = cpu_seconds(first.proc.pid)  # imports, start-up and 20 tasks
        finally:
            first.stop()
        keys = (f"{prefix}:w3", f"{prefix}:w3:first", f"{prefix}:w3:last")
        for _ in range(n):
            await app.add_task("sleep_incr", *keys)
        second = Worker(prefix, 100, tmp, n)
        try:
            wait_counter(counter, keys[0], n, 60 + n * SLEEP)
            wall = float(counter.get(keys[2]) or 0) - float(counter.get(keys[1]) or 0)
            cpu = (cpu_seconds(second.proc.pid) - startup) / n * 1e6
        finally:
            out["RSS c=100"] = f"{second.stop():.1f} MiB"
        ideal = n * SLEEP / 100
        out["W3"] = (
            f"{wall:.3f} s for {n} x 10 ms at 100 (ideal {ideal:.3f} s, {wall / ideal:.2f}x; "
            f"worker CPU ~{cpu:.0f} us per task beyond start-up)"
        )
    finally:
        await app.aclose()
        counter.close()


def clean(prefix: str) -> None:
    client = redis.Redis.from_url(URL)
    keys = list(client.scan_iter(match=f"{{{prefix}:*", count=1000))
    keys += list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


class _Signals:
    """What bench/peers/_common.side_channel drives: one ``signal`` task per round trip."""

    def __init__(self, app: AsyncQueueTasks) -> None:
        self.app = app

    async def signal(self, port: int, seq: int) -> None:
        await self.app.add_task("signal", port, seq)


async def side_channel(prefix: str, tmp: Path, n: int, out: dict[str, str]) -> None:
    """SC: ``add_task`` -> the task's UDP datagram back at the producer, timed by the same
    code as the peers' SC (bench/peers/_common.py)."""
    async with warm_worker(prefix, tmp, f"{prefix}:warm-sc") as (app, _, _):
        got = await _common.side_channel(_Signals(app), n)
    out["SC"] = (
        f"p50 {got['p50_ms']:.3f} ms, p95 {got['p95_ms']:.3f} ms, p99 {got['p99_ms']:.3f} ms "
        f"(mean {got['mean_ms']:.3f}; {n} round trips through a UDP side channel)"
    )


async def run(opts: argparse.Namespace) -> None:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    only = {w.strip().upper() for w in opts.only.split(",")}
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if only & {"W1", "W2"}:
                n1 = opts.w1 if "W1" in only else 0
                n2 = opts.w2 if "W2" in only else 0
                await w1_w2(prefix, Path(tmp), n1, n2, out)
                clean(prefix)
            if "W3" in only:
                await w3(prefix, Path(tmp), opts.w3, out)
            if "SC" in only:
                clean(prefix)
                await side_channel(prefix, Path(tmp), opts.sc, out)
        finally:
            clean(prefix)
    for name, text in out.items():
        print(f"{name}: {text}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--w1", type=int, default=10_000)
    parser.add_argument("--w2", type=int, default=200)
    parser.add_argument("--w3", type=int, default=2_000)
    parser.add_argument("--sc", type=int, default=500)
    parser.add_argument("--only", default="W1,W2,W3")
    anyio.run(run, parser.parse_args())
