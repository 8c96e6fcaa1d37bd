"""Following a generator task with the async ``stream()``, run on the memory and Redis
components: a consumer that stops early, one slower than the deadline, and the errors it shares
with ``wait()``. Before review r19 #2 the stream kept a cancel scope open across ``yield``, so
each of the first three broke the app (a ``RuntimeError`` on leaving ``async with app``, or a
``CancelledError`` in the consumer's own code)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import anyio
import pytest

from qtasks import AsyncQueueTasks, MemoryStorage, TaskRecord, TaskStatus
from qtasks.errors import TaskNotFoundError, TaskTimeoutError

WAIT = 10


def register(app: AsyncQueueTasks) -> anyio.Event:
    """``held``: yields 0, then waits until the returned event is set, then yields 1."""
    release = anyio.Event()

    @app.task
    async def held() -> AsyncIterator[int]:
        yield 0
        await release.wait()
        yield 1

    return release


async def collect(steps: AsyncIterator[int], into: list[int], pause: float = 0.0) -> None:
    """Append each step to ``into``, then take ``pause`` s over it (the consumer's own work)."""
    async for step in steps:
        into.append(step)
        if pause:
            await anyio.sleep(pause)


async def breaking_out_of_a_live_stream_leaves_the_app_clean(app: AsyncQueueTasks) -> None:
    """``break`` after the first step while the task still runs: the dropped stream is closed
    later, in another task, and leaving the app afterwards raises nothing."""
    release = register(app)
    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("held")
            async for step in task.stream():
                assert step == 0
                break
            release.set()
            final = await task.wait_result(timeout=WAIT)
    assert (final.status, final.returning) == (TaskStatus.SUCCESS, [0, 1])


async def closing_a_stream_inside_another_scope_is_clean(app: AsyncQueueTasks) -> None:
    """``aclose()`` after the first step, under a scope the consumer entered after it."""
    release = register(app)
    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("held")
            steps = task.stream()
            assert await anext(steps) == 0
            with anyio.move_on_after(WAIT):
                await steps.aclose()
            release.set()
            final = await task.wait_result(timeout=WAIT)
    assert final.status is TaskStatus.SUCCESS


async def a_consumer_slower_than_the_deadline_gets_task_timeout_error(
    app: AsyncQueueTasks,
) -> None:
    """The deadline never cancels the consumer's own await between steps; the stream raises
    :class:`TaskTimeoutError` where it has to wait for the task past it."""
    release = register(app)
    timeout = 0.2
    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("held")
            got: list[int] = []
            with pytest.raises(TaskTimeoutError) as caught:
                await collect(task.stream(timeout=timeout), got, pause=timeout * 2)
            assert got == [0]
            assert (caught.value.uuid, caught.value.timeout) == (task.uuid, timeout)
            release.set()
            final = await task.wait_result(timeout=WAIT)
    assert final.status is TaskStatus.SUCCESS


async def stream_errors_are_those_of_wait(app: AsyncQueueTasks) -> None:
    """A stalled task times out with :class:`TaskTimeoutError` (not a bare ``TimeoutError``),
    an unknown uuid raises :class:`TaskNotFoundError`, as ``wait()`` does."""
    release = register(app)
    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("held")
            got: list[int] = []
            with pytest.raises(TaskTimeoutError):
                await collect(task.stream(timeout=0.2), got)
            assert got == [0]
            with pytest.raises(TaskNotFoundError) as missing:
                async for _ in app.stream("no-such-task", timeout=WAIT):
                    pass
            assert missing.value.uuid == "no-such-task"
            with pytest.raises(TaskNotFoundError):
                await app.wait("no-such-task", WAIT)
            release.set()
            assert [step async for step in task.stream(timeout=WAIT)] == [0, 1]


class NotedWait(MemoryStorage):
    """Sets ``waiting`` once a ``wait`` is under way (so the test closes the app only then)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    async def wait(self, uuid: str, timeout: float | None) -> TaskRecord:
        self.waiting.set()
        return await super().wait(uuid, timeout)
