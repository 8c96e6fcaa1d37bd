"""A delivery whose lease was lost comes back to the same worker while its old run is still
registered (issue 14, item 2): both runs end cleanly, the newer one's result is stored."""

from __future__ import annotations

import logging
import time

import anyio
import pytest

from qtasks import AsyncQueueTasks, MemoryBroker, QueueConfig, TaskStatus

pytestmark = pytest.mark.anyio


async def test_redelivery_while_the_old_run_winds_down(caplog: pytest.LogCaptureFixture) -> None:
    lease = 0.3
    app = AsyncQueueTasks(
        broker=MemoryBroker(lease=lease),
        config=QueueConfig(max_tasks_process=2, prefetch=2, lease=lease),
    )
    runs: list[int] = []
    second = anyio.Event()

    @app.task
    async def hog() -> int:
        runs.append(len(runs) + 1)
        if len(runs) == 1:
            time.sleep(lease * 2)  # noqa: ASYNC251 - blocks the loop: the lease runs out
            with anyio.CancelScope(shield=True), anyio.fail_after(5):
                await second.wait()  # still registered while the next delivery runs
            return 1
        second.set()
        return 2

    with caplog.at_level(logging.WARNING, logger="qtasks"):
        async with app:
            done = await app.add_task("hog", timeout=10)
            assert (done.status, done.returning) == (TaskStatus.SUCCESS, 2)
            with anyio.fail_after(5):
                while app.worker.running:  # noqa: ASYNC110 - the old run winds down
                    await anyio.sleep(0.01)
            stored = await app.get(done.uuid)
            assert stored is not None and stored.returning == 2
    assert runs == [1, 2]
    failures = [r for r in caplog.records if "worker failed" in r.getMessage()]
    assert failures == []
    # Not "another worker owns it now": here the same worker runs it again (and RabbitMQ
    # hands a lost connection's messages to whichever consumer comes first).
    lost = f"task hog ({done.uuid}): its lease was lost, its result dropped: its message is "
    assert any(r.getMessage().startswith(lost) for r in caplog.records), caplog.text


async def test_last_allowed_delivery_that_lost_its_lease_ends_dead_lettered() -> None:
    """Issue 14, item 4 without a shared server: the result of the last allowed delivery,
    whose lease ran out while the loop was blocked, is not stored over the dead letter."""
    lease = 0.3
    broker = MemoryBroker(lease=lease)
    app = AsyncQueueTasks(
        broker=broker, config=QueueConfig(max_tasks_process=1, lease=lease, max_deliveries=1)
    )

    @app.task
    async def hog() -> str:
        time.sleep(lease * 2)  # noqa: ASYNC251 - blocks the loop: the lease runs out
        return "late"

    async with app:
        task = await app.add_task("hog")
        done = await app.wait(task.uuid, timeout=10)
        assert (done.status, done.returning) == (TaskStatus.ERROR, None)
        assert done.error is not None and done.error.startswith("dead-lettered: delivery limit")
        with anyio.fail_after(5):
            while task.uuid not in {d.id for d in await broker.dead_letters()}:  # noqa: ASYNC110
                await anyio.sleep(0.01)


async def test_a_batched_run_whose_lease_is_lost_while_it_waits_still_fires_execute_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A finished run waits in the settle batch; its lease is lost meanwhile (what the lease
    keeper marks when a renewal is refused). Its result is dropped, as a lost lease's is
    when the runner settles it itself, and ``qtasks_worker_execute_after`` fires for it all
    the same, once: every run ``execute_before`` announced ends with it (before, the batch
    dropped such a run without the hook)."""
    from typing import Any

    from qtasks import hookimpl, settle_batch

    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], max_tasks_process=1))
    events: list[str] = []
    put = settle_batch.SettleBatch.put
    lost: list[str] = []

    async def put_then_lose(self: Any, run: Any, delivery: Any) -> None:
        await put(self, run, delivery)
        if run.record.args == [1]:
            run.lease_lost = True  # lost while it waits for the settle call
            lost.append(run.record.uuid)

    monkeypatch.setattr(settle_batch.SettleBatch, "put", put_then_lose)

    class Watch:
        @hookimpl
        def qtasks_worker_execute_before(self, record: Any) -> None:
            events.append(f"before {record.args}")

        @hookimpl
        def qtasks_worker_execute_after(self, record: Any) -> None:
            events.append(f"after {record.args}")

    app.add_plugin(Watch())

    @app.task
    async def work(n: int) -> int:
        return n

    async with app:
        first = await app.add_task("work", 1)
        second = await app.add_task("work", 2, timeout=5)
        assert second.status is TaskStatus.SUCCESS
        with anyio.fail_after(5):
            while events.count("after [1]") < 1:  # noqa: ASYNC110 - a hook's record
                await anyio.sleep(0.01)
        stored = await app.storage.get(first.uuid)
    assert lost == [first.uuid]
    assert stored is not None and stored.status is not TaskStatus.SUCCESS  # dropped
    assert sorted(events) == ["after [1]", "after [2]", "before [1]", "before [2]"]


async def test_a_run_whose_lease_another_consumer_took_is_cancelled_not_run_to_the_end() -> None:
    """The lease of a running task runs out (the loop was blocked) and another consumer
    claims the message: the worker's next renewal is refused, and the stale run's code is
    cancelled then, while the redelivery runs, rather than running on next to it until its
    end and having its result dropped. The record ends from the redelivery alone."""
    lease = 0.3
    app = AsyncQueueTasks(
        config=QueueConfig(max_tasks_process=1, prefetch=0, lease=lease, plugins_disabled=["*"])
    )
    started, never = anyio.Event(), anyio.Event()
    stale_cancelled = anyio.Event()
    ends: list[str] = []

    @app.task
    async def work() -> str:
        if not started.is_set():
            started.set()
            try:
                await never.wait()  # only a cancel ends the first run
            except anyio.get_cancelled_exc_class():
                ends.append("first cancelled")
                stale_cancelled.set()
                raise
            ends.append("first finished")
            return "first"
        with anyio.fail_after(5):
            await stale_cancelled.wait()  # while the redelivery runs
        ends.append("second finished")
        return "second"

    async with app:
        task = await app.add_task("work")
        with anyio.fail_after(5):
            await started.wait()
        time.sleep(lease * 1.5)  # noqa: ASYNC251 - blocks the loop: no renewal, the lease runs out
        async with app.broker.consume(prefetch=1) as other:
            redelivery = await anext(aiter(other))  # claimed before the worker runs again
            assert (redelivery.id, redelivery.attempt) == (task.uuid, 2)
            await app.worker.process(app, redelivery)
        done = await app.wait(task.uuid, timeout=5)
    assert ends == ["first cancelled", "second finished"]
    assert (done.status, done.returning) == (TaskStatus.SUCCESS, "second")
