"""How long one page of the task listing takes with 1,000,000 stored records (StorageQuery).

For the in-memory storage and the Redis storage (``QTASKS_BENCH_REDIS``, default
``redis://127.0.0.1:6379/0``, under a fresh key prefix deleted afterwards): N records are
stored (uuid ``{i:08d}``, every 10th one final, two task names), then each listing below is
timed (median of 20 calls, one page of 50):

- first page, no filter (what the dashboard's Tasks page opens with);
- page 200 (cursor followed 199 times first);
- status filter ``success``; task name filter; name and status;
- a uuid prefix matching nothing (a bounded scan: one call, then its cursor is not followed).

Run: ``uv run python bench/query_pages.py [--n 1000000] [--only memory,redis]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from contextlib import AsyncExitStack

import anyio

from qtasks.components import RecordQuery, Storage, StorageQuery
from qtasks.config import QueueConfig
from qtasks.memory import MemoryStorage
from qtasks.record import TaskRecord, TaskStatus
from qtasks_redis import RedisStorage

URL = os.environ.get("QTASKS_BENCH_REDIS", "redis://127.0.0.1:6379/0")


def records(n: int) -> list[TaskRecord]:
    out = []
    for i in range(n):
        status = TaskStatus.SUCCESS if i % 10 == 0 else TaskStatus.NEW
        out.append(TaskRecord(uuid=f"{i:08d}", task_name=f"task{i % 2}", status=status))
    return out


async def fill(storage: Storage, n: int) -> float:
    started = time.perf_counter()
    batch = records(n)
    for start in range(0, n, 2000):
        async with anyio.create_task_group() as tg:
            for rec in batch[start : start + 2000]:
                tg.start_soon(storage.add, rec)
    return time.perf_counter() - started


async def timed(storage: StorageQuery, query: RecordQuery, calls: int = 20) -> tuple[float, int]:
    spent = []
    count = 0
    for _ in range(calls):
        started = time.perf_counter()
        page = await storage.query(query)
        spent.append(time.perf_counter() - started)
        count = len(page.records)
    return statistics.median(spent) * 1000, count


async def measure(name: str, storage: Storage, n: int) -> None:
    assert isinstance(storage, StorageQuery)
    print(f"{name}: storing {n:,} records ...", flush=True)
    print(f"{name}: stored in {await fill(storage, n):.1f} s", flush=True)
    cursor = None
    for _ in range(199):
        cursor = (await storage.query(RecordQuery(cursor=cursor))).cursor
    cases = {
        "first page": RecordQuery(),
        "page 200": RecordQuery(cursor=cursor),
        "status=success": RecordQuery(status=TaskStatus.SUCCESS),
        "task name": RecordQuery(task_name="task1"),
        "task name + status": RecordQuery(task_name="task0", status=TaskStatus.SUCCESS),
        "uuid prefix, no match (scans SCAN_BUDGET)": RecordQuery(uuid_prefix="zz"),
    }
    for label, query in cases.items():
        ms, count = await timed(storage, query)
        print(f"{name}: {label:38s} {ms:8.2f} ms  ({count} records)", flush=True)


async def main(opts: argparse.Namespace) -> None:
    only = set(opts.only.split(","))
    config = QueueConfig(result_ttl=86400.0)
    if "memory" in only:
        async with AsyncExitStack() as stack:
            memory = MemoryStorage()
            await memory.start(stack, config)
            await measure("memory", memory, opts.n)
    if "redis" in only:
        async with AsyncExitStack() as stack:
            redis = RedisStorage(URL, prefix=f"bench-query-{uuid.uuid4().hex[:8]}")
            await redis.start(stack, config)
            try:
                await measure("redis", redis, opts.n)
            finally:
                await redis.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--only", default="memory,redis")
    anyio.run(main, parser.parse_args())
