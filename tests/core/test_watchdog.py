"""A blocking call inside ``async def`` is named by the loop watchdog (issue 14, item 5)."""

from __future__ import annotations

import logging
import threading
import time

import anyio
import anyio.lowlevel
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus

pytestmark = pytest.mark.anyio


async def test_a_task_that_blocks_the_loop_is_named_with_its_line_and_the_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = AsyncQueueTasks(config=QueueConfig(loop_stall_warning=0.2))

    @app.task
    async def hog() -> str:
        time.sleep(0.6)  # noqa: ASYNC251 - the mistake the watchdog is there to name
        return "done"

    with caplog.at_level(logging.WARNING, logger="qtasks.worker"):
        async with app:
            done = await app.add_task("hog", timeout=10)
            assert done.status is TaskStatus.SUCCESS
            with anyio.fail_after(5):
                while not any("runs again" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
                    await anyio.sleep(0.02)
    messages = [r.getMessage() for r in caplog.records if r.name == "qtasks.worker"]
    blocked = [m for m in messages if m.startswith("event loop blocked")]
    assert len(blocked) == 1, messages  # once per stall
    assert "by task 'hog' at " in blocked[0]
    assert f"{__file__}:" in blocked[0]
    assert "anyio.to_thread.run_sync" in blocked[0]
    assert any(m.startswith("event loop runs again after a stall of 0.") for m in messages)


async def test_a_busy_but_healthy_loop_reports_nothing(caplog: pytest.LogCaptureFixture) -> None:
    app = AsyncQueueTasks(config=QueueConfig(loop_stall_warning=0.2))

    @app.task
    async def polite() -> None:
        for _ in range(20):
            time.sleep(0.01)  # noqa: ASYNC251 - short blocking steps, each well under the limit
            await anyio.lowlevel.checkpoint()

    with caplog.at_level(logging.WARNING, logger="qtasks.worker"):
        async with app:
            for _ in range(3):
                await app.add_task("polite", timeout=10)
    assert not [r for r in caplog.records if "event loop" in r.getMessage()]


async def test_the_watchdog_can_be_turned_off() -> None:
    def watchdogs() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "qtasks-loop-watchdog"}

    before = watchdogs()
    async with AsyncQueueTasks(config=QueueConfig(loop_stall_warning=None)):
        assert watchdogs() <= before  # this app started none
    async with AsyncQueueTasks(config=QueueConfig(loop_stall_warning=0.2)):
        assert watchdogs() - before  # while the default one does
