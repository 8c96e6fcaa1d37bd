"""The contract suite of :class:`qtasks.components.StorageQuery`: :class:`StorageQueryContract`."""

from __future__ import annotations

import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import cast

import anyio
import pytest

from qtasks.components import MAX_PAGE, RecordPage, RecordQuery, Storage, StorageQuery
from qtasks.config import QueueConfig
from qtasks.errors import InvalidQueryError
from qtasks.record import TaskRecord, TaskStatus
from qtasks_testing.contract._base import wait_until
from qtasks_testing.contract.capabilities import _StorageCapability
from qtasks_testing.contract.storage import StorageFactory, finished, record

TICK = 0.005
"""Seconds between writes that must get distinct index times (a backend may count in ms)."""


async def everything(storage: StorageQuery, query: RecordQuery) -> list[TaskRecord]:
    """Every record ``query`` matches, following cursors to the end (at most 1,000 pages)."""
    out: list[TaskRecord] = []
    for _ in range(1000):
        page = await storage.query(query)
        out += page.records
        if page.cursor is None:
            return out
        query = replace(query, cursor=page.cursor)
    pytest.fail("the cursors did not come to an end after 1,000 pages")


class StorageQueryContract(_StorageCapability):
    """The guarantees of :class:`qtasks.components.StorageQuery`, as tests.

    Provide a ``storage_factory`` fixture, as for
    :class:`~qtasks_testing.contract.StorageContract`. Every test is skipped when the storage
    is not a ``StorageQuery``."""

    capability = StorageQuery

    @staticmethod
    async def spaced(storage: Storage, records: list[TaskRecord]) -> None:
        """Add ``records`` in order, each with an index time after the previous one's."""
        for rec in records:
            await storage.add(rec)
            await anyio.sleep(TICK)

    @pytest.mark.anyio
    async def test_lists_every_record_newest_first(self, storage: Storage) -> None:
        records = [record() for _ in range(5)]
        await self.spaced(storage, records)
        page = await cast(StorageQuery, storage).query(RecordQuery())
        assert [r.uuid for r in page.records] == [r.uuid for r in reversed(records)]
        assert page.records == list(reversed(records))
        assert page.cursor is None

    @pytest.mark.anyio
    async def test_cursors_walk_every_record_once(self, storage: Storage) -> None:
        records = [record() for _ in range(23)]
        for rec in records:  # no spacing: ties in index time must not lose or repeat records
            await storage.add(rec)
        query = cast(StorageQuery, storage)
        first = await query.query(RecordQuery(limit=10))
        assert len(first.records) == 10
        assert first.cursor is not None
        listed = await everything(query, RecordQuery(limit=10))
        assert sorted(r.uuid for r in listed) == sorted(r.uuid for r in records)

    @pytest.mark.anyio
    async def test_a_status_change_moves_the_record_to_the_front(self, storage: Storage) -> None:
        old, new = record(), record()
        await self.spaced(storage, [old, new])
        assert await storage.save(finished(old, TaskStatus.ERROR, error="boom")) is True
        page = await cast(StorageQuery, storage).query(RecordQuery())
        assert [r.uuid for r in page.records] == [old.uuid, new.uuid]
        assert page.records[0].status is TaskStatus.ERROR
        assert page.records[0].error == "boom"

    @pytest.mark.anyio
    async def test_filters_by_status(self, storage: Storage) -> None:
        ok, failed, queued, running = record(), record(), record(), record()
        await self.spaced(storage, [ok, failed, queued, running])
        await storage.save(finished(ok))
        await storage.save(finished(failed, TaskStatus.ERROR))
        claim = running.copy()
        claim.status, claim.attempt, claim.token = TaskStatus.PROCESS, 1, "t1"
        await storage.begin(claim)
        await storage.cancel(queued.uuid, "not wanted")
        query = cast(StorageQuery, storage)
        by_status = {
            status: [r.uuid for r in (await query.query(RecordQuery(status=status))).records]
            for status in TaskStatus
        }
        assert by_status[TaskStatus.SUCCESS] == [ok.uuid]
        assert by_status[TaskStatus.ERROR] == [failed.uuid]
        assert by_status[TaskStatus.CANCEL] == [queued.uuid]
        assert by_status[TaskStatus.PROCESS] == [running.uuid]
        assert by_status[TaskStatus.NEW] == []
        assert by_status[TaskStatus.RETRY] == []

    @pytest.mark.anyio
    async def test_filters_by_task_name_with_and_without_status(self, storage: Storage) -> None:
        a1, b1, a2, a3 = (record(task_name=name) for name in ("a", "b", "a", "a"))
        await self.spaced(storage, [a1, b1, a2, a3])
        await storage.save(finished(a2))
        await anyio.sleep(TICK)
        await storage.cancel(a3.uuid, "changed my mind")
        query = cast(StorageQuery, storage)
        names = await query.query(RecordQuery(task_name="a"))
        assert [r.uuid for r in names.records] == [a3.uuid, a2.uuid, a1.uuid]
        done = await query.query(RecordQuery(task_name="a", status=TaskStatus.SUCCESS))
        assert [r.uuid for r in done.records] == [a2.uuid]
        new = await query.query(RecordQuery(task_name="a", status=TaskStatus.NEW))
        assert [r.uuid for r in new.records] == [a1.uuid]
        assert (await query.query(RecordQuery(task_name="b"))).records == [b1]
        assert (await query.query(RecordQuery(task_name="nobody"))).records == []

    @pytest.mark.anyio
    async def test_filters_by_parent(self, storage: Storage) -> None:
        parent, other = record(task_name="parent"), record(task_name="parent")
        kids = [record(task_name="kid", parent_uuid=parent.uuid) for _ in range(7)]
        stranger = record(task_name="kid", parent_uuid=other.uuid)
        await self.spaced(storage, [parent, other, kids[0], stranger, *kids[1:]])
        await storage.save(finished(kids[2]))
        await anyio.sleep(TICK)
        await storage.cancel(kids[4].uuid, "not wanted")
        query = cast(StorageQuery, storage)
        listed = await everything(query, RecordQuery(parent_uuid=parent.uuid, limit=3))
        newest_first = [
            kids[4],
            kids[2],
            *reversed([k for k in kids if k not in (kids[2], kids[4])]),
        ]
        assert [r.uuid for r in listed] == [k.uuid for k in newest_first]
        assert all(r.parent_uuid == parent.uuid for r in listed)
        done = await query.query(RecordQuery(parent_uuid=parent.uuid, status=TaskStatus.SUCCESS))
        assert [r.uuid for r in done.records] == [kids[2].uuid]
        assert [
            r.uuid for r in (await query.query(RecordQuery(parent_uuid=other.uuid))).records
        ] == [stranger.uuid]
        assert (await query.query(RecordQuery(parent_uuid=kids[0].uuid))).records == []
        with pytest.raises(InvalidQueryError):
            await query.query(RecordQuery(parent_uuid=""))

    @pytest.mark.anyio
    async def test_filters_by_time_range(self, storage: Storage) -> None:
        early, late = record(), record()
        await storage.add(early)
        await anyio.sleep(0.02)
        middle = time.time()
        await anyio.sleep(0.02)
        await storage.add(late)
        query = cast(StorageQuery, storage)
        since = await query.query(RecordQuery(since=middle))
        assert [r.uuid for r in since.records] == [late.uuid]
        until = await query.query(RecordQuery(until=middle))
        assert [r.uuid for r in until.records] == [early.uuid]
        both = await query.query(RecordQuery(since=middle - 10, until=middle + 10))
        assert [r.uuid for r in both.records] == [late.uuid, early.uuid]
        assert (await query.query(RecordQuery(since=time.time() + 60))).records == []

    @pytest.mark.anyio
    async def test_filters_by_uuid_prefix(self, storage: Storage) -> None:
        mine = [record(uuid=f"cafe{uuid.uuid4().hex[4:]}") for _ in range(3)]
        others = [record(uuid=f"beef{uuid.uuid4().hex[4:]}") for _ in range(4)]
        await self.spaced(storage, [*mine, *others])
        found = await everything(
            cast(StorageQuery, storage), RecordQuery(uuid_prefix="cafe", limit=2)
        )
        assert [r.uuid for r in found] == [r.uuid for r in reversed(mine)]
        exact = await cast(StorageQuery, storage).query(RecordQuery(uuid_prefix=others[0].uuid))
        assert exact.records == [others[0]]

    @pytest.mark.anyio
    async def test_a_scan_budget_of_zero_gives_the_same_pages_when_its_step_finds(
        self, storage: Storage
    ) -> None:
        """``scan_budget=0`` ends a scan after its first step, where a scan that found
        something ends anyway: among a few records, its pages are the default's."""
        mine = [record(uuid=f"cafe{uuid.uuid4().hex[4:]}") for _ in range(3)]
        await self.spaced(storage, [mine[0], record(), mine[1], record(), mine[2]])
        query = cast(StorageQuery, storage)
        for asked in (
            RecordQuery(uuid_prefix="cafe", limit=2),
            RecordQuery(uuid_prefix="beef"),
            RecordQuery(uuid_prefix=mine[0].uuid),
            RecordQuery(task_name="contract_task", status=TaskStatus.NEW, limit=2),
        ):
            default = await everything(query, asked)
            assert await everything(query, replace(asked, scan_budget=0)) == default, asked
            first = await query.query(asked)
            assert await query.query(replace(asked, scan_budget=0.0)) == first, asked

    @pytest.mark.anyio
    async def test_a_whole_uuid_is_looked_up_first(self, storage: Storage) -> None:
        """The record whose uuid is the whole prefix comes first on the first page, before
        newer records whose uuids extend it, and on no later page."""
        whole = record(uuid=uuid.uuid4().hex)
        longer = [record(uuid=f"{whole.uuid}-{i}") for i in range(3)]
        other = record()
        await self.spaced(storage, [whole, *longer, other])
        query = cast(StorageQuery, storage)
        first = await query.query(RecordQuery(uuid_prefix=whole.uuid, limit=1))
        assert [r.uuid for r in first.records] == [whole.uuid]
        assert first.records == [whole]
        listed = await everything(query, RecordQuery(uuid_prefix=whole.uuid, limit=1))
        assert [r.uuid for r in listed] == [whole.uuid, *(r.uuid for r in reversed(longer))]
        listed = await everything(query, RecordQuery(uuid_prefix=whole.uuid, limit=2))
        assert [r.uuid for r in listed] == [whole.uuid, *(r.uuid for r in reversed(longer))]
        await storage.save(finished(whole))
        for query_of_other_records in (
            RecordQuery(uuid_prefix=whole.uuid, status=TaskStatus.NEW),
            RecordQuery(uuid_prefix=whole.uuid, task_name="nobody"),
            RecordQuery(uuid_prefix=whole.uuid, until=time.time() - 60),
            RecordQuery(uuid_prefix=whole.uuid, since=time.time() + 60),
            RecordQuery(uuid_prefix=whole.uuid, parent_uuid=other.uuid),
        ):
            page = await query.query(query_of_other_records)
            assert whole.uuid not in [r.uuid for r in page.records], query_of_other_records
        done = await query.query(RecordQuery(uuid_prefix=whole.uuid, status=TaskStatus.SUCCESS))
        assert [r.uuid for r in done.records] == [whole.uuid]
        assert done.records[0].status is TaskStatus.SUCCESS

    @pytest.mark.anyio
    async def test_expired_records_are_not_listed(
        self, storage_factory: StorageFactory, contract_config: QueueConfig
    ) -> None:
        config = contract_config.merged(result_ttl=0.5)
        storage = storage_factory(config)
        assert isinstance(storage, StorageQuery)
        async with AsyncExitStack() as stack:
            await storage.start(stack, config)
            pending, done = record(task_name="ttl"), record(task_name="ttl")
            await self.spaced(storage, [pending, done])
            await storage.save(finished(done))
            listed = await storage.query(RecordQuery(task_name="ttl"))
            assert [r.uuid for r in listed.records] == [done.uuid, pending.uuid]

            async def expired() -> bool:
                every = await everything(storage, RecordQuery())
                return [r.uuid for r in every] == [pending.uuid]

            await wait_until(expired, timeout=2.0, what="the final record to leave the listing")
            for query in (
                RecordQuery(task_name="ttl"),
                RecordQuery(status=TaskStatus.SUCCESS),
                RecordQuery(uuid_prefix=done.uuid),
            ):
                assert done.uuid not in [r.uuid for r in await everything(storage, query)]

    @pytest.mark.anyio
    async def test_bad_queries_raise_invalid_query_error(self, storage: Storage) -> None:
        await storage.add(record())
        query = cast(StorageQuery, storage)
        for bad in (
            RecordQuery(limit=0),
            RecordQuery(limit=MAX_PAGE + 1),
            RecordQuery(limit=10**9),
            RecordQuery(cursor="not a cursor"),
            RecordQuery(cursor=""),
            # Cursors of the built-in formats ("m:<seq>", "r:<score>:<uuid>") whose digits are
            # not ASCII: str.isdigit() and float() accept some of them.
            RecordQuery(cursor="m:\u00b2"),
            RecordQuery(cursor="m:\u0663"),
            RecordQuery(cursor="r:\u0663:abc"),
            RecordQuery(cursor="r:inf:abc"),
            RecordQuery(cursor="r:1_0:abc"),
            # Too long: int() refuses over 4,300 digits (ValueError); float() reads inf.
            RecordQuery(cursor="m:" + "9" * 4301),
            RecordQuery(cursor="r:" + "9" * 4301 + ":abc"),
            RecordQuery(since=10.0, until=5.0),
            RecordQuery(since=float("nan")),
            RecordQuery(scan_budget=-1.0),
            RecordQuery(scan_budget=float("inf")),
            RecordQuery(scan_budget=float("nan")),
        ):
            with pytest.raises(InvalidQueryError):
                await query.query(bad)
        page = await query.query(RecordQuery(limit=MAX_PAGE))
        assert isinstance(page, RecordPage)
        assert len(page.records) == 1

    @pytest.mark.anyio
    async def test_count_by_status_and_time(self, storage: Storage) -> None:
        query = cast(StorageQuery, storage)
        first, second, third = record(), record(), record()
        await self.spaced(storage, [first, second, third])
        await storage.save(finished(first))
        await anyio.sleep(0.02)
        middle = time.time()
        await anyio.sleep(0.02)
        await storage.save(finished(second))
        await storage.save(finished(third, TaskStatus.ERROR))
        assert await query.count(TaskStatus.SUCCESS) == 2
        assert await query.count(TaskStatus.SUCCESS, since=middle) == 1
        assert await query.count(TaskStatus.SUCCESS, until=middle) == 1
        assert await query.count(TaskStatus.SUCCESS, since=middle, until=middle + 60) == 1
        assert await query.count(TaskStatus.ERROR, since=middle) == 1
        assert await query.count(TaskStatus.NEW) == 0
        assert await query.count(TaskStatus.SUCCESS, since=time.time() + 60) == 0
