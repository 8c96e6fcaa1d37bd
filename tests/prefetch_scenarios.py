"""Long tasks and prefetch (docs/tasks.md, "Long tasks"), run on each broker: with
``prefetch = 0``, or with the default prefetch until runs are seen to be short (qtasks.hold), a
worker whose slots are all busy holds nothing more, so the next task goes to an idle worker at
once instead of waiting in a busy worker's buffer behind a long task."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio

from qtasks import AsyncQueueTasks, QueueConfig

Components = Callable[[], dict[str, Any]]
"""Fresh broker, storage (and global config) keyword arguments of one worker's app, every
worker's on the same queue and storage."""


class Started:
    """Which worker started each task, and an event per task set when it starts."""

    def __init__(self, *tasks: int) -> None:
        self.by: dict[int, str] = {}
        self.events = {i: anyio.Event() for i in tasks}
        self._noted = anyio.Event()

    def note(self, i: int, worker: str) -> None:
        self.by[i] = worker
        self.events[i].set()
        self._noted.set()
        self._noted = anyio.Event()

    async def until(self, done: Callable[[], bool], seconds: float) -> None:
        """Wait until ``done()`` after a task started, at most ``seconds``."""
        with anyio.fail_after(seconds):
            while not done():
                await self._noted.wait()

    async def wait(self, i: int, seconds: float) -> str:
        with anyio.fail_after(seconds):
            await self.events[i].wait()
        return self.by[i]


def _worker(
    name: str,
    components: Components,
    started: Started,
    release: anyio.Event,
    prefetch: int | None = 0,
) -> AsyncQueueTasks:
    app = AsyncQueueTasks(
        name,
        config=QueueConfig(max_tasks_process=1, prefetch=prefetch, plugins_disabled=["*"]),
        **components(),
    )

    @app.task
    async def long(i: int) -> str:
        started.note(i, name)
        await release.wait()
        return name

    return app


async def next_task_goes_to_an_idle_worker(components: Components) -> None:
    """Two workers of one slot each, ``prefetch = 0``: while the first runs a long task, the
    second task starts on the other worker."""
    started = Started(1, 2)
    release = anyio.Event()
    first = _worker("first", components, started, release)
    second = _worker("second", components, started, release)
    async with AsyncExitStack() as stack:
        for app in (first, second):
            await stack.enter_async_context(app)
        one = await first.add_task("long", 1)
        busy = await started.wait(1, 10)
        # The worker running task 1 has its one slot busy: with prefetch 0 it holds nothing
        # more, so task 2 starts on the other worker while task 1 still runs.
        two = await first.add_task("long", 2)
        assert await started.wait(2, 10) != busy
        assert not release.is_set()
        release.set()
        results = [(await first.wait(t.uuid, 10)).returning for t in (one, two)]
    assert sorted(results) == ["first", "second"]


async def default_prefetch_leaves_waiting_tasks_to_a_new_worker(components: Components) -> None:
    """Three workers of one slot each, the default prefetch: four long tasks enqueued while
    two workers serve take one each, the other two wait in the queue (no run has ended yet,
    so neither worker holds anything beyond its slot), and a third worker started then gets
    one of them while the first two still run. With a prefetch held the two busy workers
    took all four between them."""
    tasks = (1, 2, 3, 4)
    started = Started(*tasks)
    release = anyio.Event()
    first, second, third = (
        _worker(name, components, started, release, prefetch=None)
        for name in ("first", "second", "third")
    )
    async with AsyncExitStack() as stack:
        for app in (first, second):
            await stack.enter_async_context(app)
        records = [await first.add_task("long", i) for i in tasks]
        await started.until(lambda: len(started.by) >= 2, 10)
        assert sorted(started.by.values()) == ["first", "second"]
        await stack.enter_async_context(third)
        await started.until(lambda: "third" in started.by.values(), 10)
        assert not release.is_set()
        release.set()
        for record in records:
            assert (await first.wait(record.uuid, 10)).returning is not None
