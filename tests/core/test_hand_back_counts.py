"""Hand-backs that are not delivery attempts keep the deliveries lost before them
(``Delivery.requeue(count="earlier")``): a rate-limited message and a message handed back in a
storage outage. Before, both reset the count, so a message whose holders kept dying could
escape its delivery limit through a rate limit or an outage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from qtasks import AsyncQueueTasks, QueueConfig, TaskRecord, TaskStatus
from qtasks.memory import MemoryBroker, MemoryStorage
from qtasks.memory import broker as memory_broker

pytestmark = pytest.mark.anyio


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ``count`` of every requeue the in-memory broker's deliveries make."""
    made: list[str] = []
    requeue = memory_broker.MemoryDelivery.requeue

    async def recording(
        self: Any, *, delay: float | None = None, body: bytes | None = None, count: Any = "reset"
    ) -> bool:
        made.append(count)
        return await requeue(self, delay=delay, body=body, count=count)

    monkeypatch.setattr(memory_broker.MemoryDelivery, "requeue", recording)
    return made


async def test_a_rate_limited_hand_back_keeps_the_deliveries_lost_before_it(
    counts: list[str],
) -> None:
    app = AsyncQueueTasks(broker=MemoryBroker(), config=QueueConfig(plugins_disabled=["*"]))

    @app.task(rate_limit="5/s", rate_burst=1)
    async def limited(i: int) -> int:
        return i

    async with app:
        tasks = [await app.add_task("limited", i) for i in range(3)]
        for task in tasks:
            assert (await app.wait(task.uuid, timeout=5)).status is TaskStatus.SUCCESS
    assert counts, "the rate limit handed nothing back"
    assert set(counts) == {"earlier"}


class BeginFailsOnce(MemoryStorage):
    """The begin of a record fails once with a lost connection (a storage outage)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def _fail(self) -> None:
        if not self.failed:
            self.failed = True
            raise ConnectionError("storage went away")

    async def begin_many(self, records: Sequence[TaskRecord]) -> list[TaskRecord]:
        self._fail()
        return await super().begin_many(records)

    async def begin(self, record: TaskRecord, *, generation: int = 0) -> TaskRecord:
        self._fail()
        return await super().begin(record, generation=generation)


class ApartBroker(MemoryBroker):
    """Behaves as a broker on another server than the storage: the worker begins each record
    itself (no begin with the claim), where the outage below strikes."""

    def shares_server_with(self, storage: Any) -> bool:
        return False


async def test_a_hand_back_in_a_storage_outage_keeps_the_deliveries_lost_before_it(
    counts: list[str],
) -> None:
    storage = BeginFailsOnce()
    app = AsyncQueueTasks(
        broker=ApartBroker(), storage=storage, config=QueueConfig(plugins_disabled=["*"])
    )

    @app.task
    async def plain() -> str:
        return "ran"

    async with app:
        task = await app.add_task("plain")
        assert (await app.wait(task.uuid, timeout=5)).returning == "ran"
    assert storage.failed
    assert counts == ["earlier"]
