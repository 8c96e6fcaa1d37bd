"""Inline mode ends every call of the test in bounded time: a task that never finishes fails
after the harness's ``timeout``, and ``add_task(delay=..., timeout=...)`` runs the task at its
eta on the harness's clock (or fails at once when the eta is beyond the timeout)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks, TaskStatus
from qtasks.errors import TaskTimeoutError
from qtasks_testing import Harness, HarnessTimeoutError
from qtasks_testing.sync_harness import SyncHarness


def make_stuck_app() -> tuple[AsyncQueueTasks, anyio.Event]:
    app = AsyncQueueTasks()
    cancelled = anyio.Event()

    @app.task
    async def stuck() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    @app.task(echo=True)
    async def parent(self: Any) -> None:
        await self.add_task("stuck")

    return app, cancelled


@pytest.mark.parametrize(
    ("added", "named"),
    [("stuck", "task stuck() ["), ("parent", "enqueued by parent() [")],
    ids=["the task", "a child"],
)
@pytest.mark.anyio
async def test_inline_add_task_of_a_task_that_never_ends_fails_after_the_timeout(
    added: str, named: str
) -> None:
    app, cancelled = make_stuck_app()
    async with Harness(app, timeout=0.5):
        with anyio.fail_after(5), pytest.raises(HarnessTimeoutError) as caught:
            await app.add_task(added)
        assert cancelled.is_set()
    assert isinstance(caught.value, TaskTimeoutError)
    text = str(caught.value)
    assert "task stuck() [" in text  # the task that did not finish, with its parent if any
    assert named in text
    assert f"add_task of {added}() [" in text  # the call
    assert "did not end within the harness's timeout of 0.5 s" in text
    assert "task stuck() [" in text.split("was still running")[0]


@pytest.mark.anyio
async def test_a_task_given_up_on_at_the_timeout_is_settled_and_not_run_again() -> None:
    # Its message went back to the broker, its record stayed 'process': the test's next call
    # ran it (and its parent) again behind the test's back.
    app = AsyncQueueTasks()
    runs: list[str] = []

    @app.task
    async def stuck() -> None:
        runs.append("stuck")
        await anyio.sleep_forever()

    @app.task(echo=True)
    async def parent(self: Any) -> None:
        runs.append("parent")
        await self.add_task("stuck")

    async with Harness(app, timeout=0.3) as qt:
        with anyio.fail_after(5), pytest.raises(HarnessTimeoutError) as caught:
            await app.add_task("parent")
        assert "settled: its record is 'cancel'" in str(caught.value)
        uuids = [item.uuid for item in qt.enqueued()]
        assert [item.task_name for item in qt.enqueued()] == ["parent", "stuck"]
        for uuid in uuids:
            record = await app.get(uuid)
            assert record is not None and record.status is TaskStatus.CANCEL
            assert record.cancel_reason == (
                f"given up on by the test harness: add_task of parent() [{uuids[0]}] did not "
                "end within its timeout of 0.3 s"
            )
        assert sum((await app.broker.stats()).ready_by_priority.values()) == 0
        with anyio.fail_after(5):
            assert await qt.run_pending() == []  # nothing runs again, nothing to hand out
        assert runs == ["parent", "stuck"]


@pytest.mark.anyio
async def test_inline_run_pending_is_bounded_too() -> None:
    app, cancelled = make_stuck_app()
    async with Harness(app, timeout=0.5) as qt:
        qt.freeze_time()
        await app.add_task("stuck", delay=10)
        with anyio.fail_after(5), pytest.raises(HarnessTimeoutError, match="stuck"):
            await qt.run_pending(include_delayed=True)
        assert cancelled.is_set()


@pytest.mark.anyio
async def test_the_timeout_is_the_budget_of_the_whole_call() -> None:
    """Many short tasks that one call runs use up its timeout together: the error says so,
    and names the task that was running then, not as if that one task took it all."""
    app = AsyncQueueTasks()

    @app.task
    async def step(i: int) -> int:
        await anyio.sleep(0.05)
        return i

    async with Harness(app, timeout=0.5) as qt:
        qt.freeze_time()
        for i in range(40):  # 2 s of work in all
            await app.add_task("step", i, delay=1)
        with anyio.fail_after(5), pytest.raises(HarnessTimeoutError) as caught:
            await qt.advance_time(1)
    text = str(caught.value)
    assert text.startswith(
        "advance_time(1) did not end within the harness's timeout of 0.5 s, one budget for "
        "the whole call and every task it runs ("
    )
    finished = int(text.split(" finished in it)")[0].rsplit("(", 1)[1])
    assert 0 < finished < 40
    assert f": task step({finished}) [" in text
    assert "was still running and was cancelled" in text


@pytest.mark.anyio
async def test_inline_wait_is_bounded_too() -> None:
    app, cancelled = make_stuck_app()
    async with Harness(app, timeout=0.5) as qt:
        qt.freeze_time()
        task = await app.add_task("stuck", delay=10)
        await qt.advance_to(task.eta or 0)
        with anyio.fail_after(5), pytest.raises(HarnessTimeoutError, match=task.uuid):
            await qt.wait(task)
        assert cancelled.is_set()


def test_a_blocked_sync_task_is_abandoned_after_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="qtasks.worker")
    app = QueueTasks()
    release = threading.Event()

    @app.task
    def blocked() -> str:
        release.wait(30)
        return "late"

    started = time.monotonic()
    try:
        with SyncHarness(app, timeout=0.5), pytest.raises(HarnessTimeoutError, match="blocked"):
            blocked.add_task()
        assert time.monotonic() - started < 5
    finally:
        release.set()  # let the abandoned thread end
    (said,) = [r.getMessage() for r in caplog.records if "given up on" in r.getMessage()]
    assert "given up on (its run was stopped: the worker's stop, or a test harness's" in said


@pytest.mark.anyio
async def test_threads_given_up_on_leave_the_next_test_its_threads() -> None:
    """A sync task given up on keeps its thread's token until the thread returns: a token of
    the limiter of its test's harness, not of the app's, which every later test uses."""
    app = AsyncQueueTasks(config=QueueConfig(max_tasks_process=1))
    release = threading.Event()

    @app.task
    def blocked() -> None:
        release.wait(30)

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    own = app.thread_limiter
    try:
        async with Harness(app, timeout=0.3):
            first = app.thread_limiter
            with anyio.fail_after(5), pytest.raises(HarnessTimeoutError):
                await app.add_task("blocked")
            assert first.borrowed_tokens == 1
        assert app.thread_limiter is own
        assert own.borrowed_tokens == 0
        async with Harness(app, timeout=5):
            with anyio.fail_after(5):  # its one thread was the blocked task's: timed out
                assert (await app.add_task("add", 1, 2)).returning == 3
    finally:
        release.set()
    # The abandoned thread gives its token back to the limiter it took it from.
    with anyio.fail_after(5):
        while first.borrowed_tokens:  # noqa: ASYNC110 - given back on the loop, no event to await
            await anyio.sleep(0.01)
    assert own.borrowed_tokens == 0


@pytest.mark.anyio
async def test_inline_add_task_with_a_timeout_raises_when_the_task_runs_longer() -> None:
    """As production's add_task(timeout=...) raises TaskTimeoutError once the timeout is over,
    whatever the harness's own timeout."""
    app = AsyncQueueTasks()
    cancelled = anyio.Event()

    @app.task
    async def report(wait: bool) -> str:
        try:
            if wait:
                await anyio.sleep_forever()
            return "done"
        finally:
            cancelled.set()

    async with Harness(app, timeout=10) as qt:
        assert (await app.add_task("report", False, timeout=5)).returning == "done"
        cancelled = anyio.Event()
        with anyio.fail_after(3), pytest.raises(TaskTimeoutError) as caught:
            await app.add_task("report", True, timeout=0.3)
        assert cancelled.is_set()
        assert "task report(True) [" in str(caught.value)
        assert "did not finish within add_task's timeout of 0.3 s" in str(caught.value)
        (_, late) = qt.enqueued("report")
        assert caught.value.uuid == late.uuid


def test_sync_code_falls_back_when_add_task_times_out() -> None:
    """The reviewer's case: code under test waits 0.3 s for a report, else falls back."""
    app = QueueTasks()
    release = threading.Event()

    @app.task
    def report() -> str:
        release.wait(30)
        return "report"

    def code_under_test() -> str:
        try:
            return str(report.add_task(timeout=0.3).returning)
        except TaskTimeoutError:
            return "fallback"

    started = time.monotonic()
    try:
        with SyncHarness(app, timeout=10):
            assert code_under_test() == "fallback"
        assert time.monotonic() - started < 5
    finally:
        release.set()  # let the abandoned thread end


def make_ping_app() -> AsyncQueueTasks:
    app = AsyncQueueTasks()

    @app.task
    async def ping() -> str:
        return "pong"

    return app


@pytest.mark.anyio
async def test_inline_add_task_with_delay_and_timeout_runs_at_the_eta() -> None:
    app = make_ping_app()
    async with Harness(app) as qt:
        qt.freeze_time()
        now = qt.clock.time()
        with anyio.fail_after(2):  # a real wait would take 30 s
            done = await app.add_task("ping", delay=30, timeout=60)
        assert (done.status, done.returning) == (TaskStatus.SUCCESS, "pong")
        assert qt.clock.time() == now + 30


@pytest.mark.anyio
async def test_inline_add_task_delayed_beyond_its_timeout_fails_at_once() -> None:
    app = make_ping_app()
    async with Harness(app) as qt:
        qt.freeze_time()
        with anyio.fail_after(2), pytest.raises(TaskTimeoutError) as caught:
            await app.add_task("ping", delay=30, timeout=5)
        assert "is delayed 30 s, longer than add_task's timeout of 5 s" in str(caught.value)
        assert "advance_time()" in str(caught.value)
        # As in production, it stays enqueued.
        assert [t.returning for t in await qt.run_pending(include_delayed=True)] == ["pong"]


def test_sync_app_add_task_with_delay_and_timeout_returns_the_result() -> None:
    """The reviewer's case: production code waits up to 5 s for a task due in 1 s."""
    app = QueueTasks()

    @app.task
    def ping() -> str:
        return "pong"

    started = time.monotonic()
    with SyncHarness(app, timeout=2):
        assert ping.add_task(delay=1, timeout=5).returning == "pong"
    assert time.monotonic() - started < 2
