"""Leases are renewed while a task runs: a task longer than the lease runs exactly once; a
holder whose lease ran out cannot store its result, whichever way the task went back."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from fence_scenarios import (
    late_result_after_a_dead_letter_is_requeued,
    late_result_after_a_shutdown_hand_back,
)

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryStorage, QueueConfig, TaskStatus, hookimpl

pytestmark = pytest.mark.anyio


async def test_task_three_times_longer_than_lease_runs_once() -> None:
    broker, storage = MemoryBroker(), MemoryStorage()
    config = QueueConfig(lease=0.3, max_tasks_process=1, prefetch=1)
    runs: list[str] = []
    apps = [
        AsyncQueueTasks(f"w{i}", broker=broker, storage=storage, config=config) for i in range(2)
    ]
    for app in apps:

        @app.task(name="long")
        async def long(app_name: str = app.name) -> None:
            runs.append(app_name)
            await anyio.sleep(0.9)  # the task's own work: three leases long

        @app.task(name="short")
        async def short() -> None: ...

    async with apps[0], apps[1]:
        first = await apps[0].add_task("long")
        queued = [await apps[0].add_task("long") for _ in range(2)]
        final = await first.wait_result(10)
        for task in queued:
            assert (await task.wait_result(10)).status is TaskStatus.SUCCESS
    assert final.status is TaskStatus.SUCCESS
    assert final.attempt == 1
    assert len(runs) == 3  # three tasks, each exactly once, none re-delivered
    for app in apps:
        await app.aclose()


async def test_lost_lease_result_is_refused() -> None:
    """A worker that lost its lease cannot overwrite the newer attempt's record."""
    broker, storage = MemoryBroker(lease=0.2), MemoryStorage()
    config = QueueConfig()
    app = AsyncQueueTasks(broker=broker, storage=storage, config=config)
    await app.start()
    task = await app.add_task("anything")
    async with broker.consume(prefetch=1) as deliveries:
        iterator = deliveries.__aiter__()
        old = await iterator.__anext__()
        record = await storage.get(task.uuid)
        assert record is not None
        record.token = old.token
        await storage.save(record)
        # no extend(): the lease runs out and the message is delivered again
        with anyio.fail_after(5):
            new = await iterator.__anext__()
        assert new.attempt == 2
        assert new.token != old.token
        record.token = new.token
        await storage.save(record)  # the new attempt claims the record
        stale = await storage.get(task.uuid)
        assert stale is not None
        stale.status, stale.returning = TaskStatus.SUCCESS, "stale"
        assert await storage.save(stale, fence=old.token) is False
        assert await old.ack() is False
        assert await new.ack() is True
    await app.aclose()


async def test_a_renewal_pass_is_one_batched_call_whatever_the_number_of_tasks() -> None:
    """Issue 14, item 1: a pass renews every held delivery in one ``extend_many`` and checks
    every running task in one ``cancelled`` call (the in-memory components have both)."""
    broker, storage = MemoryBroker(), MemoryStorage()
    app = AsyncQueueTasks(
        broker=broker,
        storage=storage,
        config=QueueConfig(lease=0.15, max_tasks_process=20, prefetch=10),
    )
    renewals: list[int] = []
    checks: list[int] = []
    extend_many, cancelled = broker.extend_many, storage.cancelled

    all_held = anyio.Event()

    async def counted_extend(deliveries: Any) -> list[bool]:
        renewals.append(len(deliveries))
        if len(deliveries) == 30:
            all_held.set()
        return await extend_many(deliveries)

    async def counted_check(uuids: Any) -> dict[str, str]:
        checks.append(len(uuids))
        return await cancelled(uuids)

    broker.extend_many = counted_extend  # type: ignore[method-assign]
    storage.cancelled = counted_check  # type: ignore[method-assign]
    gate = anyio.Event()
    started: list[int] = []

    @app.task
    async def held(i: int) -> int:
        started.append(i)
        await gate.wait()
        return i

    async with app:
        tasks = [await app.add_task("held", i) for i in range(30)]
        with anyio.fail_after(5):
            await all_held.wait()
        gate.set()
        for i, task in enumerate(tasks):
            done = await task.wait_result(10)
            assert (done.status, done.returning, done.attempt) == (TaskStatus.SUCCESS, i, 1)
    # While 20 ran and 10 waited, each pass renewed all 30 in one call and checked the 20
    # running ones in one call.
    assert 30 in renewals and 20 in checks
    assert max(renewals) == 30 and max(checks) == 20


async def test_a_task_whose_begin_outlasts_the_lease_runs_once() -> None:
    """A slow step between taking a delivery and starting it (here an async
    ``qtasks_worker_task_received`` hook three leases long) does not let the lease run out:
    the delivery is renewed while it is begun, so no other worker runs it meanwhile (before,
    the second worker ran it while the first still began it, and both ran it)."""
    broker, storage = MemoryBroker(), MemoryStorage()
    config = QueueConfig(lease=0.3, max_tasks_process=1, prefetch=0)
    runs: list[str] = []
    received: list[str] = []

    class SlowReceipt:
        @hookimpl
        async def qtasks_worker_task_received(self, app: Any) -> None:
            received.append(app.name)
            if len(received) == 1:
                await anyio.sleep(0.9)  # a plugin's slow call: three leases long

    apps = [
        AsyncQueueTasks(f"w{i}", broker=broker, storage=storage, config=config) for i in range(2)
    ]
    for app in apps:
        app.add_plugin(SlowReceipt())

        @app.task(name="once")
        async def once(app_name: str = app.name) -> None:
            runs.append(app_name)

    async with apps[0], apps[1]:
        task = await apps[0].add_task("once")
        final = await task.wait_result(10)
    assert final.status is TaskStatus.SUCCESS
    assert received == [received[0]]  # delivered once: its lease never ran out
    assert runs == [received[0]]


def fenced_app(**config: Any) -> AsyncQueueTasks:
    """An in-memory app (its broker begins on claim and shares its storage's server) with a
    short lease and one runner, for the fence scenarios."""
    settings = QueueConfig(lease=0.5, max_tasks_process=1, prefetch=0, shutdown_grace=0.1)
    return AsyncQueueTasks("fence", config=settings.merged(**config))


async def test_a_stale_result_is_refused_after_a_shutdown_hand_back() -> None:
    await late_result_after_a_shutdown_hand_back(fenced_app())


async def test_a_stale_result_is_refused_after_a_dead_letter_is_requeued() -> None:
    await late_result_after_a_dead_letter_is_requeued(fenced_app(max_deliveries=1))
