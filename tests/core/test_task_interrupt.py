"""``KeyboardInterrupt`` raised by a task's code where no Ctrl-C can arrive (a sync task's
worker thread, the sync app's event loop thread) fails that task with
:class:`TaskInterruptError`; it used to end the sync app's loop, so the waiting call read
"closed while this call waited" and every later one "This portal is not running"."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from qtasks import AsyncQueueTasks, QueueTasks, TaskStatus
from qtasks.errors import ComponentNotStartedError

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


def test_a_sync_app_whose_loop_died_says_why_on_every_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # KeyboardInterrupt raised on the loop outside any task's code (a callback here; a
    # plugin's or middleware's alike) still ends the loop: every call says so, the waiting
    # one too (it read "closed while this call waited", later ones "This portal is not
    # running"), and close() returns once the loop's thread is over. That thread raised it:
    # reported by then (it used to run on for the grace period, and pytest blamed the
    # exception on a test tens of seconds later). Promptly: the worker's stop in the loop's
    # teardown waited for the settle of the task's result, whose settler the teardown had
    # cancelled, the stop's whole margin (1 s). And close()'s stop(now=True) is not left
    # requested: the async app's next serving (a loop of its own) stopped at once. The
    # stop's warning says the settler ended with the loop, not "no answer by the stop's
    # deadline": no deadline was waited for.
    caplog.set_level(logging.WARNING, logger="qtasks.worker")
    died: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", died.append)
    app = QueueTasks()

    @app.task
    async def sabotage() -> None:
        def interrupt() -> None:
            raise KeyboardInterrupt

        asyncio.get_running_loop().call_soon(interrupt)

    with app:
        with pytest.raises(ComponentNotStartedError, match="event loop ended: KeyboardInterrupt"):
            app.add_task("sabotage", timeout=WAIT)
        with pytest.raises(ComponentNotStartedError, match="event loop ended: KeyboardInterrupt"):
            app.get("no-such-task")
    thread = app._portal_stop
    began = time.monotonic()
    app.close()  # returns: nothing to stop through the ended loop
    took = time.monotonic() - began
    assert thread is not None and not thread.is_alive()
    assert took < 0.5, f"close() took {took:.2f} s"
    assert asyncio.run(app.aio.stop_requested_within(0)) is False
    assert not app.aio._stop_now
    assert [(one.thread, one.exc_type) for one in died] == [(thread, KeyboardInterrupt)]
    warned = [r.getMessage() for r in caplog.records if r.name == "qtasks.worker"]
    assert len(warned) == 1, warned
    assert "the worker's settler had ended" in warned[0], warned
    assert "as the loop ends" in warned[0] and "deadline was waited for" in warned[0]
    assert warned[0].endswith(": results of finished tasks (1)"), warned
    assert "no answer by the stop's deadline" not in warned[0]
    with pytest.raises(ComponentNotStartedError, match="close\\(\\) it and make a new one"):
        app.get("no-such-task")
