"""MemoryStorage keeps final records packed: out of the cycle collector's way, read back whole."""

from __future__ import annotations

import gc
from contextlib import AsyncExitStack

import pytest

from qtasks.config import QueueConfig
from qtasks.memory import MemoryStorage
from qtasks.record import TaskRecord, TaskStatus

pytestmark = pytest.mark.anyio


def every_field_set() -> TaskRecord:
    return TaskRecord(
        uuid="u1",
        task_name="t",
        status=TaskStatus.ERROR,
        priority=3,
        args=[1, "a", [2]],
        kwargs={"k": {"n": 1}, "s": "v"},
        returning={"r": [1]},
        traceback="tb",
        error="boom",
        created_at=1.0,
        updated_at=2.0,
        attempt=4,
        retries=5,
        eta=6.0,
        parent_uuid="p",
        cancel_reason="why",
        worker="w",
        token="tok",
        steps=7,
        started_at=8.0,
        workflow="wf",
    )


def test_a_packed_record_is_rebuilt_field_for_field() -> None:
    record = every_field_set()
    rebuilt = TaskRecord.unpacked(record.packed())
    assert rebuilt == record
    assert rebuilt.args is not record.args and rebuilt.kwargs is not record.kwargs


async def test_stored_final_records_are_not_tracked_by_the_cycle_collector() -> None:
    """2,000 stored results of atomic arguments add next to no object the collector walks
    (kept as TaskRecord objects they would add two each: the record and its args list)."""
    async with AsyncExitStack() as stack:
        storage = MemoryStorage()
        await storage.start(stack, QueueConfig())
        gc.collect()
        before = len(gc.get_objects())
        for i in range(2000):
            record = TaskRecord(uuid=f"r{i}", task_name="t", args=[i], kwargs={"x": i})
            await storage.add(record)
            record.status, record.returning = TaskStatus.SUCCESS, i
            assert await storage.save(record)
        gc.collect()  # a tuple is left alone once the collector saw its items untracked:
        gc.collect()  # a pass may see a packed record before the tuples inside it
        assert len(gc.get_objects()) - before < 200
        got = await storage.get("r7")
        assert got is not None
        assert (got.status, got.args, got.kwargs, got.returning) == (
            TaskStatus.SUCCESS,
            [7],
            {"x": 7},
            7,
        )


async def test_a_change_to_a_final_record_is_kept() -> None:
    """A cancel of a record is stored: the packed record is replaced, not a copy of it
    changed. (A step after the end is refused: see the storage contract's
    ``test_a_step_after_the_end_is_refused``.)"""
    async with AsyncExitStack() as stack:
        storage = MemoryStorage()
        await storage.start(stack, QueueConfig())
        await storage.add(TaskRecord(uuid="b", task_name="t"))
        cancelled = await storage.cancel("b", "asked")
        assert cancelled is not None and cancelled.status is TaskStatus.CANCEL
        cancelled.error = "changed by the caller"
        stored = await storage.get("b")
        assert stored is not None
        assert (stored.status, stored.cancel_reason, stored.error) == (
            TaskStatus.CANCEL,
            "asked",
            None,
        )
