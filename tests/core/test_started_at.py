"""The worker stores when the attempt that settled a task began (``started_at``), so queue
wait and run time can be read back from the record (the dashboard's charts use them)."""

from __future__ import annotations

import time

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus

pytestmark = pytest.mark.anyio


async def test_a_settled_record_says_when_its_attempt_began() -> None:
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))

    @app.task
    async def nap(seconds: float) -> str:
        await anyio.sleep(seconds)
        return "rested"

    @app.task
    async def boom() -> None:
        raise ValueError("no")

    before = time.time()
    queued = await app.add_task("nap", 0.2)
    assert queued.started_at is None
    async with app:
        done = await app.add_task("nap", 0.2, timeout=5)
        failed = await app.add_task("boom", timeout=5)
        first = await app.wait(queued.uuid, timeout=5)
    for record in (done, failed, first):
        assert record.started_at is not None
        assert before <= record.created_at <= record.started_at <= record.updated_at
    assert done.status is TaskStatus.SUCCESS and failed.status is TaskStatus.ERROR
    assert done.started_at is not None
    assert done.updated_at - done.started_at >= 0.19  # the run time, not the wait
