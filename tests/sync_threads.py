"""Sync tasks whose thread runs on after ``max_time`` or a cancel gave up on it: the scenario
of a concurrency slot kept until the thread returns, on any components (tests/core,
tests/redis)."""

from __future__ import annotations

import threading

import anyio

from qtasks import AsyncQueueTasks, TaskStatus


async def waits(event: threading.Event, seconds: float) -> bool:
    """Whether ``event`` is set within ``seconds`` (waited for in a thread)."""
    return await anyio.to_thread.run_sync(event.wait, seconds)


async def a_slot_is_kept_while_its_thread_runs(app: AsyncQueueTasks, how: str) -> str:
    """A sync task of a ``max_concurrency=1`` key blocks in its thread past its ``max_time``
    (``how="max_time"``) or its cancel (``"cancel"``): its record is final at once, yet a
    second task of the key starts only once the first body returns, however long past the
    lease that is (its slot is renewed meanwhile). Returns the first task's uuid."""
    gate, first_runs, second_runs = threading.Event(), threading.Event(), threading.Event()

    @app.task(
        concurrency_key="account",
        max_concurrency=1,
        max_time=0.3 if how == "max_time" else None,
    )
    def call_api(account: str, first: bool) -> None:
        if first:
            first_runs.set()
            gate.wait(30)  # a blocking call that hangs
        else:
            second_runs.set()

    try:
        async with app:
            first = await app.add_task("call_api", "acme", True)
            assert await waits(first_runs, 10)
            if how == "cancel":
                await app.cancel(first.uuid, "enough")
            ended = await app.wait(first.uuid, timeout=10)
            status = TaskStatus.ERROR if how == "max_time" else TaskStatus.CANCEL
            assert ended.status is status, ended
            second = await app.add_task("call_api", "acme", False)
            assert not await waits(second_runs, 2 * app.config.lease)
            gate.set()
            done = await app.wait(second.uuid, timeout=15)
            assert done.status is TaskStatus.SUCCESS, done
    finally:
        gate.set()
    return first.uuid
