"""The overview's charts count every task once, and a dashboard that was open while a task ran
shows the same figures as one opened afterwards (memory components, the worker running)."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus
from qtasks.components import StorageQuery
from qtasks_testing.contract._base import wait_until
from qtasks_web.data import BUCKETS, Charts

pytestmark = pytest.mark.anyio
WINDOW = 3.0  # intervals of 0.1 s: a task that runs a few tenths of a second spans several


def started(series: list[dict[str, Any]], now: float) -> float:
    """Tasks started in the window (the rates times the length each was divided by)."""
    length = WINDOW / BUCKETS
    total = 0.0
    for point in series:
        total += point["started"] * min(length, max(now - (point["t"] - length), 1e-3))
    return total


async def test_a_long_task_starts_once_on_a_dashboard_open_while_it_ran() -> None:
    app = AsyncQueueTasks("charts", config=QueueConfig(plugins_disabled=["*"]))
    release = anyio.Event()

    @app.task
    async def slow() -> str:
        await release.wait()
        return "done"

    async with app:
        storage = app.storage
        assert isinstance(storage, StorageQuery)
        task = await app.enqueue("slow", [], {})
        open_board = Charts(WINDOW)  # a dashboard refreshing while the task runs

        async def start_read_closed() -> bool:
            await open_board.read(storage, time.time())
            return any(p.counts[TaskStatus.PROCESS] for p in open_board.closed.values())

        await wait_until(
            start_read_closed, timeout=5, what="the task's start in a closed, kept interval"
        )
        release.set()
        assert (await app.storage.wait(task.uuid, 5)).status is TaskStatus.SUCCESS
        now = time.time()
        seen_open = await open_board.read(storage, now)
        seen_later = await Charts(WINDOW).read(storage, now)  # a dashboard opened now
    assert seen_open == seen_later
    assert started(seen_later, now) == pytest.approx(1, abs=0.01)
