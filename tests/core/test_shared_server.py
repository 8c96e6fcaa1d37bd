"""The optional SharedServer capability: the app folds storage writes into broker calls."""

from __future__ import annotations

import pytest

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryStorage, TaskStatus
from qtasks.components import Delivery, SharedServer, Storage
from qtasks.messages import Envelope
from qtasks.record import TaskRecord

pytestmark = pytest.mark.anyio


class FoldingBroker(MemoryBroker):
    """The in-memory broker, declaring that it shares a server with one given storage."""

    def __init__(self, partner: Storage) -> None:
        super().__init__()
        self.partner = partner
        self.calls: list[str] = []

    def shares_server_with(self, storage: Storage) -> bool:
        return storage is self.partner

    async def publish_new(self, envelope: Envelope, storage: Storage, record: TaskRecord) -> None:
        self.calls.append("publish_new")
        await storage.add(record)
        await self.publish(envelope)

    async def ack_final(self, delivery: Delivery, storage: Storage, record: TaskRecord) -> bool:
        self.calls.append("ack_final")
        if not await storage.save(record, fence=delivery.token):
            return False
        await delivery.ack()
        return True


async def test_folding_broker_is_used_for_enqueue_and_settle() -> None:
    storage = MemoryStorage()
    broker = FoldingBroker(storage)
    assert isinstance(broker, SharedServer)
    app = AsyncQueueTasks(broker=broker, storage=storage)

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    async with app:
        assert app.shared_server is broker
        done = await app.add_task("double", 4, timeout=5)
    assert (done.status, done.returning) == (TaskStatus.SUCCESS, 8)
    assert broker.calls == ["publish_new", "ack_final"]
    await app.aclose()


async def test_not_used_with_another_storage() -> None:
    broker = FoldingBroker(MemoryStorage())
    app = AsyncQueueTasks(broker=broker, storage=MemoryStorage())

    @app.task
    async def one() -> int:
        return 1

    async with app:
        assert app.shared_server is None
        assert (await app.add_task("one", timeout=5)).returning == 1
    assert broker.calls == []
