"""The storage goes away while tasks finish (issue 14, item 6): the final save is retried
while the lease holds, nothing runs twice, and the outage logs one warning, not a traceback
per task."""

from __future__ import annotations

import logging

import anyio
import pytest

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryStorage, QueueConfig, TaskStatus
from qtasks.errors import BrokerConnectionError
from qtasks.record import TaskRecord

pytestmark = pytest.mark.anyio


class FlakyStorage(MemoryStorage):
    """The in-memory storage, whose saves fail as if its server were down while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.refused = 0
        self.tried_enough = anyio.Event()

    async def save(self, record: TaskRecord, *, fence: str | None = None) -> bool:
        if self.down:
            self.refused += 1
            if self.refused >= 5:
                self.tried_enough.set()
            raise BrokerConnectionError("cannot reach the storage: Connection refused")
        return await super().save(record, fence=fence)


async def test_results_finished_during_an_outage_are_stored_once_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = FlakyStorage()
    app = AsyncQueueTasks(
        broker=MemoryBroker(),
        storage=storage,
        config=QueueConfig(lease=0.5, max_tasks_process=10),
    )
    runs: list[int] = []
    all_started = anyio.Event()

    @app.task
    async def work(i: int) -> int:
        runs.append(i)
        if len(runs) == 10:
            all_started.set()
        await all_started.wait()
        storage.down = True  # every task finishes while the storage is down
        return i

    with caplog.at_level(logging.WARNING):
        async with app:
            tasks = [await app.add_task("work", i) for i in range(10)]
            with anyio.fail_after(10):
                await storage.tried_enough.wait()
            await anyio.sleep(1.2)  # the outage outlasts two leases: renewals keep them
            storage.down = False
            for i, task in enumerate(tasks):
                done = await task.wait_result(10)
                assert (done.status, done.returning, done.attempt) == (TaskStatus.SUCCESS, i, 1)
    assert sorted(runs) == list(range(10))  # each exactly once
    warnings = [r.getMessage() for r in caplog.records if r.name == "qtasks.worker"]
    assert warnings == [
        "task storage unreachable (cannot reach the storage: Connection refused); retrying",
        "task storage reachable again",
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
