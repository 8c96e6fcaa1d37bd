"""The part of the benchmark every peer script shares: settings, task bodies, workloads, output.

It runs inside each peer's own virtual environment, so it uses only the standard library and
redis-py (every peer venv has redis-py; it is the harness's counter client, not the peer's).

A peer script defines the four tasks with its framework and hands :func:`main` an ``Ops``
object for the producer side:

* ``incr(key)``: enqueue the W1 task, which runs :func:`incr_sync` / :func:`incr_async`;
* ``sleep_incr()``: enqueue the W3 task, which runs :func:`sleep_incr_sync` /
  :func:`sleep_incr_async`;
* ``roundtrip(i)``: enqueue ``echo(i)`` and return its result through the framework's result API;
* ``signal(port, seq)``: enqueue the SC task (fire-and-forget, the framework's normal enqueue
  call), which runs :func:`send_signal`;
* optional ``setup()``, ``teardown()``, ``cleanup()`` (remove broker-side queues).

Each of these may be sync or async. Settings come from the environment that ``run.py`` sets.
Every producer runs on asyncio's default event loop (``asyncio.run`` in :func:`main`); each peer
script says which loop (or thread pool) its worker runs the tasks on.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import socket
import statistics
import sys
import threading
import time
from typing import Any

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "10"))
VENV_BIN = os.environ.get("BENCH_VENV_BIN", os.path.dirname(sys.executable))

# Frameworks whose result wait or queue fetch is a poll get this interval (seconds), so that a
# default of 0.2-1 s does not decide W2 for them.
POLL = 0.01

WARM_KEY = "bench:warm"
W1_KEY = "bench:w1"
W3_DONE, W3_FIRST, W3_LAST = "bench:w3", "bench:w3:first", "bench:w3:last"
W3_WAITING = "waiting for W3"
"""Printed by the W3-wait producer once it is ready; run.py then starts the W3 worker."""
SLEEP = 0.010
SC_WARM_KEY = "bench:warm-sc"
SC_WARMUP = 20  # SC round trips before the measured ones, as bench/redis_throughput.py
SC_TIMEOUT = 5.0  # seconds one SC round trip may take before the run fails
SKIPPED = 3  # exit code: this peer cannot run here (reason on stderr)

# W3 tasks count themselves inside the worker process (every peer runs one worker process), so
# the harness adds no Redis round trip per task; the N-th task writes the totals once.
W3_N = int(os.environ.get("BENCH_W3_N", "0"))


def skip(reason: str) -> None:
    """Exit with the 'skipped' code; ``run.py`` shows the reason."""
    print(reason, file=sys.stderr)
    sys.exit(SKIPPED)


# --- task bodies (run in the worker) ----------------------------------------------------------

_sync_client: Any = None
_async_clients: dict[int, Any] = {}
_w3_lock = threading.Lock()
_w3 = {"n": 0, "first": float("inf"), "last": 0.0}


def _sync() -> Any:
    global _sync_client
    if _sync_client is None:
        import redis

        _sync_client = redis.Redis.from_url(REDIS_URL)
    return _sync_client


def _async() -> Any:
    # One client per event loop: a worker may run its tasks on a loop of its own.
    loop_id = id(asyncio.get_running_loop())
    client = _async_clients.get(loop_id)
    if client is None:
        import redis.asyncio

        client = _async_clients[loop_id] = redis.asyncio.Redis.from_url(REDIS_URL)
    return client


def _w3_done(start: float, end: float) -> dict[str, str] | None:
    """Record one W3 task; return the totals to write when it is the N-th."""
    with _w3_lock:
        _w3["n"] += 1
        _w3["first"] = min(_w3["first"], start)
        _w3["last"] = max(_w3["last"], end)
        if _w3["n"] != W3_N:
            return None
        return {W3_FIRST: repr(_w3["first"]), W3_LAST: repr(_w3["last"]), W3_DONE: str(W3_N)}


def incr_sync(key: str) -> None:
    _sync().incr(key)


async def incr_async(key: str) -> None:
    await _async().incr(key)


def sleep_incr_sync() -> None:
    start = time.time()
    time.sleep(SLEEP)
    totals = _w3_done(start, time.time())
    if totals is not None:
        _sync().mset(totals)


async def sleep_incr_async() -> None:
    start = time.time()
    await asyncio.sleep(SLEEP)
    totals = _w3_done(start, time.time())
    if totals is not None:
        await _async().mset(totals)


# One socket per process, made at import as in bench/redis_throughput.py's worker; sendto on a
# UDP socket is safe from several threads (celery's and dramatiq's thread pools).
_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def send_signal(port: int, seq: int) -> None:
    """SC task body: one UDP datagram carrying ``seq`` to the producer on loopback.

    It is the same call in a sync and an async task: ``sendto`` on loopback does not block."""
    _udp.sendto(str(seq).encode(), ("127.0.0.1", port))


# --- producer side ----------------------------------------------------------------------------


async def _call(fn: Any, *args: Any) -> Any:
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def _wait_counter(client: Any, key: str, n: int, deadline_s: float, every: float = 0.002) -> float:
    """Poll ``key`` every ``every`` s until it reaches ``n``; return perf_counter() then."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = client.get(key)
        if value is not None and int(value) >= n:
            return time.perf_counter()
        time.sleep(every)
    value = client.get(key)
    raise TimeoutError(f"{key} reached {int(value or 0)} of {n} in {deadline_s:.0f} s")


def _pct(sorted_ms: list[float], q: float) -> float:
    # Nearest-rank percentile: the smallest sample with at least q of the samples at or below it.
    index = max(0, min(len(sorted_ms) - 1, math.ceil(q * len(sorted_ms)) - 1))
    return round(sorted_ms[index], 3)


def latency_summary(ms: list[float]) -> dict[str, Any]:
    """Nearest-rank p50/p95/p99, mean and max of latencies in ms."""
    ordered = sorted(ms)
    return {
        "n": len(ordered),
        "p50_ms": _pct(ordered, 0.50),
        "p95_ms": _pct(ordered, 0.95),
        "p99_ms": _pct(ordered, 0.99),
        "mean_ms": round(statistics.fmean(ordered), 3),
        "max_ms": round(ordered[-1], 3),
    }


async def side_channel(ops: Any, n: int) -> dict[str, Any]:
    """SC, as ``bench/redis_throughput.py --only SC``: ``SC_WARMUP`` then ``n`` sequential
    ``ops.signal(port, i)``; each is the time from the enqueue call to the task's datagram
    arriving at this producer (enqueue, pickup, execute; not the settle), in ms.

    The arrival is stamped in the datagram callback, the first point the producer's loop sees
    it; a sync enqueue call that returns after the datagram arrived is counted until it returns.
    """
    loop = asyncio.get_running_loop()
    waiting: dict[int, asyncio.Future[float]] = {}

    class Arrivals(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            future = waiting.pop(int(data), None)
            if future is not None and not future.done():
                future.set_result(time.perf_counter())

    transport, _ = await loop.create_datagram_endpoint(Arrivals, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    samples: list[float] = []
    try:
        for i in range(SC_WARMUP + n):
            arrived = waiting[i] = loop.create_future()
            start = time.perf_counter()
            await _call(ops.signal, port, i)
            end = await asyncio.wait_for(arrived, SC_TIMEOUT)
            if i >= SC_WARMUP:
                samples.append((end - start) * 1000)
    finally:
        transport.close()
    return {
        **latency_summary(samples),
        "warmup": SC_WARMUP,
        "min_ms": round(min(samples), 3),
        "samples_ms": [round(x, 3) for x in samples],
    }


async def produce(ops: Any, workload: str, n: int) -> dict[str, Any]:
    import redis

    counter = redis.Redis.from_url(REDIS_URL)
    if hasattr(ops, "setup"):
        await _call(ops.setup)
    try:
        if workload == "warm":
            # Enough tasks to prove the worker is consuming; also creates queues/groups.
            for _ in range(20):
                await _call(ops.incr, WARM_KEY)
            _wait_counter(counter, WARM_KEY, 20, 90)
            return {"warm": 20}

        if workload == "W1":
            for _ in range(20):
                await _call(ops.incr, WARM_KEY)
            _wait_counter(counter, WARM_KEY, 20, 90)
            counter.delete(W1_KEY)
            start = time.perf_counter()
            for _ in range(n):
                await _call(ops.incr, W1_KEY)
            enqueued = time.perf_counter()
            done = _wait_counter(counter, W1_KEY, n, 60 + n / 20)
            total = done - start
            return {
                "n": n,
                "seconds": round(total, 4),
                "rate": round(n / total, 1),
                "enqueue_seconds": round(enqueued - start, 4),
                "enqueue_rate": round(n / (enqueued - start), 1),
            }

        if workload == "W2":
            for i in range(10):  # warm-up round trips, not counted
                await _call(ops.roundtrip, i)
            latencies = []
            for i in range(n):
                t0 = time.perf_counter()
                value = await _call(ops.roundtrip, i)
                latencies.append((time.perf_counter() - t0) * 1000)
                if value != i:
                    raise AssertionError(f"round trip {i} returned {value!r}")
            return latency_summary(latencies)

        if workload == "SC":
            # A warm worker: 20 counted tasks first (as bench/redis_throughput.py's warm()),
            # then the SC round trips with their own warm-up.
            counter.delete(SC_WARM_KEY)
            for _ in range(20):
                await _call(ops.incr, SC_WARM_KEY)
            _wait_counter(counter, SC_WARM_KEY, 20, 90)
            return await side_channel(ops, n)

        if workload == "W4":
            # A chord of n no-op members (echo) whose callback counts the results: the time
            # from the first enqueue to the callback's result, through the framework's own
            # canvas/workflow API (Ops.chord). Peers without one report that.
            if not hasattr(ops, "chord"):
                return {"n": n, "unsupported": True}
            if await _call(ops.chord, 10) != 10:  # warm-up, and the check that it works
                raise AssertionError("the warm-up chord's callback did not count 10 results")
            start = time.perf_counter()
            counted = await _call(ops.chord, n)
            seconds = time.perf_counter() - start
            if counted != n:
                raise AssertionError(f"the chord's callback counted {counted!r}, not {n}")
            return {"n": n, "seconds": round(seconds, 4), "rate": round(n / seconds, 1)}

        if workload == "W3-enqueue":
            counter.delete(W3_DONE, W3_FIRST, W3_LAST)
            start = time.perf_counter()
            for _ in range(n):
                await _call(ops.sleep_incr)
            return {"n": n, "enqueue_seconds": round(time.perf_counter() - start, 4)}

        if workload == "W3-wait":
            # Started (and imported) before the W3 worker: run.py starts the worker once this
            # line is out, so no interpreter start-up competes with the measured run. The wall
            # comes from the tasks' own stamps, so a slow poll loses nothing and stays quiet.
            print(W3_WAITING, flush=True)
            _wait_counter(counter, W3_DONE, n, 60 + n * SLEEP, every=0.05)
            first = float(counter.get(W3_FIRST) or 0)
            last = float(counter.get(W3_LAST) or 0)
            ideal = n * SLEEP / CONCURRENCY
            wall = last - first
            return {
                "n": n,
                "concurrency": CONCURRENCY,
                "wall_s": round(wall, 4),
                "ideal_s": round(ideal, 4),
                "over_ideal": round(wall / ideal, 3),
            }

        raise SystemExit(f"unknown workload {workload!r}")
    finally:
        if hasattr(ops, "teardown"):
            await _call(ops.teardown)
        counter.close()


def main(ops_factory: Any, worker: Any) -> None:
    """Entry point of a peer script: ``worker``, ``produce <workload> [n]`` or ``cleanup``."""
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: {sys.argv[0]} worker | <workload> [n] | cleanup")
    command = sys.argv[1]
    if command == "worker":
        worker()
        return
    ops = ops_factory()
    if command == "cleanup":
        if hasattr(ops, "cleanup"):
            asyncio.run(_call_async(ops.cleanup))
        print(json.dumps({"cleanup": True}))
        return
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    result = asyncio.run(produce(ops, command, n))
    print(json.dumps(result))


async def _call_async(fn: Any) -> Any:
    return await _call(fn)


def exec_cli(name: str, *args: str) -> None:
    """Replace this process with the peer's own CLI from its venv (same pid, same group)."""
    path = os.path.join(VENV_BIN, name)
    os.execv(path, [path, *args])
