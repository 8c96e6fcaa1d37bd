"""``KeyboardInterrupt`` raised by a task's code where no Ctrl-C can arrive (a sync task's
worker thread, the sync app's event loop thread) fails that task with
:class:`TaskInterruptError`; it used to end the sync app's loop, so the waiting call read
"closed while this call waited" and every later one "This portal is not running"."""

from __future__ import annotations

import pytest

from qtasks import AsyncQueueTasks, QueueTasks, TaskStatus

WAIT = 10


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_tasks_keyboard_interrupt_fails_it_and_the_sync_app_serves_on(kind: str) -> None:
    app = QueueTasks()

    if kind == "async":

        @app.task(name="boom")
        async def boom_async() -> None:
            raise KeyboardInterrupt

    else:

        @app.task(name="boom")
        def boom_sync() -> None:
            raise KeyboardInterrupt

    @app.task
    def ok() -> int:
        return 1

    with app:
        record = app.add_task("boom", timeout=WAIT)
        assert record.status is TaskStatus.ERROR
        assert record.error is not None
        assert record.error.startswith("TaskInterruptError: task 'boom' raised KeyboardInterrupt")
        assert record.traceback is not None and "KeyboardInterrupt" in record.traceback
        assert app.add_task("ok", timeout=WAIT).returning == 1  # the loop still serves
    app.close()


@pytest.mark.anyio
async def test_a_sync_tasks_keyboard_interrupt_fails_it_in_the_async_app() -> None:
    app = AsyncQueueTasks()

    @app.task
    def boom() -> None:
        raise KeyboardInterrupt

    async with app:
        record = await app.add_task("boom", timeout=WAIT)
    assert record.status is TaskStatus.ERROR
    assert record.error is not None and record.error.startswith("TaskInterruptError")
