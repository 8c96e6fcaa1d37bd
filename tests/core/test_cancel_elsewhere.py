"""A cancel made by another app (another process, on a shared backend) while the task runs.

Two apps share one in-memory broker and storage: the worker app's own ``cancel_local`` is never
called, exactly as when the cancel comes from another process. The cancel must reach the running
task at once (through the storage's cancel feed, not the lease renewal: the lease here is a
minute), and the task's result must never replace it.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from test_shared_server import FoldingBroker

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryStorage, QueueConfig, TaskStatus, hookimpl
from qtasks.components import CancelFeed

pytestmark = pytest.mark.anyio


class Ends:
    """The hooks that say how a task ended, as the worker app fires them."""

    def __init__(self) -> None:
        self.cancelled: list[tuple[str, str]] = []
        self.succeeded: list[str] = []
        self.after = anyio.Event()

    @hookimpl
    def qtasks_task_cancelled(self, record: Any, reason: str) -> None:
        self.cancelled.append((record.uuid, reason))

    @hookimpl
    def qtasks_task_succeeded(self, record: Any) -> None:
        self.succeeded.append(record.uuid)

    @hookimpl
    def qtasks_worker_execute_after(self, record: Any) -> None:
        self.after.set()


class Shared:
    def __init__(self, folding: bool) -> None:
        self.storage = MemoryStorage()
        # FoldingBroker settles through SharedServer.ack_finals, as Redis does.
        self.broker = FoldingBroker(self.storage) if folding else MemoryBroker()
        self.producer = AsyncQueueTasks("producer", broker=self.broker, storage=self.storage)
        self.worker = AsyncQueueTasks(
            "worker", broker=self.broker, storage=self.storage, config=QueueConfig(lease=60)
        )
        self.ends = Ends()
        self.worker.add_plugin(self.ends, name="ends")


@pytest.fixture(params=["plain", "shared-server"])
async def shared(request: pytest.FixtureRequest) -> AsyncIterator[Shared]:
    apps = Shared(request.param == "shared-server")
    yield apps
    await apps.producer.aclose()


def test_memory_storage_is_a_cancel_feed() -> None:
    assert isinstance(MemoryStorage(), CancelFeed)


async def test_async_task_is_cancelled_at_once_and_stays_cancelled(shared: Shared) -> None:
    started, interrupted = anyio.Event(), anyio.Event()

    @shared.worker.task
    async def slow() -> str:
        started.set()
        try:
            await anyio.sleep(5)
        except anyio.get_cancelled_exc_class():
            interrupted.set()
            raise
        return "finished"

    async with shared.worker:
        task = await shared.producer.add_task("slow")
        waited: list[Any] = []

        async def wait() -> None:
            waited.append(await shared.producer.wait(task.uuid, timeout=10))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            with anyio.fail_after(5):
                await started.wait()
            cancelled = await shared.producer.cancel(task.uuid, "changed my mind")
            assert cancelled is not None and cancelled.status is TaskStatus.CANCEL
            with anyio.fail_after(2):  # far less than a lease renewal (20 s)
                await interrupted.wait()
                await shared.ends.after.wait()
        stored = await shared.producer.get(task.uuid)
        assert stored is not None
        assert (stored.status, stored.cancel_reason) == (TaskStatus.CANCEL, "changed my mind")
        assert [w.status for w in waited] == [TaskStatus.CANCEL]
        assert shared.ends.cancelled == [(task.uuid, "changed my mind")]
        assert shared.ends.succeeded == []
        assert (await shared.broker.stats()).in_flight == 0  # acked, not left to its lease


async def test_sync_task_result_is_dropped_when_cancelled_while_it_ran(shared: Shared) -> None:
    started, release = threading.Event(), threading.Event()

    @shared.worker.task
    def blocking() -> str:
        started.set()
        release.wait(10)  # Python cannot interrupt a thread: the code runs to its end
        return "finished"

    async with shared.worker:
        task = await shared.producer.add_task("blocking")
        assert await anyio.to_thread.run_sync(started.wait, 5)
        await shared.producer.cancel(task.uuid, "too late")
        release.set()
        with anyio.fail_after(5):
            await shared.ends.after.wait()
        stored = await shared.producer.get(task.uuid)
        assert stored is not None
        assert (stored.status, stored.returning) == (TaskStatus.CANCEL, None)
        assert stored.cancel_reason == "too late"
        assert shared.ends.cancelled == [(task.uuid, "too late")]
        assert shared.ends.succeeded == []
        assert (await shared.broker.stats()).in_flight == 0


async def test_result_of_a_task_that_ignores_the_cancel_does_not_replace_it(
    shared: Shared,
) -> None:
    """The task finishes anyway (it shields itself): its success is refused by the storage,
    the message is acked, and the worker reports the cancel once."""
    started, release = anyio.Event(), anyio.Event()

    @shared.worker.task
    async def stubborn() -> str:
        started.set()
        with anyio.CancelScope(shield=True):
            await release.wait()
        return "finished"

    async with shared.worker:
        task = await shared.producer.add_task("stubborn")
        with anyio.fail_after(5):
            await started.wait()
        await shared.producer.cancel(task.uuid, "stop")
        release.set()
        with anyio.fail_after(5):
            await shared.ends.after.wait()
        stored = await shared.producer.get(task.uuid)
        assert stored is not None
        assert (stored.status, stored.returning) == (TaskStatus.CANCEL, None)
        assert shared.ends.cancelled == [(task.uuid, "stop")]
        assert shared.ends.succeeded == []
        assert (await shared.broker.stats()).in_flight == 0


async def test_storage_refuses_a_final_save_over_another_final_status() -> None:
    storage = MemoryStorage()
    async with AsyncQueueTasks(storage=storage) as app:
        task = await app.add_task("nothing", delay=60)
        record = await storage.get(task.uuid)
        assert record is not None
        record.status, record.token = TaskStatus.PROCESS, "t1"
        await storage.begin(record)
        await storage.cancel(task.uuid, "no")
        record.status, record.returning = TaskStatus.SUCCESS, 42
        assert not await storage.save(record, fence="t1")
        record.status = TaskStatus.CANCEL
        assert await storage.save(record, fence="t1")  # the same final status: idempotent
        stored = await storage.get(task.uuid)
        assert stored is not None and stored.status is TaskStatus.CANCEL
