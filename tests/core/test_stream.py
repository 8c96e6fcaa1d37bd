"""Following a generator task: the async stream on the memory components (the scenarios are in
``stream_scenarios.py``, shared with Redis), and the errors of the sync app's stream and of a
sync task's; the sync app closed while other threads wait on it (review r19 #2, #8, #9)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from stream_scenarios import (
    WAIT,
    NotedWait,
    a_consumer_slower_than_the_deadline_gets_task_timeout_error,
    breaking_out_of_a_live_stream_leaves_the_app_clean,
    closing_a_stream_inside_another_scope_is_clean,
    stream_errors_are_those_of_wait,
)

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks
from qtasks.context import SyncTaskHandle
from qtasks.errors import ComponentNotStartedError, TaskNotFoundError, TaskTimeoutError


@pytest.mark.anyio
async def test_breaking_out_of_a_live_stream_leaves_the_app_clean() -> None:
    await breaking_out_of_a_live_stream_leaves_the_app_clean(AsyncQueueTasks())


@pytest.mark.anyio
async def test_closing_a_stream_inside_another_scope_is_clean() -> None:
    await closing_a_stream_inside_another_scope_is_clean(AsyncQueueTasks())


@pytest.mark.anyio
async def test_a_consumer_slower_than_the_deadline_gets_task_timeout_error() -> None:
    await a_consumer_slower_than_the_deadline_gets_task_timeout_error(AsyncQueueTasks())


@pytest.mark.anyio
async def test_stream_errors_are_those_of_wait() -> None:
    await stream_errors_are_those_of_wait(AsyncQueueTasks())


def test_sync_streams_raise_the_errors_of_wait() -> None:
    """The sync app's stream and a sync task's (through its thread client) raise
    :class:`TaskTimeoutError` and :class:`TaskNotFoundError` as the async one does."""
    app = QueueTasks()
    release = threading.Event()
    seen: dict[str, Any] = {}

    @app.task
    def held() -> Any:
        yield 0
        release.wait(WAIT)
        yield 1

    @app.task(echo=True)
    def follower(self: SyncTaskHandle, uuid: str) -> None:
        task = self.ctx.get_task(uuid)
        assert task is not None
        got: list[int] = []
        try:
            for step in task.stream(timeout=0.2):
                got.append(step)
        except TaskTimeoutError as exc:
            seen["in task timeout"] = (got, exc.uuid)
        try:
            list(dataclasses.replace(task, uuid="no-such-task").stream(timeout=WAIT))
        except TaskNotFoundError as exc:
            seen["in task unknown"] = exc.uuid

    try:
        with app:
            task = app.add_task("held")
            with pytest.raises(TaskTimeoutError):
                list(task.stream(timeout=0.2))
            with pytest.raises(TaskNotFoundError):
                list(app.stream("no-such-task", timeout=WAIT))
            done = app.add_task("follower", task.uuid, timeout=WAIT)
            assert done.error is None
            release.set()
            assert list(task.stream(timeout=WAIT)) == [0, 1]
    finally:
        app.close()
    assert seen == {"in task timeout": ([0], task.uuid), "in task unknown": "no-such-task"}


def test_close_while_threads_wait_raises_component_not_started_in_them() -> None:
    """``close()`` while other threads block in ``wait_result()`` and ``stream()``: each gets
    :class:`ComponentNotStartedError` (an ``Exception``), not a ``CancelledError`` (asyncio's,
    from the stream, is a ``BaseException`` an ``except Exception`` lets through)."""
    storage = NotedWait()
    app = QueueTasks(storage=storage, config=QueueConfig(shutdown_grace=0.2))
    streaming = threading.Event()

    @app.task
    async def forever() -> AsyncIterator[int]:
        yield 0
        await anyio.sleep_forever()

    outcome: dict[str, BaseException | None] = {}

    def waiter(kind: str, task: Any) -> None:
        try:
            if kind == "wait":
                task.wait_result()
            else:
                for _ in task.stream():
                    streaming.set()
            outcome[kind] = None
        except BaseException as exc:
            outcome[kind] = exc

    app.__enter__()
    try:
        task = app.add_task("forever")
        threads = [threading.Thread(target=waiter, args=(k, task)) for k in ("wait", "stream")]
        for thread in threads:
            thread.start()
        assert storage.waiting.wait(WAIT) and streaming.wait(WAIT)
    finally:
        app.close()
    for thread in threads:
        thread.join(WAIT)
    assert set(outcome) == {"wait", "stream"}, "a waiter is still blocked"
    for kind, exc in outcome.items():
        assert isinstance(exc, ComponentNotStartedError), (kind, repr(exc))
        assert "was closed while this call waited" in str(exc)
