"""A sync task of the async app that calls the app's coroutine methods (``app.add_task``,
``child.add_task``...) cannot await what they return: the call fails the task at once with
:class:`AsyncCallInThreadError`, which says what to call instead, rather than losing the
enqueue (Python only warned, later, that a coroutine was never awaited)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import pytest

from qtasks import AsyncQueueTasks, TaskStatus
from qtasks.errors import AsyncCallInThreadError, PermanentError

pytestmark = pytest.mark.anyio
WAIT = 10


@pytest.mark.parametrize(
    "call",
    [
        lambda app, child: app.add_task("child"),
        lambda app, child: app.enqueue("child"),
        lambda app, child: app.add_tasks([child.s()]),
        lambda app, child: child.add_task(),
        lambda app, child: child.enqueue(),
        lambda app, child: child.add_tasks([()]),
    ],
    ids=[
        "app.add_task",
        "app.enqueue",
        "app.add_tasks",
        "task.add_task",
        "task.enqueue",
        "task.add_tasks",
    ],
)
async def test_a_coroutine_method_called_in_a_sync_task_fails_it_clearly(
    call: Callable[[AsyncQueueTasks, Any], Any],
) -> None:
    app = AsyncQueueTasks()
    ran = threading.Event()

    @app.task
    def child() -> None:
        ran.set()

    @app.task(retry=2)
    def fan() -> None:
        call(app, child)

    async with app:
        record = await app.add_task("fan", timeout=WAIT)
    assert record.status is TaskStatus.ERROR
    assert record.attempt == 1  # a PermanentError: no retry heals it
    assert record.error is not None and "AsyncCallInThreadError" in record.error
    assert record.traceback is not None
    assert "self.add_task" in record.traceback
    assert "anyio.from_thread.run" in record.traceback
    assert not ran.is_set()
    assert issubclass(AsyncCallInThreadError, PermanentError)


async def test_the_ways_the_error_names_work_in_a_sync_task() -> None:
    app = AsyncQueueTasks()
    done: list[str] = []

    @app.task
    def child(tag: str) -> None:
        done.append(tag)

    @app.task
    def fan() -> None:
        first = anyio.from_thread.run(app.add_task, "child", "from_thread")
        anyio.from_thread.run(first.wait_result, WAIT)
        anyio.from_thread.run(lambda: child.add_task("from_thread_lambda", timeout=WAIT))

    async with app:
        record = await app.add_task("fan", timeout=WAIT)
    assert record.status is TaskStatus.SUCCESS, record.traceback
    assert done == ["from_thread", "from_thread_lambda"]


async def test_a_coroutine_made_in_another_thread_for_the_apps_loop_still_runs() -> None:
    app = AsyncQueueTasks()
    done = anyio.Event()

    @app.task
    async def child() -> None:
        done.set()

    async with app:
        loop = asyncio.get_running_loop()

        def elsewhere() -> None:  # a plain thread, not a task's: its coroutine is awaited
            asyncio.run_coroutine_threadsafe(app.add_task("child"), loop).result(WAIT)

        await anyio.to_thread.run_sync(elsewhere)
        with anyio.fail_after(WAIT):
            await done.wait()
