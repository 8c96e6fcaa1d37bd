"""The broker's own ``lease=`` is the delivery lease the worker renews by, and the lease of
the concurrency slots it renews with them (review r19 #1); ``config.lease`` set to another
value is overruled with one warning."""

from __future__ import annotations

import logging

import anyio
import pytest

from qtasks import AsyncQueueTasks, MemoryBroker, QueueConfig, TaskStatus
from qtasks.components import LeaseLength, delivery_lease

pytestmark = pytest.mark.anyio


def test_the_delivery_lease_is_the_brokers_else_the_configs() -> None:
    class Plain:  # a broker without the capability
        pass

    config = QueueConfig(lease=7.0)
    assert isinstance(MemoryBroker(lease=2.0), LeaseLength)
    assert delivery_lease(MemoryBroker(lease=2.0), config) == 2.0
    assert delivery_lease(Plain(), config) == 7.0


async def test_both_leases_set_the_brokers_holds_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lease = 0.5
    app = AsyncQueueTasks(broker=MemoryBroker(lease=lease), config=QueueConfig(lease=20.0))
    runs: list[int] = []

    @app.task
    async def long(i: int) -> int:
        runs.append(i)
        await anyio.sleep(lease * 3)
        return i

    with caplog.at_level(logging.WARNING, logger="qtasks"):
        async with app:
            first = await app.add_task("long", 1)
            second = await app.add_task("long", 2)
            done = [await app.wait(t.uuid, timeout=20) for t in (first, second)]
    assert [(d.status, d.returning, d.attempt) for d in done] == [
        (TaskStatus.SUCCESS, 1, 1),
        (TaskStatus.SUCCESS, 2, 1),
    ]
    assert sorted(runs) == [1, 2]
    told = [r.getMessage() for r in caplog.records if "lease" in r.getMessage()]
    assert len(told) == 1, told
    says = "the lease of the broker (MemoryBroker, 0.5s) is used, not config.lease (20.0s)"
    assert says in told[0]


async def test_concurrency_slots_are_leased_as_long_as_the_deliveries() -> None:
    """``config.lease`` (0.3 s) is not the delivery lease (3 s, renewed every second): a slot
    taken for 0.3 s would run out under its task, and the next one would start beside it."""
    app = AsyncQueueTasks(
        broker=MemoryBroker(lease=3.0), config=QueueConfig(lease=0.3, max_tasks_process=2)
    )
    active: list[int] = []
    most = 0

    @app.task(concurrency_key=lambda i: "all", max_concurrency=1)
    async def one_at_a_time(i: int) -> int:
        nonlocal most
        active.append(i)
        most = max(most, len(active))
        await anyio.sleep(1.0)
        active.remove(i)
        return i

    async with app:
        tasks = [await app.add_task("one_at_a_time", i) for i in range(2)]
        done = [await app.wait(t.uuid, timeout=20) for t in tasks]
    assert [d.status for d in done] == [TaskStatus.SUCCESS] * 2
    assert most == 1
