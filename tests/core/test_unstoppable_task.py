"""A task that catches its cancellation and goes on: the worker cannot end while it runs, and
says so (before, a stop hung for ever without a word after "stopping")."""

from __future__ import annotations

import logging

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig

pytestmark = pytest.mark.anyio


async def test_a_task_that_swallows_its_cancellation_is_named_past_the_stops_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = AsyncQueueTasks(
        "unstoppable", config=QueueConfig(shutdown_grace=0.1, plugins_disabled=["*"])
    )
    started = anyio.Event()
    release = anyio.Event()

    @app.task
    async def stubborn() -> None:
        started.set()
        while True:
            try:
                await anyio.sleep(60)
            except BaseException:  # what the test is about: a cancellation swallowed
                if release.is_set():
                    raise

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "cannot stop" in r.getMessage()]

    caplog.set_level(logging.ERROR, logger="qtasks.worker")
    async with app:
        task = await app.add_task("stubborn")
        with anyio.fail_after(5):
            await started.wait()
        app.worker.stop()
        try:
            with anyio.fail_after(10):
                while not said():  # noqa: ASYNC110 - a log record of the worker's stop
                    await anyio.sleep(0.02)
        finally:
            release.set()  # else the app's exit waits for the task for ever
    assert said() == [
        f"the worker cannot stop: task stubborn ({task.uuid}) did not end when cancelled (its "
        "code catches the cancellation and goes on: re-raise it); what it holds is handed back "
        "or left to its lease; end the process (SIGKILL)"
    ]
