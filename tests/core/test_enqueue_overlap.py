"""``add_task`` with remote components overlaps the record's add with the publish.

The in-memory broker and storage are local (``local = True``): the app keeps them sequential.
Here subclasses that declare themselves remote (``local = False``) stand in for a remote pair,
in-process, so the orders and failures can be forced. RabbitMQ + Redis: tests/rabbitmq.
"""

from __future__ import annotations

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus
from qtasks.memory import MemoryBroker, MemoryStorage
from qtasks.messages import Envelope
from qtasks.record import TaskRecord

pytestmark = pytest.mark.anyio


class RemoteBroker(MemoryBroker):
    local = False

    def __init__(self) -> None:
        super().__init__()
        self.published = anyio.Event()
        self.fail: Exception | None = None

    def shares_server_with(self, storage: object) -> bool:
        return False  # a remote pair on two servers: no folded calls

    async def publish(self, envelope: Envelope) -> None:
        if self.fail is not None:
            raise self.fail
        await super().publish(envelope)
        self.published.set()


class RemoteStorage(MemoryStorage):
    """Its new-record add waits until the message is published: sequential, it would hang."""

    local = False

    def __init__(self, broker: RemoteBroker) -> None:
        super().__init__()
        self.broker = broker
        self.fail: Exception | None = None
        self.adds: list[bool] = []

    async def add(self, record: TaskRecord, *, replace: bool = True) -> None:
        self.adds.append(replace)
        if not replace:
            await self.broker.published.wait()
        if self.fail is not None:
            raise self.fail
        await super().add(record, replace=replace)


def make_app(broker: MemoryBroker, storage: MemoryStorage) -> AsyncQueueTasks:
    app = AsyncQueueTasks(
        broker=broker, storage=storage, config=QueueConfig(plugins_disabled=["*"])
    )

    @app.task
    async def echo(x: int) -> int:
        return x

    return app


async def test_remote_components_overlap_add_and_publish() -> None:
    broker = RemoteBroker()
    storage = RemoteStorage(broker)
    app = make_app(broker, storage)
    async with app:
        with anyio.fail_after(10):
            task = await app.add_task("echo", 4, timeout=5)
    assert (task.status, task.returning) == (TaskStatus.SUCCESS, 4)
    assert storage.adds == [False]


async def test_a_failed_publish_raises_its_own_error_not_a_group() -> None:
    broker = RemoteBroker()
    storage = RemoteStorage(broker)
    broker.fail = ConnectionError("broker unreachable")
    app = make_app(broker, storage)
    try:
        await app.start()
        storage.broker.published.set()  # let the concurrent add finish
        with anyio.fail_after(10), pytest.raises(ConnectionError, match="broker unreachable"):
            await app.add_task("echo", 1)
    finally:
        await app.aclose()


async def test_a_failed_add_raises_and_the_message_is_queued() -> None:
    broker = RemoteBroker()
    storage = RemoteStorage(broker)
    storage.fail = OSError("storage unreachable")
    app = make_app(broker, storage)
    try:
        await app.start()
        with anyio.fail_after(10), pytest.raises(OSError, match="storage unreachable"):
            await app.add_task("echo", 1)
        assert (await broker.stats()).ready_by_priority == {0: 1}
    finally:
        await app.aclose()


async def test_local_components_stay_sequential() -> None:
    broker, storage = MemoryBroker(), MemoryStorage()
    app = make_app(broker, storage)
    async with app:
        with anyio.fail_after(10):
            task = await app.add_task("echo", 2, timeout=5)
    assert task.status is TaskStatus.SUCCESS
    assert app.enqueue_path == "shared"  # one process is one server: never overlapped
