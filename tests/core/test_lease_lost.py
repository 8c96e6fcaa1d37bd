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
    assert any("lease of task" in r.getMessage() for r in caplog.records)


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
