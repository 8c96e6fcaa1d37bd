"""``ctx.sleep`` under the harness: it ends when the test moves the fake clock past its end,
or at its length in real time, whichever comes first; a sleep the clock has not reached goes
on (so a task that sleeps "until cancelled" still does)."""

import threading
import time
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint

from qtasks import AsyncQueueTasks, QueueTasks, TaskStatus
from qtasks_testing.harness import Harness
from qtasks_testing.sync_harness import SyncHarness

HOUR = 3600.0


def sleeper_app() -> tuple[AsyncQueueTasks, anyio.Event]:
    """An app with an async echo task that sleeps an hour, then says when it woke (on the
    app's clock); ``asleep`` is set just before it sleeps."""
    app = AsyncQueueTasks()
    asleep = anyio.Event()

    @app.task(echo=True)
    async def nap(self: Any, seconds: float) -> float:
        asleep.set()
        await self.ctx.sleep(seconds)
        return app.clock()

    return app, asleep


@pytest.mark.anyio
async def test_advance_time_wakes_a_sleeping_task_in_worker_mode() -> None:
    app, asleep = sleeper_app()
    async with Harness(app, mode="worker") as qt:
        start = qt.clock.time()
        task = await app.add_task("nap", HOUR)
        with anyio.fail_after(5):
            await asleep.wait()
            (done,) = await qt.advance_time(HOUR)
        assert (done.uuid, done.status) == (task.uuid, TaskStatus.SUCCESS)
        assert done.returning >= start + HOUR


@pytest.mark.anyio
async def test_a_sleep_the_clock_has_not_reached_goes_on() -> None:
    app, asleep = sleeper_app()
    async with Harness(app, mode="worker", raise_task_errors=False) as qt:
        qt.freeze_time()
        task = await app.add_task("nap", HOUR)
        with anyio.fail_after(5):
            await asleep.wait()
            await qt.advance_to(qt.clock.time() + HOUR - 1)
            await anyio.wait_all_tasks_blocked()
            record = await app.get(task.uuid)
            assert record is not None and record.status is TaskStatus.PROCESS
            # The last second, on a frozen clock: time alone would never end it.
            await qt.advance_to(qt.clock.time() + 1)
            done = await qt.wait(task)
        assert done.status is TaskStatus.SUCCESS


@pytest.mark.anyio
async def test_a_running_clock_reaches_the_end_by_itself() -> None:
    app, asleep = sleeper_app()
    async with Harness(app, mode="worker") as qt:
        task = await app.add_task("nap", HOUR)
        with anyio.fail_after(5):
            await asleep.wait()
            # Short of the end by a moment, which the clock (not frozen) then runs through.
            await qt.advance_to(qt.clock.time() + HOUR - 0.05)
            done = await qt.wait(task)
        assert done.status is TaskStatus.SUCCESS


@pytest.mark.anyio
async def test_a_sleep_until_cancelled_is_still_cancelled() -> None:
    app, asleep = sleeper_app()
    async with Harness(app, mode="worker", raise_task_errors=False) as qt:
        task = await app.add_task("nap", HOUR)
        with anyio.fail_after(5):
            await asleep.wait()
            await app.cancel(task.uuid)
            done = await qt.wait(task)
        assert done.status is TaskStatus.CANCEL


@pytest.mark.anyio
async def test_inline_add_task_wakes_when_the_test_moves_the_clock() -> None:
    app, asleep = sleeper_app()
    async with Harness(app) as qt:
        start = qt.clock.time()
        result: list[Any] = []

        async def enqueue() -> None:
            result.append(await app.add_task("nap", HOUR))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(enqueue)
                await asleep.wait()
                await qt.advance_to(start + HOUR)
        (record,) = result
        assert record.status is TaskStatus.SUCCESS
        assert record.returning >= start + HOUR


@pytest.mark.anyio
async def test_a_short_sleep_still_ends_in_real_time() -> None:
    app, _ = sleeper_app()
    async with Harness(app) as qt:
        qt.freeze_time()  # the clock never reaches its end: time does
        before = time.monotonic()
        record = await app.add_task("nap", 0.05)
        assert record.status is TaskStatus.SUCCESS
        assert time.monotonic() - before >= 0.05


@pytest.mark.anyio
async def test_the_app_gets_its_own_wait_back() -> None:
    app, _ = sleeper_app()
    async with Harness(app) as qt:
        wait_clock = app.wait_clock
        assert wait_clock is not None
        when = qt.clock.time() + HOUR
        reached = anyio.Event()

        async def wait() -> None:
            await wait_clock(when)
            reached.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await checkpoint()
                assert not reached.is_set()
                await qt.advance_to(when)
        assert reached.is_set()
    assert app.wait_clock is None


def test_sync_task_under_the_sync_harness() -> None:
    app = QueueTasks()
    asleep = threading.Event()

    @app.task(echo=True)
    def nap(self: Any, seconds: float) -> float:
        asleep.set()
        self.ctx.sleep(seconds)
        return app.aio.clock()

    with SyncHarness(app, mode="worker") as qt:
        start = qt.clock.time()
        task = nap.add_task(HOUR)
        assert asleep.wait(5)
        (done,) = qt.advance_time(HOUR)
        assert (done.uuid, done.status) == (task.uuid, TaskStatus.SUCCESS)
        assert done.returning >= start + HOUR
