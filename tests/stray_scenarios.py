"""Stray cancellations (a ``CancelledError`` that code under the worker raises of its own, not a
cancel of the task nor the worker's stop): scenarios run on the memory and Redis components.
Each app given serves one task at a time, so a worker that lost its only runner, or stopped
serving, shows at the next task."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, TaskStatus, hookimpl
from qtasks.errors import StrayCancellationError
from qtasks.executor import CallNext, TaskRun

WAIT = 10


async def cancelled_inner() -> None:
    """Await a future this code cancelled itself: its CancelledError reaches the caller."""
    inner = asyncio.ensure_future(asyncio.sleep(10))
    inner.cancel()
    await inner


async def replace_the_cancellation() -> None:
    """Wait until cancelled, then raise a new CancelledError in place of the one delivered
    (which the canceller's scope then does not take for its own)."""
    cancelled = False
    try:
        await anyio.sleep_forever()
    except asyncio.CancelledError:
        cancelled = True
    if cancelled:
        raise asyncio.CancelledError()


async def own_cancellation(run: TaskRun, call_next: CallNext) -> Any:
    """A middleware that raises a cancellation of its own before the task."""
    await cancelled_inner()
    return await call_next()


class Failures:
    """Records the exception of each ``qtasks_task_failed``, by task name."""

    def __init__(self) -> None:
        self.by_task: dict[str, BaseException] = {}
        self.changed = anyio.Event()

    @hookimpl
    def qtasks_task_failed(self, record: Any, exc: BaseException) -> None:
        self.by_task[record.task_name] = exc
        self.changed.set()

    async def of(self, name: str) -> BaseException:
        """The exception the hook got for task ``name`` (it may fire after a waiter woke)."""
        with anyio.fail_after(WAIT):
            while name not in self.by_task:
                self.changed = anyio.Event()
                await self.changed.wait()
        return self.by_task[name]


def register(app: AsyncQueueTasks) -> None:
    """Tasks of every kind whose code raises a cancellation of its own, and ``plain``."""

    @app.task(retry=1, retry_backoff=0)
    async def own_async() -> None:
        await cancelled_inner()

    @app.task
    def own_sync() -> None:
        asyncio.run(cancelled_inner())  # the CancelledError leaves asyncio.run in the thread

    @app.task
    async def own_async_gen() -> AsyncIterator[int]:
        yield 1
        await cancelled_inner()

    @app.task
    def own_sync_gen() -> Iterator[int]:
        yield 1
        asyncio.run(cancelled_inner())

    @app.task(middlewares_before=[own_cancellation])
    async def own_in_middleware() -> None:
        pass

    @app.task
    async def plain(i: int) -> int:
        return i


async def a_task_raising_its_own_cancellation_fails_and_the_worker_serves_on(
    app: AsyncQueueTasks,
) -> None:
    """Each such task ends ``error`` (after its retries), its hooks fired as for an error,
    and the next task runs on the same worker."""
    register(app)
    failures = Failures()
    app.add_plugin(failures, name="failures")
    async with app:
        for i, name in enumerate(
            ["own_async", "own_sync", "own_async_gen", "own_sync_gen", "own_in_middleware"]
        ):
            final = await app.add_task(name, timeout=WAIT)
            assert final.status is TaskStatus.ERROR, (name, final.status)
            assert (
                final.error == f"StrayCancellationError: {StrayCancellationError(f'task {name!r}')}"
            )
            assert "CancelledError" in (final.traceback or "")
            assert isinstance(await failures.of(name), StrayCancellationError)
            if name == "own_async":
                assert final.attempt == 2  # retried once, as its policy says
            after = await app.add_task("plain", i, timeout=WAIT)
            assert (after.status, after.returning) == (TaskStatus.SUCCESS, i)


async def a_cancelled_task_raising_a_fresh_cancellation_is_cancelled_and_the_worker_serves_on(
    app: AsyncQueueTasks,
) -> None:
    """A task cancelled while it runs that raises a new CancelledError in place of the one it
    got (which its runner's scope does not take for its own) ends ``cancel``; the runner
    serves on."""
    register(app)
    started = anyio.Event()

    @app.task
    async def replaces_its_cancel() -> None:
        started.set()
        await replace_the_cancellation()

    async with app:
        task = await app.add_task("replaces_its_cancel")
        with anyio.fail_after(WAIT):
            await started.wait()
        await app.cancel(task.uuid, "enough")
        final = await task.wait_result(WAIT)
        assert (final.status, final.cancel_reason) == (TaskStatus.CANCEL, "enough")
        after = await app.add_task("plain", 1, timeout=WAIT)
        assert (after.status, after.returning) == (TaskStatus.SUCCESS, 1)


class CancelledHooks:
    """Hooks that raise a cancellation of their own, before the task and once it succeeded."""

    @hookimpl
    async def qtasks_worker_execute_before(self) -> None:
        await cancelled_inner()

    @hookimpl
    async def qtasks_task_succeeded(self) -> None:
        await cancelled_inner()


async def a_hook_raising_its_own_cancellation_is_ignored_as_a_failed_hook(
    app: AsyncQueueTasks, caplog: pytest.LogCaptureFixture
) -> None:
    """A notification hook's own cancellation is logged and ignored, as its errors are: the
    tasks succeed, the worker serves on."""
    register(app)
    app.add_plugin(CancelledHooks(), name="cancelled-hooks")
    with caplog.at_level(logging.ERROR, logger="qtasks.plugins"):
        async with app:
            for i in range(3):
                final = await app.add_task("plain", i, timeout=WAIT)
                assert (final.status, final.returning) == (TaskStatus.SUCCESS, i)
    failed = {r.getMessage() for r in caplog.records if r.name == "qtasks.plugins"}
    for hook in ("qtasks_worker_execute_before", "qtasks_task_succeeded"):
        assert f"plugin 'cancelled-hooks' failed in hook {hook} (ignored): CancelledError" in failed


async def own_teardown_cancellation(run: TaskRun, call_next: CallNext) -> Any:
    """A middleware whose task-scoped teardown raises a cancellation of its own."""
    run.on_close(cancelled_inner)
    return await call_next()


class SettledHooks:
    """``qtasks_executor_closed`` raises a cancellation of its own; the hooks after it record
    that the settle went on."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []
        self.after = anyio.Event()

    @hookimpl
    async def qtasks_executor_closed(self) -> None:
        await cancelled_inner()

    @hookimpl
    def qtasks_task_cancelled(self, reason: str) -> None:
        self.seen.append(("cancelled", reason))

    @hookimpl
    def qtasks_broker_requeued(self, delay: float | None) -> None:
        self.seen.append(("requeued", delay))

    @hookimpl
    def qtasks_worker_execute_after(self, record: Any) -> None:
        self.seen.append(("after", record.status))
        self.after.set()


def register_torn_down(app: AsyncQueueTasks, started: anyio.Event) -> SettledHooks:
    """``torn_down``, a task that waits until cancelled, its teardown and a hook raising a
    cancellation of their own as it is settled; the hooks' record."""
    register(app)
    hooks = SettledHooks()
    app.add_plugin(hooks, name="settled")

    @app.task(middlewares_before=[own_teardown_cancellation])
    async def torn_down() -> None:
        started.set()
        await anyio.sleep_forever()

    return hooks


def assert_ignored_as_errors(caplog: pytest.LogCaptureFixture) -> None:
    """The teardown's and ``qtasks_executor_closed``'s own cancellations were logged."""
    messages = [r.getMessage() for r in caplog.records]
    assert sum("closing what task" in m for m in messages) == 1, messages
    ignored = "plugin 'settled' failed in hook qtasks_executor_closed (ignored): CancelledError"
    assert ignored in messages, messages


async def a_cancelled_task_whose_teardown_raises_its_own_cancellation_is_settled(
    app: AsyncQueueTasks, caplog: pytest.LogCaptureFixture
) -> None:
    """A task cancelled by ``app.cancel`` whose teardown and ``qtasks_executor_closed`` raise a
    cancellation of their own as it is settled (shielded, its runner's cancel pending): both
    are logged and ignored, the record says ``cancel``, its hooks fire, the message is acked
    and the worker serves on. Before, the settle stopped there: no hook, no ack (the message
    waited for its lease), nothing logged."""
    started = anyio.Event()
    hooks = register_torn_down(app, started)
    with caplog.at_level(logging.ERROR):
        async with app:
            task = await app.add_task("torn_down")
            with anyio.fail_after(WAIT):
                await started.wait()
            await app.cancel(task.uuid, "enough")
            with anyio.fail_after(WAIT):
                await hooks.after.wait()
            assert hooks.seen == [("cancelled", "enough"), ("after", TaskStatus.CANCEL)]
            assert (await app.broker.stats()).in_flight == 0
            after = await app.add_task("plain", 1, timeout=WAIT)
            assert (after.status, after.returning) == (TaskStatus.SUCCESS, 1)
    assert_ignored_as_errors(caplog)


def register_waits(app: AsyncQueueTasks) -> anyio.Event:
    """``waits``, a task that runs until cancelled; the event it sets once it started."""
    started = anyio.Event()

    @app.task
    async def waits() -> None:
        started.set()
        await anyio.sleep_forever()

    return started


def stray_failures(caplog: pytest.LogCaptureFixture) -> list[StrayCancellationError]:
    """The stray cancellations the worker logged as its failure on a message."""
    return [
        r.exc_info[1]
        for r in caplog.records
        if "worker failed while handling message" in r.getMessage()
        and r.exc_info is not None
        and isinstance(r.exc_info[1], StrayCancellationError)
    ]


async def a_cancelled_task_whose_settle_write_raises_its_own_cancellation_is_handed_back(
    app: AsyncQueueTasks, caplog: pytest.LogCaptureFixture, culprit: str
) -> None:
    """A task cancelled by ``app.cancel`` whose ``cancel`` record's write (a component of
    ``app`` armed to raise a cancellation of its own once, named ``culprit``) fails so in the
    shielded settle: the failure is logged with the component named and the message handed
    back as for any component failure; its next delivery finds the record ``cancel`` (stored
    by ``app.cancel``) and acks it, and the worker serves on. Before, the cancellation was
    taken for the runner's: nothing was logged and the message waited for its lease."""
    register(app)
    started = register_waits(app)
    with caplog.at_level(logging.ERROR, logger="qtasks.worker"):
        async with app:
            task = await app.add_task("waits")
            with anyio.fail_after(WAIT):
                await started.wait()
            await app.cancel(task.uuid, "enough")
            with anyio.fail_after(WAIT):
                while True:
                    stats = await app.broker.stats()
                    pending = (
                        stats.in_flight + stats.delayed + sum(stats.ready_by_priority.values())
                    )
                    if pending == 0 and stray_failures(caplog):
                        break
                    await anyio.sleep(0.02)
            final = await app.wait(task.uuid, timeout=WAIT)
            assert (final.status, final.cancel_reason) == (TaskStatus.CANCEL, "enough")
            after = await app.add_task("plain", 1, timeout=WAIT)
            assert (after.status, after.returning) == (TaskStatus.SUCCESS, 1)
    [failure] = stray_failures(caplog)
    assert failure.culprit.startswith(culprit), failure.culprit
    assert isinstance(failure.__cause__, asyncio.CancelledError)
