"""Where one round trip's time goes: a per-stage budget of ``add_task(..., timeout=)`` on Redis.

The worker runs in a subprocess (as in ``redis_throughput.py`` W2); both processes stamp each
task with ``time.monotonic_ns()`` (CLOCK_MONOTONIC: one clock for every process of the machine)
at the stage boundaries below, through hooks and the task body, and the medians of each stage
over the round trips are printed:

- ``enqueue``: ``add_task`` called -> the broker accepted the message (``qtasks_task_enqueued``):
  encode, the record + message script, its reply.
- ``pickup``: accepted -> the worker holds the delivery (``qtasks_broker_message_received``):
  the queue's wake-up, the worker's BLPOP returning, the claim script, its reply, parsing.
- ``begin``: held -> the task body starts: decode, checks, the begin step, the runner's turn.
- ``run``: the body (returns its argument).
- ``settle``: the body returned -> the ack reply is in (``qtasks_broker_acked``): the settle hop
  and the final save + ack script.
- ``wake``: the ack reply is in -> ``add_task`` returns in the producer. The waiter is woken by
  the settle script itself, so this overlaps the settle reply's way back to the worker; a
  negative median means the producer had the result before the worker had its ack reply.

Hooks cost a few microseconds each; the stamps are kept in memory and collected at the end.
Also printed: CPU per round trip of each process, and Redis server time per script call
(``INFO commandstats``: the whole server's, so run it with nothing else using Redis).

``--timeline`` also stamps every write to Redis (before and after the ``send``, labelled by
command or script) and every read from it, in both processes, through the fast lane's
internals (so it measures the lane, not redis-py), and prints the median time of each event
from the ``add_task`` call, over the round trips whose events came in the most common order,
then the budget those events split the round trip into: the producer's own work, the
``send`` calls, the way through Redis to the other process (the server's work and the
wake-up of the process it answers), the worker's work from reading the claim to the settle
write, and the producer's from reading the result to returning. The stamps add a few
microseconds to each event.
Run: ``uv run python bench/round_trip.py [--n 500] [--timeline]``.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import redis

from qtasks import AsyncQueueTasks, QueueConfig, hookimpl
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

URL = os.environ.get("QTASKS_BENCH_REDIS", "redis://127.0.0.1:6379/0")

WORKER = """
import json, sys, time
from qtasks import AsyncQueueTasks, QueueConfig, hookimpl
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
url, prefix, out = sys.argv[1], sys.argv[2], sys.argv[3]
stamps = {}
EVENTS = []
if len(sys.argv) > 4:
    exec(sys.argv[4])  # TIMELINE

class Stamps:
    @hookimpl
    def qtasks_broker_message_received(self, app, delivery):
        stamps.setdefault(delivery.id, {})["received"] = time.monotonic_ns()

    @hookimpl
    def qtasks_broker_acked(self, app, record):
        stamps.setdefault(record.uuid, {})["acked"] = time.monotonic_ns()

app = AsyncQueueTasks(
    broker=RedisBroker(url, prefix=prefix, queue="bench"),
    storage=RedisStorage(url, prefix=prefix),
    global_config=RedisGlobalConfig(url, prefix=prefix),
    config=QueueConfig(max_tasks_process=10, log_level="WARNING", plugins_disabled=["*"]),
)
app.add_plugin(Stamps())

@app.task(name="echo", echo=True)
async def echo(self, x: int) -> int:
    mine = stamps.setdefault(self.ctx.task_uuid, {})
    mine["start"] = time.monotonic_ns()
    mine["end"] = time.monotonic_ns()
    return x

@app.task(name="dump")
async def dump() -> None:
    with open(out, "w") as fh:
        json.dump({"stamps": stamps, "events": EVENTS}, fh)

app.run_forever()
"""

TIMELINE = """
import time as _time
from qtasks_redis import broker_lua, lane, shared_lua, storage_lua, workflow_lua
from qtasks_redis.connection import Script

EVENTS = []
_SCRIPTS = {
    value.sha.encode(): name.lower()
    for module in (broker_lua, shared_lua, storage_lua, workflow_lua)
    for name, value in vars(module).items()
    if isinstance(value, Script)
}

def _label(data):
    parts = bytes(data[:120]).split(b"\\r\\n")
    command = parts[2].decode().lower() if len(parts) > 2 else "?"
    if command == "evalsha" and len(parts) > 4:
        return _SCRIPTS.get(parts[4], "script")
    return command

_made = lane._Conn.connection_made
def _connection_made(self, transport):
    write = transport.write
    def stamped(data):
        label = self.last_written = _label(data)
        EVENTS.append((_time.monotonic_ns(), "write " + label))
        write(data)
        EVENTS.append((_time.monotonic_ns(), "written " + label))
    transport.write = stamped
    _made(self, transport)
lane._Conn.connection_made = _connection_made

_received = lane._Conn.data_received
def _data_received(self, data):
    # Labelled by the last command written on this connection (a blocking one's: its own).
    EVENTS.append((_time.monotonic_ns(), "read " + getattr(self, "last_written", "?")))
    _received(self, data)
lane._Conn.data_received = _data_received
"""

STAGES = ("enqueue", "pickup", "begin", "run", "settle", "wake")


class Enqueued:
    def __init__(self, stamps: dict[str, dict[str, int]]) -> None:
        self.stamps = stamps

    @hookimpl
    def qtasks_task_enqueued(self, app: Any, record: Any) -> None:
        self.stamps.setdefault(record.uuid, {})["enqueued"] = time.monotonic_ns()


def script_usec(client: redis.Redis) -> dict[str, tuple[int, int]]:
    stats = client.info("commandstats")
    return {
        name: (int(v["calls"]), int(v["usec"]))
        for name, v in stats.items()
        if name in ("cmdstat_evalsha", "cmdstat_blpop", "cmdstat_blmove")
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(n: int, timeline: bool) -> None:
    prefix = f"rt-{uuid.uuid4().hex[:8]}"
    out = Path(tempfile.mkdtemp()) / "stamps.json"
    command = [sys.executable, "-c", WORKER, URL, prefix, str(out)]
    events: list[tuple[int, str]] = []
    if timeline:
        command.append(TIMELINE)
        scope: dict[str, Any] = {}
        exec(TIMELINE, scope)
        events = scope["EVENTS"]
    worker = subprocess.Popen(command)  # noqa: ASYNC220 - started once, before measuring
    stamps: dict[str, dict[str, int]] = {}
    app = AsyncQueueTasks(
        broker=RedisBroker(URL, prefix=prefix, queue="bench"),
        storage=RedisStorage(URL, prefix=prefix),
        global_config=RedisGlobalConfig(URL, prefix=prefix),
        config=QueueConfig(plugins_disabled=["*"]),
    )
    app.add_plugin(Enqueued(stamps))
    client = redis.Redis.from_url(URL)
    await app.start()  # the components only: this process does not serve tasks
    try:
        for i in range(20):  # warm-up: the worker is up, scripts loaded, connections made
            await app.add_task("echo", i, timeout=30)
        stamps.clear()
        events.clear()
        before = script_usec(client)
        cpu_before = (time.process_time(), cpu_seconds(worker.pid))
        for i in range(n):
            called = time.monotonic_ns()
            task = await app.add_task("echo", i, timeout=5)
            returned = time.monotonic_ns()
            assert task.returning == i, (task.status, task.error)
            stamps[task.uuid].update(called=called, returned=returned)
        cpu_after = (time.process_time(), cpu_seconds(worker.pid))
        after = script_usec(client)
        produced = list(events)
        await app.add_task("dump", timeout=5)
        dumped = json.loads(out.read_text())
        remote = dumped["stamps"]
    finally:
        await app.aclose()
        worker.terminate()
        worker.wait(10)
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    per_stage: dict[str, list[float]] = {stage: [] for stage in STAGES}
    totals: list[float] = []
    for uid, mine in stamps.items():
        if "called" not in mine:
            continue  # the final "dump" task
        s = {**mine, **remote[uid]}
        edges = ["called", "enqueued", "received", "start", "end", "acked", "returned"]
        for stage, (a, b) in zip(STAGES, itertools.pairwise(edges), strict=True):
            per_stage[stage].append((s[b] - s[a]) / 1e6)
        totals.append((s["returned"] - s["called"]) / 1e6)
    print(f"round trips: {n}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'stage':8} {'p50 ms':>8} {'mean ms':>8}")
    for stage in STAGES:
        values = per_stage[stage]
        print(f"{stage:8} {statistics.median(values):8.3f} {statistics.fmean(values):8.3f}")
    print(f"{'total':8} {statistics.median(totals):8.3f} {statistics.fmean(totals):8.3f}")
    producer_us = (cpu_after[0] - cpu_before[0]) / n * 1e6
    worker_us = (cpu_after[1] - cpu_before[1]) / n * 1e6
    print(f"CPU per round trip: producer {producer_us:.0f} us, worker {worker_us:.0f} us")
    if timeline:
        merged = {uid: {**mine, **remote.get(uid, {})} for uid, mine in stamps.items()}
        print_timeline(merged, produced, dumped["events"])
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0, 0))
        if calls > calls0:
            per_call = (usec - usec0) / (calls - calls0)
            per_trip = (calls - calls0) / n
            print(f"redis {name[8:]}: {per_trip:.2f} calls per round trip, {per_call:.1f} us each")


def print_timeline(
    stamps: dict[str, dict[str, int]],
    producer: list[tuple[int, str]],
    worker: list[tuple[int, str]],
) -> None:
    """The budget of a round trip from the write and read stamps (see the module docstring):
    per round trip, each step's time between two events, then the median of each step."""
    trips = sorted(
        (s["called"], s["returned"], s["start"], s["end"])
        for s in stamps.values()
        if "called" in s and "start" in s
    )
    starts = [t[0] for t in trips]
    cycles: list[list[tuple[int, str]]] = [[] for _ in trips]
    for at, name in [(t, "P " + e) for t, e in producer] + [(t, "W " + e) for t, e in worker]:
        i = bisect.bisect_right(starts, at) - 1
        if i >= 0 and at <= trips[i][1]:
            cycles[i].append((at, name))

    for cycle in cycles:
        cycle.sort()  # once: producer and worker events were appended apart

    def first(cycle: list[tuple[int, str]], name: str, after: int) -> int | None:
        return next((at for at, n in cycle if n == name and at >= after), None)

    steps: dict[str, list[float]] = {}
    labels = [
        "producer: add_task called -> its write starts (prepare, encode, pack)",
        "producer: the send call (the kernel's loopback work, often the wake-up of Redis)",
        "Redis and the worker's wake-up: the write starts -> the worker reads the claim",
        "worker: the claim read -> the task starts (parse, decode, begin, hand-over)",
        "worker: the task ends -> its settle write starts (hand-over, encode, pack)",
        "Redis and the producer's wake-up: the settle write starts -> the result is read",
        "producer: the result read -> add_task returns (parse, decode)",
    ]
    for (called, returned, start, end), cycle in zip(trips, cycles, strict=True):
        publish = first(cycle, "P write publish_new", called)
        published = first(cycle, "P written publish_new", called)
        claimed = None if publish is None else first(cycle, "W read blpop", publish)
        settle = first(cycle, "W write ack_finals", end)
        reads = [at for at, n in cycle if n == "P read blmove" and settle is not None]
        if None in (publish, published, claimed, settle) or not reads:
            continue
        assert publish is not None and published is not None and claimed is not None
        assert settle is not None
        result = reads[-1]
        for label, ns in zip(
            labels,
            (
                publish - called,
                published - publish,
                claimed - publish,
                start - claimed,
                settle - end,
                result - settle,
                returned - result,
            ),
            strict=True,
        ):
            steps.setdefault(label, []).append(ns / 1000)
    counted = len(next(iter(steps.values()), []))
    print(f"budget: median us of each step over {counted} of {len(trips)} round trips")
    for label in labels:
        print(f"  {statistics.median(steps[label]):7.1f}  {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--timeline", action="store_true", help="stamp every Redis write/read")
    options = parser.parse_args()
    anyio.run(measure, options.n, options.timeline)


if __name__ == "__main__":
    main()
