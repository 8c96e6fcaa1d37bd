"""A sync app served through its async app (``qtasks run`` calls ``app.aio.run_forever()``;
a script may ``async with app.aio:``): the worker's loop is not the sync app's background
loop, yet a sync task's blocking calls (``child.add_task(..., timeout=)``, ``app.get``,
``stream``, ``wait_result``) go to it and work, as they do under ``with app:``. They were
refused with "started in an event loop that is still running in another thread" (found by
the walk-through: a fan-out task under ``qtasks run`` failed at once). An ``async def`` task's
blocking call still says what to await."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from qtasks import QueueTasks, TaskStatus
from qtasks.errors import ComponentError, ComponentNotStartedError


def make_app() -> tuple[QueueTasks, dict[str, Any]]:
    app = QueueTasks("served-async")
    outcome: dict[str, Any] = {}

    @app.task
    def child(x: int) -> int:
        return x * 2

    @app.task
    def steps(n: int) -> Iterator[int]:
        yield from range(n)

    @app.task
    def fan_out(x: int) -> list[Any]:
        done = child.add_task(x, timeout=10)
        queued = app.add_task("child", x + 1)
        stored = app.get(done.uuid)
        streamed = list(app.add_task("steps", 3).stream(timeout=10))
        return [
            done.returning,
            queued.wait_result(timeout=10).returning,
            stored is not None and stored.status.value,
            streamed,
        ]

    @app.task
    async def blocks_its_loop() -> None:
        child.add_task(1)

    @app.task
    def driver() -> None:
        try:
            outcome["fan_out"] = app.add_task("fan_out", 5, timeout=10)
            outcome["async"] = app.add_task("blocks_its_loop", timeout=10)
        finally:
            app.stop()

    return app, outcome


def test_a_sync_tasks_blocking_calls_reach_the_loop_serving_the_async_app() -> None:
    app, outcome = make_app()

    async def main() -> None:
        async with app.aio:
            await app.aio.add_task("driver")
            with anyio.fail_after(30):
                await app.aio.wait_for_stop()

    anyio.run(main)
    fan_out = outcome["fan_out"]
    assert fan_out.status is TaskStatus.SUCCESS, fan_out.error
    assert fan_out.returning == [10, 12, "success", [0, 1, 2]]
    failed = outcome["async"]
    assert failed.status is TaskStatus.ERROR
    assert failed.error.startswith("ComponentError: app 'served-async': a blocking call")
    assert "`await app.aio.add_task(...)`" in failed.error
    app.close()


def test_run_forever_of_the_async_app_serves_sync_fan_out() -> None:
    app, outcome = make_app()

    async def enqueue() -> str:
        return (await app.aio.add_task("driver")).uuid

    # What `qtasks run` does: the async app's run_forever, in a loop of its own.
    anyio.run(enqueue)
    app.aio.run_forever()
    fan_out = outcome["fan_out"]
    assert fan_out.status is TaskStatus.SUCCESS, fan_out.error
    assert fan_out.returning == [10, 12, "success", [0, 1, 2]]
    app.close()


def test_a_call_sent_to_a_loop_that_ends_without_running_it_raises() -> None:
    """A sync task's thread still calling while the serving loop ends (the worker's process
    exiting) is told so, rather than blocked for ever on a call the loop will never run."""
    app = QueueTasks("ended")
    loop = asyncio.new_event_loop()  # not running: it will never run the call
    try:
        with pytest.raises(ComponentNotStartedError, match="was closed while this call waited"):
            app._call_in(loop, app.aio.get, "0" * 32)
    finally:
        loop.close()
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(ComponentNotStartedError):
        app._call_in(loop, app.aio.get, "0" * 32)
    app.close()


def test_a_blocking_call_inside_async_with_app_aio_says_what_to_await() -> None:
    """Code inside ``async with app.aio:`` runs on the loop serving the app: a blocking call of
    the sync app there would wait for itself. It was refused as "started in an event loop
    that is still running in another thread", which named neither the cause nor the fix."""
    app, _ = make_app()

    async def main() -> None:
        async with app.aio:
            with pytest.raises(ComponentError) as raised:
                app.add_task("child", 1)
            assert "inside `async with app.aio:`" in str(raised.value)
            assert "`await app.aio.add_task(...)`" in str(raised.value)
            assert (await app.aio.add_task("child", 2, timeout=10)).returning == 4

    anyio.run(main)
    app.close()
