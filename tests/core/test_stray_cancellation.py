"""A ``CancelledError`` that code under the worker raises of its own (it awaited something that
was cancelled, a library let an inner cancellation escape) is that code's failure, not the
worker's stop: before, it ended the runner, or the whole serving loop, without a word, and the
message stopped every worker it was delivered to. The worker's real teardown still leaves the
running task unsettled. The scenarios shared with Redis are in ``stray_scenarios.py``."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from stray_scenarios import (
    WAIT,
    a_cancelled_task_raising_a_fresh_cancellation_is_cancelled_and_the_worker_serves_on,
    a_task_raising_its_own_cancellation_fails_and_the_worker_serves_on,
    replace_the_cancellation,
)

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus

pytestmark = pytest.mark.anyio


def one_at_a_time(**components: Any) -> AsyncQueueTasks:
    config = QueueConfig(
        max_tasks_process=1,
        prefetch=1,
        lease=30.0,
        shutdown_grace=1.0,
        retry_backoff=0.01,
        plugins_disabled=["*"],
    )
    return AsyncQueueTasks(config=config, **components)


async def test_a_task_raising_its_own_cancellation_fails_and_the_worker_serves_on() -> None:
    await a_task_raising_its_own_cancellation_fails_and_the_worker_serves_on(one_at_a_time())


async def test_a_cancelled_task_raising_a_fresh_cancellation_is_cancelled() -> None:
    await a_cancelled_task_raising_a_fresh_cancellation_is_cancelled_and_the_worker_serves_on(
        one_at_a_time()
    )


async def test_the_worker_torn_down_while_a_task_runs_leaves_it_unsettled() -> None:
    """The scope around the worker cancelled while tasks run (one that lets the cancellation
    through, one that answers it with a CancelledError of its own): neither is settled, their
    records say ``process`` and their messages are not acked (they come back after the lease,
    or are handed back by the consumer's exit)."""
    app = one_at_a_time()
    app.config.max_tasks_process = 2
    running = [anyio.Event(), anyio.Event()]

    @app.task
    async def waits(i: int) -> None:
        running[i].set()
        await anyio.sleep_forever()

    @app.task
    async def answers(i: int) -> None:
        running[i].set()
        await replace_the_cancellation()

    async with AsyncExitStack() as stack:
        await app.broker.start(stack, app.config)
        await app.storage.start(stack, app.config)
        await app.global_config.start(stack, app.config)
        tasks = [await app.add_task("waits", 0), await app.add_task("answers", 1)]
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(app.worker.run, app)
                for event in running:
                    await event.wait()
                tg.cancel_scope.cancel()
        for task in tasks:
            record = await app.storage.get(task.uuid)
            assert record is not None and record.status is TaskStatus.PROCESS, record
        stats = await app.broker.stats()
        assert stats.in_flight + sum(stats.ready_by_priority.values()) == 2
