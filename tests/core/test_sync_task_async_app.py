"""A sync task of the async app that calls the app's coroutine methods (``app.add_task``,
``child.add_task``...) cannot await what they return: the call fails the task at once with
:class:`AsyncCallInThreadError`, which says what to call instead, rather than losing the
enqueue (Python only warned, later, that a coroutine was never awaited)."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import pytest

from qtasks import AsyncQueueTasks, QueueTasks, TaskStatus
from qtasks.errors import AsyncCallInThreadError, PermanentError
from qtasks.task import AsyncTask

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

    @app.task(echo=True)
    def fan_echo(self: Any) -> str:
        record = self.add_task("child", "echo_self")  # blocks: a Task, no coroutine
        return str(record.wait_result(WAIT).status)  # a Task of the thread: it blocks too

    async with app:
        record = await app.add_task("fan", timeout=WAIT)
        echoed = await app.add_task("fan_echo", timeout=WAIT)
    assert record.status is TaskStatus.SUCCESS, record.traceback
    assert echoed.status is TaskStatus.SUCCESS, echoed.traceback
    assert echoed.returning == "success"
    assert done == ["from_thread", "from_thread_lambda", "echo_self"]


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


APP_CALLS: dict[str, Callable[[AsyncQueueTasks, str], Any]] = {
    "add_task": lambda app, uuid: app.add_task("child"),
    "enqueue": lambda app, uuid: app.enqueue("child"),
    "add_tasks": lambda app, uuid: app.add_tasks([]),
    "start": lambda app, uuid: app.start(),
    "aclose": lambda app, uuid: app.aclose(),
    "serve": lambda app, uuid: app.serve(),
    "stop_requested_within": lambda app, uuid: app.stop_requested_within(0.1),
    "wait_for_stop": lambda app, uuid: app.wait_for_stop(),
    "run_workflow": lambda app, uuid: app.run_workflow(app.signature("child")),
    "get_workflow": lambda app, uuid: app.get_workflow(uuid),
    "wait_workflow": lambda app, uuid: app.wait_workflow(uuid, 1),
    "cancel_workflow": lambda app, uuid: app.cancel_workflow(uuid),
    "get_workflow_records": lambda app, uuid: app.get_workflow_records(uuid),
    "get": lambda app, uuid: app.get(uuid),
    "wait": lambda app, uuid: app.wait(uuid, 1),
    "stream": lambda app, uuid: app.stream(uuid, 1),
    "cancel": lambda app, uuid: app.cancel(uuid),
    "dead_letters": lambda app, uuid: app.dead_letters(),
    "requeue_dead_letters": lambda app, uuid: app.requeue_dead_letters(),
    "config_get": lambda app, uuid: app.config_get("ns", "key"),
    "config_set": lambda app, uuid: app.config_set("ns", "key", 1),
    "inspect": lambda app, uuid: app.inspect(),
    "ping": lambda app, uuid: app.ping(),
    "flush_all": lambda app, uuid: app.flush_all(),
}
"""A call of each public coroutine method of the async app (see the test below that
nothing is missing), as a sync task would make it."""


def _returns_awaitable(value: Any) -> bool:
    """Whether a method (seen through its decorator) gives something to await or iterate
    asynchronously: an ``async def``, an async generator, or a plain def returning a
    coroutine (``add_task``)."""
    func = inspect.unwrap(value)
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        return True
    returns = str(inspect.signature(func).return_annotation)
    return returns.startswith(("Coroutine[", "AsyncGenerator[", "AsyncIterator["))


def _public_coroutine_methods(cls: type) -> set[str]:
    return {
        name
        for name, value in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and _returns_awaitable(value)
    }


def test_the_calls_cover_every_public_coroutine_method_of_the_app() -> None:
    assert _public_coroutine_methods(AsyncQueueTasks) == set(APP_CALLS)


@pytest.mark.parametrize("method", sorted(APP_CALLS))
async def test_every_coroutine_method_of_the_app_refuses_a_sync_tasks_thread(
    method: str,
) -> None:
    app = AsyncQueueTasks()
    caught: list[BaseException] = []

    @app.task
    def child() -> None:
        pass

    @app.task
    def probe(uuid: str) -> None:
        try:
            APP_CALLS[method](app, uuid)
        except BaseException as exc:
            caught.append(exc)

    async with app:
        done = await app.add_task("child", timeout=WAIT)
        record = await app.add_task("probe", done.uuid, timeout=WAIT)
    assert record.status is TaskStatus.SUCCESS, record.traceback
    assert len(caught) == 1, "the call returned instead of raising"
    error = caught[0]
    assert isinstance(error, AsyncCallInThreadError)
    assert error.method == method
    assert f"{method}(...) was called in a sync task" in str(error)
    assert f"anyio.from_thread.run(app.{method}, ...)" in str(error)
    blocks = hasattr(QueueTasks, method)  # serve, wait_for_stop...: the sync app has none
    assert (f"use the sync app, whose `QueueTasks.{method}` blocks" in str(error)) is blocks


RECORD_CALLS: dict[str, Callable[[AsyncTask], Any]] = {
    "wait_result": lambda record: record.wait_result(1),
    "wait_result_async": lambda record: record.wait_result_async(1),
    "refresh": lambda record: record.refresh(),
    "stream": lambda record: record.stream(1),
}


def test_the_record_calls_cover_its_coroutine_methods() -> None:
    assert _public_coroutine_methods(AsyncTask) == set(RECORD_CALLS)


@pytest.mark.parametrize("method", sorted(RECORD_CALLS))
async def test_a_records_coroutine_methods_refuse_a_sync_tasks_thread(method: str) -> None:
    app = AsyncQueueTasks("records")
    caught: list[BaseException] = []

    @app.task
    def child() -> int:
        return 1

    @app.task
    def probe() -> None:
        record = anyio.from_thread.run(app.add_task, "child")  # what works
        try:
            RECORD_CALLS[method](record)
        except BaseException as exc:
            caught.append(exc)

    async with app:
        record = await app.add_task("probe", timeout=WAIT)
    assert record.status is TaskStatus.SUCCESS, record.traceback
    assert len(caught) == 1 and isinstance(caught[0], AsyncCallInThreadError)
    assert f"app 'records': record.{method}(...)" in str(caught[0])
    assert f"anyio.from_thread.run(record.{method}, ...)" in str(caught[0])
