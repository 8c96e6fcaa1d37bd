"""``qtasks_task_cancelled`` fires exactly once per cancelled task across the process that
cancels and the worker (in memory: two apps on one broker and storage); the scenarios are in
tests/cancel_hook_scenarios.py, run on Redis too."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from cancel_hook_scenarios import Scenario, each_cancel

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryStorage, QueueConfig, hookimpl
from qtasks.components import CancelFrom
from qtasks.record import TaskRecord, TaskStatus

pytestmark = pytest.mark.anyio

Apps = tuple[AsyncQueueTasks, AsyncQueueTasks]


@pytest.fixture
async def apps() -> AsyncIterator[Apps]:
    storage, broker = MemoryStorage(), MemoryBroker()
    config = QueueConfig(max_tasks_process=1, prefetch=3, lease=60, shutdown_grace=1.0)
    producer = AsyncQueueTasks("producer", broker=broker, storage=storage, config=config)
    worker = AsyncQueueTasks("worker", broker=broker, storage=storage, config=config)
    yield producer, worker
    await producer.aclose()


@each_cancel
async def test_a_cancel_fires_the_hook_once(apps: Apps, scenario: Scenario) -> None:
    await scenario(*apps)


def test_memory_storage_says_what_its_cancel_changed() -> None:
    assert isinstance(MemoryStorage(), CancelFrom)


async def test_a_storage_subclass_overriding_cancel_keeps_it_called() -> None:
    """A subclass of a built-in storage auditing its cancels (it overrides ``cancel``) is not
    bypassed through the ``cancel_from`` it inherits; the canceller still fires the hook for
    a queued task (the broker dropped it unstarted)."""
    audited: list[str] = []
    fired: list[str] = []

    class Audited(MemoryStorage):
        async def cancel(self, uuid: str, reason: str) -> TaskRecord | None:
            audited.append(uuid)
            return await super().cancel(uuid, reason)

    class Counter:
        @hookimpl
        def qtasks_task_cancelled(self, record: TaskRecord, reason: str) -> None:
            fired.append(record.uuid)

    app = AsyncQueueTasks("audited", broker=MemoryBroker(), storage=Audited())
    app.add_plugin(Counter())

    @app.task
    async def idle() -> None:
        return None

    try:
        task = await app.add_task("idle")
        cancelled = await app.cancel(task.uuid, "no")
        assert cancelled is not None and cancelled.status is TaskStatus.CANCEL
        assert audited == [task.uuid]
        assert fired == [task.uuid]
    finally:
        await app.aclose()
