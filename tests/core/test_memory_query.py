"""MemoryStorage's StorageQuery with a million records: pages stay right deep down the
listing, and a filter no index serves looks at a bounded number of entries per call (how fast
is measured by bench/query_pages.py, not here)."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace

import anyio
import pytest

from qtasks.components import SCAN_BUDGET, RecordQuery
from qtasks.config import QueueConfig
from qtasks.memory import MemoryStorage
from qtasks.memory import storage as memory_storage
from qtasks.record import TaskRecord, TaskStatus

pytestmark = pytest.mark.anyio
N = 1_000_000


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def million() -> AsyncIterator[MemoryStorage]:
    """A started storage holding N records (uuid ``{i:08d}``, every 10th one final, odd ones
    named ``odd``), added in uuid order."""
    async with AsyncExitStack() as stack:
        storage = MemoryStorage()
        await storage.start(stack, QueueConfig())
        for i in range(N):
            status = TaskStatus.SUCCESS if i % 10 == 0 else TaskStatus.NEW
            name = "odd" if i % 2 else "even"
            await storage.add(TaskRecord(uuid=f"{i:08d}", task_name=name, status=status))
        yield storage


async def test_first_and_deep_pages(million: MemoryStorage) -> None:
    page = await million.query(RecordQuery(limit=100))
    assert [r.uuid for r in page.records] == [f"{i:08d}" for i in range(N - 1, N - 101, -1)]
    seen = 100
    for _ in range(50):  # fifty pages further down
        assert page.cursor is not None
        page = await million.query(RecordQuery(limit=100, cursor=page.cursor))
        seen += 100
    assert page.records[-1].uuid == f"{N - seen:08d}"


async def test_indexed_filters_on_a_million(million: MemoryStorage) -> None:
    odd = await million.query(RecordQuery(task_name="odd", limit=3))
    assert [r.uuid for r in odd.records] == [f"{N - 1:08d}", f"{N - 3:08d}", f"{N - 5:08d}"]
    done = await million.query(RecordQuery(status=TaskStatus.SUCCESS, limit=2))
    assert [r.uuid for r in done.records] == [f"{N - 10:08d}", f"{N - 20:08d}"]
    both = await million.query(RecordQuery(task_name="even", status=TaskStatus.SUCCESS, limit=2))
    assert [r.uuid for r in both.records] == [f"{N - 10:08d}", f"{N - 20:08d}"]


async def test_an_unindexed_filter_scans_a_bounded_slice(
    million: MemoryStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The oldest records match a uuid prefix: with no time to search on, one call does not
    walk a million entries; it returns what it found so far with a cursor."""
    monkeypatch.setattr(memory_storage, "SCAN_BUDGET", 0.0)
    first = await million.query(RecordQuery(uuid_prefix="0000000"))
    assert first.records == []
    assert first.cursor is not None
    pages = 1
    query = RecordQuery(uuid_prefix="0000000", cursor=first.cursor)
    while True:
        page = await million.query(query)
        pages += 1
        if page.records or page.cursor is None:
            break
        query = RecordQuery(uuid_prefix="0000000", cursor=page.cursor)
    assert [r.uuid for r in page.records] == [f"{i:08d}" for i in range(9, -1, -1)]
    assert pages >= N // 10_000


async def test_a_scan_budget_of_zero_looks_at_one_step(million: MemoryStorage) -> None:
    """``scan_budget=0`` (a live refresh's query) ends after the first step of the scan,
    found or not; its cursor carries on, and a step that finds a record gives the page the
    default budget gives."""
    started = time.monotonic()
    first = await million.query(RecordQuery(uuid_prefix="0000000", scan_budget=0))
    assert time.monotonic() - started < SCAN_BUDGET
    assert first.records == []
    assert first.cursor is not None
    second = await million.query(
        RecordQuery(uuid_prefix="0000000", scan_budget=0, cursor=first.cursor)
    )
    assert second.records == []
    assert second.cursor is not None and second.cursor != first.cursor
    near = RecordQuery(uuid_prefix=f"{N - 1_000:08d}"[:5])  # 1,000 records at the top
    assert await million.query(replace(near, scan_budget=0)) == await million.query(near)


async def test_a_uuid_under_a_million_newer_records_is_found_on_the_first_page(
    million: MemoryStorage,
) -> None:
    """A whole uuid is looked up; a prefix is scanned for until something matches or
    SCAN_BUDGET ran out, never a page that is empty after a few thousand entries."""
    whole = await million.query(RecordQuery(uuid_prefix="00000000"))
    assert [r.uuid for r in whole.records] == ["00000000"]
    started = time.monotonic()
    page = await million.query(RecordQuery(uuid_prefix="0000000", limit=3))
    if not page.records:  # the budget ran out before the oldest entries: a cursor says so
        assert page.cursor is not None
        assert time.monotonic() - started >= SCAN_BUDGET
    listed = [r.uuid for r in page.records]
    while page.cursor is not None:
        page = await million.query(RecordQuery(uuid_prefix="0000000", cursor=page.cursor))
        listed += [r.uuid for r in page.records]
    assert listed == [f"{i:08d}" for i in range(9, -1, -1)]


async def test_rewrites_do_not_grow_the_indexes_without_bound() -> None:
    async with AsyncExitStack() as stack:
        storage = MemoryStorage()
        await storage.start(stack, QueueConfig())
        records = [TaskRecord(uuid=f"r{i}", task_name="t") for i in range(100)]
        for _ in range(200):  # 20,000 writes of 100 records
            for rec in records:
                rec.status = TaskStatus.RETRY if rec.status is TaskStatus.NEW else TaskStatus.NEW
                await storage.save(rec)
        assert len(storage._all) <= 2 * len(records) + 4096
        listed = await storage.query(RecordQuery(limit=500))
        assert sorted(r.uuid for r in listed.records) == sorted(r.uuid for r in records)


async def test_a_record_begun_on_claim_is_listed_as_running() -> None:
    """The in-memory broker begins records when a worker claims them (BeginOnClaim): the
    listing follows that move too."""
    from qtasks import AsyncQueueTasks

    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    started = anyio.Event()

    @app.task
    async def hold() -> None:
        started.set()
        await anyio.sleep_forever()

    async with app:
        task = await app.add_task("hold")
        with anyio.fail_after(5):
            await started.wait()
        storage = app.storage
        assert isinstance(storage, MemoryStorage)
        running = await storage.query(RecordQuery(status=TaskStatus.PROCESS))
        assert [r.uuid for r in running.records] == [task.uuid]
        assert (await storage.query(RecordQuery(status=TaskStatus.NEW))).records == []
        assert await storage.count(TaskStatus.PROCESS) == 1
        await app.cancel(task.uuid)


async def test_counts_match_a_walk_through_rewrites_expiry_and_rebuilds() -> None:
    """count() keeps live totals per status (a Fenwick tree) instead of walking the range:
    after random adds, status changes, expiries and the amortised rebuilds, every count over
    every range equals a count of the records themselves."""
    now = [1000.0]
    rng = random.Random(7)
    statuses = [TaskStatus.NEW, TaskStatus.PROCESS, TaskStatus.SUCCESS, TaskStatus.ERROR]
    async with AsyncExitStack() as stack:
        storage = MemoryStorage(clock=lambda: now[0])
        await storage.start(stack, QueueConfig(result_ttl=50.0))
        written: dict[str, float] = {}  # uuid -> the time of its latest write
        rebuilds: list[int] = []
        rebuild = storage._rebuild

        def counted() -> None:
            rebuilds.append(1)
            rebuild()

        storage._rebuild = counted  # type: ignore[method-assign]  # counted, still rebuilt
        # Enough writes for several rebuilds (past 4,096 + 2 x live entries; a query logs one
        # entry per record written since the previous one).
        for step in range(30_000):
            now[0] += 0.01
            uuid = f"r{rng.randrange(3000)}"
            record = TaskRecord(uuid=uuid, task_name="t", status=rng.choice(statuses))
            record.updated_at = now[0]
            if record.status.final:  # saved: expires result_ttl after this write
                if not await storage.save(record):
                    continue  # refused (final is final): nothing written
            else:
                await storage.add(record)
            written[uuid] = now[0]
            if step % 1500 == 0:
                for status in statuses:
                    lo, hi = now[0] - rng.uniform(1, 120), now[0] - rng.uniform(0, 1)
                    for since, until in ((None, None), (lo, None), (None, hi), (lo, hi)):
                        counted_here = await storage.count(status, since, until)  # expires
                        records = [
                            r
                            for r in storage._records.values()
                            if r.status is status
                            and (since is None or written[r.uuid] >= since)
                            and (until is None or written[r.uuid] < until)
                        ]
                        assert counted_here == len(records)
        assert rebuilds
