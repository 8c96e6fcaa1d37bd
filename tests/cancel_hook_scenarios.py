"""``qtasks_task_cancelled`` fires once per cancelled task, across the process that cancels and
the worker, whatever the task's state at the cancel: queued, claimed and waiting in the worker,
or running. Shared by the in-memory tests (tests/core/test_cancel_hook.py) and the Redis ones
(tests/redis/test_redis_cancel_hook.py).

``producer`` and ``worker`` are two apps on one backend, as two processes would be: the
producer only enqueues and cancels, the worker serves (one runner, so a task can be made to
wait behind another).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, TaskStatus, hookimpl
from qtasks.worker import QueueWorker


class Cancels:
    """The ``qtasks_task_cancelled`` calls one app makes: ``(uuid, reason)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fired = anyio.Event()

    @hookimpl
    def qtasks_task_cancelled(self, record: Any, reason: str) -> None:
        self.calls.append((record.uuid, reason))
        self.fired.set()


def counted(app: AsyncQueueTasks) -> Cancels:
    cancels = Cancels()
    app.add_plugin(cancels, name="cancels")
    return cancels


def hears_cancels(app: AsyncQueueTasks) -> dict[str, anyio.Event]:
    """An event per uuid, set when ``app``'s worker hears of its cancel (the cancel feed)."""
    worker = app.worker
    assert isinstance(worker, QueueWorker)
    heard: dict[str, anyio.Event] = {}
    cancel_local = worker.cancel_local

    def noted(uuid: str, reason: str) -> bool:
        found = cancel_local(uuid, reason)
        heard.setdefault(uuid, anyio.Event()).set()
        return found

    worker.cancel_local = noted  # type: ignore[method-assign]  # notes what the feed tells
    return heard


def tasks(worker: AsyncQueueTasks) -> tuple[anyio.Event, anyio.Event, list[str]]:
    """Declares ``blocker`` (sets the first event, waits for the second) and ``job`` (notes
    its argument in the list) on ``worker``."""
    started, release = anyio.Event(), anyio.Event()
    ran: list[str] = []

    @worker.task
    async def blocker() -> None:
        started.set()
        await release.wait()

    @worker.task
    async def job(name: str) -> str:
        ran.append(name)
        return name

    return started, release, ran


async def cancel_queued(producer: AsyncQueueTasks, worker: AsyncQueueTasks) -> None:
    """Cancelled while queued: never claimed, then claimed by the busy worker and waiting
    there unbegun. Each fires once, in the producer."""
    in_producer, in_worker = counted(producer), counted(worker)
    started, release, ran = tasks(worker)
    never = await producer.add_task("job", "never claimed")
    assert (await producer.cancel(never.uuid, "not wanted")) is not None
    assert in_producer.calls == [(never.uuid, "not wanted")]
    async with worker:
        first = await producer.add_task("blocker")
        with anyio.fail_after(10):
            await started.wait()
        waiting = await producer.add_task("job", "waiting")
        kept = await producer.add_task("job", "kept")
        runner = worker.worker
        assert isinstance(runner, QueueWorker)
        with anyio.fail_after(10):  # both claimed by the worker and waiting in its queue
            while runner.waiting < 2:  # noqa: ASYNC110 - the worker has no event for this
                await anyio.sleep(0.005)
        stored = await producer.get(waiting.uuid)
        assert stored is not None and stored.status is TaskStatus.NEW, "claimed, not begun"
        await producer.cancel(waiting.uuid, "changed my mind")
        release.set()
        with anyio.fail_after(10):
            assert (await producer.wait(kept.uuid, timeout=10)).returning == "kept"
            assert (await producer.wait(first.uuid, timeout=10)).status is TaskStatus.SUCCESS
    assert ran == ["kept"]
    assert in_producer.calls == [
        (never.uuid, "not wanted"),
        (waiting.uuid, "changed my mind"),
    ]
    assert in_worker.calls == []


async def cancel_begun_and_waiting(producer: AsyncQueueTasks, worker: AsyncQueueTasks) -> None:
    """Cancelled after the worker's claim began its record (``process``), before it started:
    the worker hears of it, begins it again, finds it final and drops it; it fires once, in
    the worker."""
    in_producer, in_worker = counted(producer), counted(worker)
    _, _, ran = tasks(worker)
    heard = hears_cancels(worker)
    told: list[str] = []

    class CancelOnReceipt:
        """Cancels the task from the producer when the worker received it: its claim began
        the record, the runner has not started it; returns once the worker heard of it."""

        @hookimpl
        async def qtasks_worker_task_received(self, message: Any) -> None:
            begun = await producer.get(message.uuid)
            assert begun is not None and begun.status is TaskStatus.PROCESS, "claim began it"
            await producer.cancel(message.uuid, "too late to start")
            with anyio.fail_after(10):
                await heard.setdefault(message.uuid, anyio.Event()).wait()
            told.append(message.uuid)

    worker.add_plugin(CancelOnReceipt(), name="cancel-on-receipt")
    async with worker:
        task = await producer.add_task("job", "doomed")
        done = await producer.wait(task.uuid, timeout=10)
        with anyio.fail_after(10):
            await in_worker.fired.wait()  # fired after the ack, maybe after the wait returned
    assert told == [task.uuid]
    assert ran == []
    assert (done.status, done.cancel_reason) == (TaskStatus.CANCEL, "too late to start")
    assert in_worker.calls == [(task.uuid, "too late to start")]
    assert in_producer.calls == []


async def cancel_running(producer: AsyncQueueTasks, worker: AsyncQueueTasks) -> None:
    """Cancelled while it runs: fires once, in the worker (not in the producer too)."""
    in_producer, in_worker = counted(producer), counted(worker)
    started, _, _ = tasks(worker)
    async with worker:
        task = await producer.add_task("blocker")
        with anyio.fail_after(10):
            await started.wait()
        await producer.cancel(task.uuid, "stop it")
        with anyio.fail_after(10):
            await in_worker.fired.wait()
        done = await producer.wait(task.uuid, timeout=10)
    assert (done.status, done.cancel_reason) == (TaskStatus.CANCEL, "stop it")
    assert in_worker.calls == [(task.uuid, "stop it")]
    assert in_producer.calls == []


Scenario = Callable[[AsyncQueueTasks, AsyncQueueTasks], Awaitable[None]]

each_cancel = pytest.mark.parametrize(
    "scenario",
    [cancel_queued, cancel_begun_and_waiting, cancel_running],
    ids=["queued", "begun-and-waiting", "running"],
)
"""Runs a test once per scenario, given as ``scenario(producer, worker)``."""
