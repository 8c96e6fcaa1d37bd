"""A generator task that runs more than once, run on the memory and Redis components (review
r19 #7): a run that starts over is marked in the stream (``StepsRestarted``), and a run whose
lease was lost cannot add steps to the newer run's stream (fenced as its settle is). The
real-process case (a worker killed with SIGKILL mid-stream, on Redis) is in
tests/redis/test_redis_stream_restart.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import pytest

from qtasks import AsyncQueueTasks, StepsRestarted, TaskStatus
from qtasks.context import AsyncTaskHandle

WAIT = 10


async def a_retried_generator_is_marked_where_it_starts_over(app: AsyncQueueTasks) -> None:
    """The failed run's steps stay in the stream (they happened); the retry's first step is
    preceded by ``StepsRestarted(2)``; the result is the retry's own steps."""
    runs = 0

    @app.task(retry=1, retry_backoff=0)
    async def count() -> AsyncIterator[int]:
        nonlocal runs
        runs += 1
        for i in range(3):
            if runs == 1 and i == 2:
                raise ConnectionError("lost the upstream")
            yield i

    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("count")
            seen = [step async for step in task.stream()]
            final = await task.wait_result(timeout=WAIT)
    assert seen == [0, 1, StepsRestarted(2), 0, 1, 2]
    assert (final.status, final.returning, final.steps) == (TaskStatus.SUCCESS, [0, 1, 2], 5)


async def a_step_of_a_run_whose_lease_was_lost_is_refused_and_the_run_stops(
    app: AsyncQueueTasks, caplog: pytest.LogCaptureFixture
) -> None:
    """A newer delivery began the task (as after a lost lease) while the old run was between
    two steps: the old run's next step is refused, nothing of it reaches the stream, the run
    stops there (its generator is closed, its ``finally`` runs), its worker logs that the
    lease was lost and goes on serving; the newer run's record is left as it is."""
    between = anyio.Event()
    go_on = anyio.Event()
    closed = anyio.Event()
    after_refusal: list[int] = []

    @app.task
    async def produce() -> AsyncIterator[int]:
        try:
            yield 0
            between.set()
            await go_on.wait()
            yield 1
            after_refusal.append(1)  # never: the step was refused, the run stopped
            yield 2
        finally:
            closed.set()

    @app.task
    async def ping() -> str:
        return "pong"

    with caplog.at_level(logging.WARNING, logger="qtasks"), anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("produce")
            await between.wait()
            stored = await app.storage.get(task.uuid)
            assert stored is not None and stored.token is not None
            newer = stored.copy()
            newer.token, newer.worker = "a-newer-delivery", "another-worker"
            await app.storage.begin(newer)  # what a redelivery elsewhere writes
            go_on.set()
            await closed.wait()
            with anyio.fail_after(5):
                while app.worker.running:  # noqa: ASYNC110 - the stale run winds down
                    await anyio.sleep(0.01)
            assert (await app.add_task("ping", timeout=WAIT)).returning == "pong"
            now = await app.storage.get(task.uuid)
            assert now is not None
            assert (now.status, now.token, now.steps) == (
                TaskStatus.PROCESS,
                "a-newer-delivery",
                1,
            )
            ended = now.copy()
            ended.status = TaskStatus.SUCCESS
            assert await app.storage.save(ended, fence="a-newer-delivery")
            assert [step async for step in task.stream(timeout=WAIT)] == [0]
    assert after_refusal == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("was lost" in m and task.uuid in m for m in messages), messages
    assert not [m for m in messages if "worker failed" in m]


async def a_step_after_a_cancel_is_not_stored_and_the_run_ends_cancelled(
    app: AsyncQueueTasks, caplog: pytest.LogCaptureFixture
) -> None:
    """The task is cancelled as its generator yields (the cancel is stored before the step
    that follows it): that step is refused, the record stays ``cancel`` with the steps of
    before (neither its count nor the stream takes the late one), the run stops there and is
    settled as cancelled at once (its message acked, not left to its lease as a lost one
    would be: no "lease ... lost" warning), and the worker goes on serving."""
    closed = anyio.Event()
    after_refusal: list[int] = []

    @app.task(echo=True)
    async def produce(handle: AsyncTaskHandle) -> AsyncIterator[int]:
        try:
            yield 0
            # What app.cancel from another process stores, right before the next step; no
            # checkpoint between the cancel's return and the step's write.
            await app.storage.cancel(handle.ctx.task_uuid, "not needed any more")
            yield 1
            after_refusal.append(1)
            yield 2
        finally:
            closed.set()

    @app.task
    async def ping() -> str:
        return "pong"

    with caplog.at_level(logging.WARNING, logger="qtasks"), anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("produce")
            final = await task.wait_result(timeout=WAIT)
            await closed.wait()
            assert (await app.add_task("ping", timeout=WAIT)).returning == "pong"
            assert [step async for step in task.stream(timeout=WAIT)] == [0]
            with anyio.fail_after(5):
                while app.worker.running:  # noqa: ASYNC110 - the cancelled run winds down
                    await anyio.sleep(0.01)
            now = await app.storage.get(task.uuid)
    assert after_refusal == []
    assert (final.status, final.cancel_reason) == (TaskStatus.CANCEL, "not needed any more")
    assert now is not None and (now.status, now.steps) == (TaskStatus.CANCEL, 1)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "was lost" in m or "worker failed" in m], messages
