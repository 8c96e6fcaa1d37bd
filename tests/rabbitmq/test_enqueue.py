"""``add_task`` on RabbitMQ with Redis storage: the record's add overlaps the confirmed publish.

Real RabbitMQ and Redis. The storages below are real :class:`RedisStorage` instances whose
``add`` is held back or made to fail, to force the orders a slow network could produce.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, hookimpl
from qtasks.memory import MemoryStorage
from qtasks.record import TaskRecord, TaskStatus
from qtasks_rabbitmq import PublishRejectedError, RabbitMQBroker
from qtasks_redis import RedisStorage

from .conftest import URL, BrokerFactory, drop_work_queue

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]


class LateAddStorage(RedisStorage):
    """Holds a new record's add until the task's final record is saved: the producer's write
    then lands after the worker began and finished the task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.final_saved = anyio.Event()
        self.late_adds = 0

    async def save(self, record: TaskRecord, *, fence: str | None = None) -> bool:
        saved = await super().save(record, fence=fence)
        if record.status.final:
            self.final_saved.set()
        return saved

    async def add(self, record: TaskRecord, *, replace: bool = True) -> None:
        if not replace:
            await self.final_saved.wait()
            self.late_adds += 1
        await super().add(record, replace=replace)


class FailingAddStorage(RedisStorage):
    """A new record's add fails (the server went away between the two round trips, say)."""

    failed: str | None = None

    async def add(self, record: TaskRecord, *, replace: bool = True) -> None:
        if not replace:
            self.failed = record.uuid
            raise ConnectionError("storage unreachable")
        await super().add(record, replace=replace)


class EnqueueHooks:
    """Records the producer's notifications."""

    name = "enqueue-hooks"

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def qtasks_storage_added(self) -> None:
        self.calls.append("qtasks_storage_added")

    @hookimpl
    def qtasks_task_enqueued(self) -> None:
        self.calls.append("qtasks_task_enqueued")


def make_app(queue: str, storage: Any) -> AsyncQueueTasks:
    app = AsyncQueueTasks(
        broker=RabbitMQBroker(URL, queue=queue),
        storage=storage,
        config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0),
    )

    @app.task
    async def echo(x: int) -> int:
        return x

    return app


async def test_a_record_added_after_the_task_finished_is_not_set_back(
    make_broker: BrokerFactory, queue_name: str, prefix: str, redis_url: str
) -> None:
    """The publish does not wait for the add: the worker begins and finishes the task (its
    ``begin`` creates the record) while the producer's add is held; the late add then leaves the
    final record alone. (The sequential path adds with ``replace=True`` first: ``late_adds``
    would be 0, and holding that add would hang, the task never being published.)"""
    await make_broker()
    storage = LateAddStorage(redis_url, prefix=prefix)
    app = make_app(queue_name, storage)
    hooks = EnqueueHooks()
    app.add_plugin(hooks)
    try:
        async with app:
            with anyio.fail_after(20):
                task = await app.add_task("echo", 7, timeout=15)
        assert task.status is TaskStatus.SUCCESS
        assert task.returning == 7
        assert storage.late_adds == 1
        stored = await app.get(task.uuid)
        assert stored is not None
        assert stored.status is TaskStatus.SUCCESS
        assert stored.attempt == 1
        assert hooks.calls == ["qtasks_storage_added", "qtasks_task_enqueued"]
    finally:
        await app.aclose()


async def test_round_trips_on_rabbitmq_and_redis(
    make_broker: BrokerFactory, queue_name: str, prefix: str, redis_url: str
) -> None:
    await make_broker()
    app = make_app(queue_name, RedisStorage(redis_url, prefix=prefix))
    try:
        async with app:
            with anyio.fail_after(30):
                for i in range(20):
                    task = await app.add_task("echo", i, timeout=10)
                    assert (task.status, task.returning) == (TaskStatus.SUCCESS, i)
                    assert task.attempt == 1
    finally:
        await app.aclose()


async def test_a_failed_publish_raises_its_own_error(
    make_broker: BrokerFactory, queue_name: str, prefix: str, redis_url: str
) -> None:
    broker = await make_broker()
    app = make_app(queue_name, RedisStorage(redis_url, prefix=prefix))
    hooks = EnqueueHooks()
    app.add_plugin(hooks)
    try:
        await app.start()
        await drop_work_queue(broker)
        with anyio.fail_after(20), pytest.raises(PublishRejectedError, match="unroutable"):
            await app.add_task("echo", 1)
        assert hooks.calls == []  # neither notification: the task was not enqueued
    finally:
        await app.aclose()


async def test_a_failed_add_raises_and_the_published_task_still_runs(
    make_broker: BrokerFactory, queue_name: str, prefix: str, redis_url: str
) -> None:
    await make_broker()
    storage = FailingAddStorage(redis_url, prefix=prefix)
    app = make_app(queue_name, storage)
    try:
        async with app:
            with anyio.fail_after(20):
                with pytest.raises(ConnectionError, match="storage unreachable"):
                    await app.add_task("echo", 5)
                # The message was confirmed before the add failed: the worker runs it, its
                # begin creating the record.
                assert storage.failed is not None
                record = await storage.wait(storage.failed, 15)
        assert record.status is TaskStatus.SUCCESS
        assert record.returning == 5
    finally:
        await app.aclose()


async def test_in_memory_storage_keeps_the_sequential_path(
    make_broker: BrokerFactory, queue_name: str
) -> None:
    """A local component completes without I/O: nothing to overlap, the record is stored
    before the message is published (a worker never has to create it)."""
    await make_broker()
    storage = MemoryStorage()
    app = make_app(queue_name, storage)
    try:
        async with app:
            with anyio.fail_after(20):
                task = await app.add_task("echo", 3, timeout=15)
        assert (task.status, task.returning) == (TaskStatus.SUCCESS, 3)
        assert app.enqueue_path == "sequential"  # a local storage: never overlapped
    finally:
        await app.aclose()
