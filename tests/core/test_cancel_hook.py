"""``qtasks_task_cancelled`` fires exactly once per cancelled task across the process that
cancels and the worker (in memory: two apps on one broker and storage); the scenarios are in
tests/cancel_hook_scenarios.py, run on Redis too."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from cancel_hook_scenarios import Scenario, each_cancel

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryStorage, QueueConfig
from qtasks.components import CancelFrom

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
