"""Inline calls of the test made at once (``asyncio.gather``, code under test enqueuing from
two threads) are calls of the test, each with its own timeout and its own failures; a child is
a task enqueued by a task's code, found through the context even from a sync task's thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueTasks, Task, TaskStatus
from qtasks.errors import TaskFailedError
from qtasks.task import AsyncTask
from qtasks_testing import Harness, HarnessError, HarnessTimeoutError, SyncHarness


def on_enqueue(app: AsyncQueueTasks, name: str, signal: Callable[[], object]) -> None:
    """Call ``signal`` when a call enqueuing ``name`` reaches the harness (before it runs):
    wraps the harness's stand-in for ``app.enqueue``, which its uninstall takes off."""
    harness_enqueue = app.enqueue

    async def enqueue(task_name: str, *args: Any, **kwargs: Any) -> AsyncTask:
        if task_name == name:
            signal()
        return await harness_enqueue(task_name, *args, **kwargs)

    app.enqueue = enqueue  # type: ignore[method-assign]


class Calls:
    """``slow`` runs until a call of the test enqueuing another task reached the harness (made
    once ``slow`` runs); with ``wait`` it then gives that call a second to return meanwhile,
    which it cannot: calls of the test take turns."""

    def __init__(self) -> None:
        self.app = app = AsyncQueueTasks()
        self.slow_runs = anyio.Event()
        self.other_call = anyio.Event()
        self.other_returned = anyio.Event()

        @app.task
        async def slow(n: int, wait: bool = False) -> int:
            self.slow_runs.set()
            with anyio.fail_after(5):
                await self.other_call.wait()
            if wait:
                with anyio.move_on_after(1):
                    await self.other_returned.wait()
            return n

        @app.task
        async def stuck() -> None:
            await anyio.sleep_forever()

        @app.task
        async def boom() -> None:
            raise ValueError("boom")

    async def while_slow_runs(self, name: str) -> AsyncTask:
        await self.slow_runs.wait()
        try:
            return await self.app.add_task(name)
        finally:
            self.other_returned.set()

    async def at_once(self, other: str, timeout: float, wait: bool) -> list[Any]:
        """``add_task`` of ``slow`` and, once it runs, of ``other``, under one harness: each
        call's record or exception."""
        app = self.app
        async with Harness(app, timeout=timeout):
            on_enqueue(app, other, self.other_call.set)
            with anyio.fail_after(5):  # a call taken for a child had no limit: it hung
                return await gather(
                    lambda: app.add_task("slow", 1, wait=wait),
                    lambda: self.while_slow_runs(other),
                )


async def gather(*calls: Callable[[], Any]) -> list[Any]:
    """Run ``calls`` at once (as ``asyncio.gather`` would); each result or its exception."""
    results: list[Any] = [None] * len(calls)

    async def one(index: int) -> None:
        try:
            results[index] = await calls[index]()
        except Exception as exc:
            results[index] = exc

    async with anyio.create_task_group() as tg:
        for index in range(len(calls)):
            tg.start_soon(one, index)
    return results


@pytest.mark.anyio
async def test_calls_made_at_once_each_end_within_the_timeout() -> None:
    done, failed = await Calls().at_once("stuck", timeout=0.5, wait=False)
    assert (done.status, done.returning) == (TaskStatus.SUCCESS, 1)
    assert isinstance(failed, HarnessTimeoutError)
    assert "task stuck() [" in str(failed)


@pytest.mark.anyio
async def test_calls_made_at_once_each_raise_their_own_failure() -> None:
    done, failed = await Calls().at_once("boom", timeout=5, wait=True)
    # Taken for a child, boom's failure was raised in slow's call, and boom's returned.
    assert (done.status, done.returning) == (TaskStatus.SUCCESS, 1)
    assert isinstance(failed, TaskFailedError)
    assert failed.task.task_name == "boom"  # type: ignore[attr-defined]
    assert "enqueued while another task ran" not in str(failed)


def test_sync_code_enqueuing_from_two_threads_gets_its_own_results() -> None:
    """Code under test enqueues from a thread pool (a threaded web client, say)."""
    app = QueueTasks()
    slow_runs = threading.Event()
    other_call = threading.Event()
    other_returned = threading.Event()

    @app.task
    def slow() -> str:
        slow_runs.set()
        assert other_call.wait(5)
        other_returned.wait(1)  # it cannot return meanwhile: calls of the test take turns
        return "ok"

    @app.task
    def boom() -> None:
        raise ValueError("boom")

    def call(task: Any, after: threading.Event | None = None) -> Any:
        if after is not None:
            assert after.wait(5)
        try:
            return task.add_task()
        except Exception as exc:
            return exc
        finally:
            if after is not None:
                other_returned.set()

    with SyncHarness(app, timeout=5):
        on_enqueue(app.aio, "boom", other_call.set)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call, slow)
            second = pool.submit(call, boom, slow_runs)
            done, failed = first.result(10), second.result(10)
    assert (done.status, done.returning) == (TaskStatus.SUCCESS, "ok")
    assert isinstance(failed, TaskFailedError)
    assert failed.task.task_name == "boom"  # type: ignore[attr-defined]


def test_a_sync_task_s_child_is_a_child() -> None:
    """Enqueued from the task's thread through the app's portal: the context says it is the
    task's child (its failure is reported when the test's call returns, not to the task)."""
    app = QueueTasks()
    caught_in_parent: list[BaseException] = []

    @app.task
    def notify() -> None:
        raise ConnectionError("smtp down")

    @app.task
    def checkout() -> str:
        try:
            child = notify.add_task()
        except Exception as exc:  # production never gets here
            caught_in_parent.append(exc)
        else:
            assert child.status is TaskStatus.ERROR
        return "paid"

    with SyncHarness(app, timeout=5) as qt:
        with pytest.raises(TaskFailedError, match="smtp down") as caught:
            checkout.add_task()
        assert "enqueued while another task ran" in str(caught.value)
        assert caught_in_parent == []
        (parent,) = qt.enqueued("checkout")
        assert qt.call(app.aio.get, parent.uuid).returning == "paid"  # type: ignore[union-attr]


def test_a_task_waiting_for_its_own_thread_s_enqueue_times_out_saying_so() -> None:
    """A thread the task starts without its context (a ThreadPoolExecutor's) enqueues as a
    call of the test, which waits for the task: the timeout says a call was waiting."""
    app = QueueTasks()

    @app.task
    def child() -> str:
        return "child"

    enqueues: list[Future[Task]] = []

    @app.task
    def parent() -> str:
        if enqueues:
            # Its delivery, cancelled at the timeout, came back: the waiting call ran it
            # first. Enqueuing again would leave a call running past the harness's close.
            return "again"
        with ThreadPoolExecutor(1) as pool:
            enqueues.append(pool.submit(child.add_task))
            return str(enqueues[0].result().returning)

    with SyncHarness(app, timeout=0.5):
        with pytest.raises(HarnessTimeoutError) as caught:
            parent.add_task()
        # The waiting call runs once the parent's ended: it ends before the harness closes
        # (else its enqueue, racing the close, started the closed app again).
        (enqueue,) = enqueues
        assert enqueue.result(timeout=10).returning == "child"
    assert "task parent() [" in str(caught.value)
    assert "1 other call of the test waited for it meanwhile" in str(caught.value)


def test_a_task_given_up_on_in_an_earlier_test_cannot_enqueue_into_the_next() -> None:
    app = QueueTasks()
    go, called = threading.Event(), threading.Event()
    outcome: list[Any] = []
    ran: list[str] = []

    @app.task
    def child(tag: str) -> str:
        ran.append(tag)
        return tag

    @app.task
    def parent() -> None:
        go.wait(30)  # slower than the first test's timeout
        try:
            outcome.append(child.add_task("from the first test"))
        except Exception as exc:
            outcome.append(exc)
        finally:
            called.set()

    try:
        with SyncHarness(app, timeout=0.3), pytest.raises(HarnessTimeoutError):
            parent.add_task()
        with SyncHarness(app) as qt:
            go.set()  # the first test's thread runs on, into this test
            assert called.wait(5)
            assert qt.enqueued() == []
    finally:
        go.set()
    assert ran == []
    (refused,) = outcome
    assert isinstance(refused, HarnessError)
    assert "task parent() [" in str(refused)
    assert "given up on at the timeout of the harness of an earlier test" in str(refused)
