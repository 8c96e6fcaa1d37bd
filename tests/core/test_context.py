"""echo=True handles and ``self.ctx`` inside a real in-process worker, for async and sync tasks."""

from __future__ import annotations

import logging
import math
import threading
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks, TaskStatus
from qtasks.context import AsyncTaskHandle, SyncTaskHandle
from qtasks.errors import TaskCancelledError
from qtasks.task import AsyncTask, Task

pytestmark = pytest.mark.anyio
WAIT = 10


async def test_async_ctx_every_method(caplog: pytest.LogCaptureFixture) -> None:
    app = AsyncQueueTasks()
    checks: dict[str, Any] = {}

    @app.task
    async def child(x: int) -> int:
        return x * 2

    @app.task(echo=True)
    async def parent(self: AsyncTaskHandle, x: int) -> int:
        ctx = self.ctx
        ctx.get_logger().info("working on %s", x)
        meta = await ctx.get_metadata()
        kid = await self.add_task("child", x)
        done = await kid.wait_result(timeout=WAIT)
        checks.update(
            uuid=ctx.task_uuid,
            name=ctx.task_name,
            attempt=ctx.attempt,
            meta_type=type(meta),
            meta_status=meta.status,
            meta_uuid=meta.uuid,
            kid_parent=(await ctx.get_task(kid.uuid)).parent_uuid,  # type: ignore[union-attr]
            missing=await ctx.get_task("no-such-uuid"),
            config=ctx.get_config() is app.config,
            components=[ctx.get_component(n) for n in ("broker", "storage", "global_config")],
            worker=ctx.get_component("worker") is app.worker,
        )
        with pytest.raises(ValueError, match="unknown component"):
            ctx.get_component("nope")
        await ctx.sleep(0.01)
        return int(done.returning)

    caplog.set_level(logging.INFO, logger="qtasks.task")
    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("parent", 21, timeout=WAIT)
    assert task.status is TaskStatus.SUCCESS, task.error
    assert task.returning == 42
    assert checks["uuid"] == task.uuid
    assert checks["name"] == "parent"
    assert checks["attempt"] == 1
    assert checks["meta_type"] is AsyncTask
    assert checks["meta_status"] is TaskStatus.PROCESS
    assert checks["meta_uuid"] == task.uuid
    assert checks["kid_parent"] == task.uuid
    assert checks["missing"] is None
    assert checks["config"]
    assert checks["worker"]
    assert checks["components"] == [app.broker, app.storage, app.global_config]
    [record] = [r for r in caplog.records if r.getMessage() == "working on 21"]
    assert record.task_name == "parent"  # type: ignore[attr-defined]
    assert record.task_uuid == task.uuid  # type: ignore[attr-defined]
    assert record.name == "qtasks.task.parent"


def test_sync_ctx_every_method(caplog: pytest.LogCaptureFixture) -> None:
    app = QueueTasks()
    checks: dict[str, Any] = {}

    @app.task
    def child(x: int) -> int:
        return x * 2

    @app.task
    def steps(n: int) -> Any:
        yield from range(n)

    @app.task(echo=True)
    def parent(self: SyncTaskHandle, x: int) -> int:
        ctx = self.ctx
        ctx.get_logger("custom").warning("sync %s", x)
        meta = ctx.get_metadata()
        kid = self.add_task("child", x)
        done = kid.wait_result(timeout=WAIT)
        gen = self.add_task("steps", 3)
        checks.update(
            uuid=ctx.task_uuid,
            name=ctx.task_name,
            attempt=ctx.attempt,
            meta_type=type(meta),
            meta_status=meta.status,
            kid_type=type(kid),
            kid_parent=ctx.get_task(kid.uuid).parent_uuid,  # type: ignore[union-attr]
            refreshed=kid.refresh().status,
            streamed=list(gen.stream(timeout=WAIT)),
            config=ctx.get_config() is app.config,
            storage=ctx.get_component("storage") is app.storage,
            thread=threading.current_thread() is not threading.main_thread(),
        )
        ctx.sleep(0.01)
        return int(done.returning)

    caplog.set_level(logging.INFO, logger="custom")
    try:
        with app:
            task = app.add_task("parent", 5, timeout=WAIT)
    finally:
        app.close()
    assert task.status is TaskStatus.SUCCESS, task.error
    assert task.returning == 10
    assert checks["uuid"] == task.uuid
    assert checks["name"] == "parent"
    assert checks["attempt"] == 1
    assert checks["meta_type"] is Task
    assert checks["meta_status"] is TaskStatus.PROCESS
    assert checks["kid_type"] is Task
    assert checks["kid_parent"] == task.uuid
    assert checks["refreshed"] is TaskStatus.SUCCESS
    assert checks["streamed"] == [0, 1, 2]
    assert checks["config"]
    assert checks["storage"]
    assert checks["thread"]
    [record] = [r for r in caplog.records if r.getMessage() == "sync 5"]
    assert record.task_uuid == task.uuid  # type: ignore[attr-defined]
    assert record.task_name == "parent"  # type: ignore[attr-defined]


async def test_async_attempt_counts_retries() -> None:
    app = AsyncQueueTasks()
    attempts: list[int] = []

    @app.task(echo=True, retry=2, retry_backoff=0)
    async def flaky(self: AsyncTaskHandle) -> int:
        attempts.append(self.ctx.attempt)
        if self.ctx.attempt < 3:
            raise RuntimeError("not yet")
        return self.ctx.attempt

    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("flaky", timeout=WAIT)
    assert task.returning == 3
    assert attempts == [1, 2, 3]


async def test_async_ctx_cancel_sets_reason() -> None:
    app = AsyncQueueTasks()
    after: list[bool] = []

    @app.task(echo=True)
    async def quit_now(self: AsyncTaskHandle) -> None:
        self.ctx.cancel("nothing to do")
        after.append(True)

    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("quit_now", timeout=WAIT)
    assert task.status is TaskStatus.CANCEL
    assert task.cancel_reason == "nothing to do"
    assert after == []


async def test_ctx_cancel_in_a_task_groups_child_cancels_the_task() -> None:
    """``self.ctx.cancel()`` in a child of the task's own task group reached the worker as
    ``ExceptionGroup([TaskCancelledError])``: the record said ``error`` ("unhandled errors in
    a TaskGroup") instead of ``cancel`` with the reason (walk-through). A group of other
    errors, or one mixing them with the cancel, still fails the task."""
    app = AsyncQueueTasks()

    @app.task(echo=True)
    async def stopper(self: AsyncTaskHandle, also_fail: bool) -> None:
        async def child() -> None:
            self.ctx.cancel("no work left")

        async def failing() -> None:
            raise ValueError("broken")

        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
            if also_fail:
                tg.start_soon(failing)

    async with app:
        cancelled = await app.add_task("stopper", False, timeout=5)
        failed = await app.add_task("stopper", True, timeout=5)
    assert (cancelled.status, cancelled.cancel_reason) == (TaskStatus.CANCEL, "no work left")
    assert failed.status is TaskStatus.ERROR


def test_sync_ctx_cancel_sets_reason() -> None:
    app = QueueTasks()

    @app.task(echo=True)
    def quit_now(self: SyncTaskHandle) -> None:
        self.ctx.cancel("sync reason")

    try:
        with app:
            task = app.add_task("quit_now", timeout=WAIT)
    finally:
        app.close()
    assert task.status is TaskStatus.CANCEL
    assert task.cancel_reason == "sync reason"


@pytest.mark.parametrize("seconds", [3600, math.inf])  # inf: until woken
async def test_async_sleep_ends_early_when_cancelled(seconds: float) -> None:
    app = AsyncQueueTasks()
    sleeping = anyio.Event()
    reached_end: list[bool] = []
    cleaned: list[bool] = []

    @app.task(echo=True)
    async def sleeper(self: AsyncTaskHandle) -> None:
        try:
            sleeping.set()
            await self.ctx.sleep(seconds)
            reached_end.append(True)
        finally:
            cleaned.append(True)

    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("sleeper")
            await sleeping.wait()
            await app.cancel(task.uuid, "stop it")
            final = await task.wait_result(timeout=WAIT)
    assert final.status is TaskStatus.CANCEL
    assert final.cancel_reason == "stop it"
    assert reached_end == []
    assert cleaned == [True]


def _given_up_on(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "given up on" in r.getMessage()]


def test_sync_sleep_wakes_its_thread_when_cancelled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qtasks.worker")
    app = QueueTasks()
    sleeping = threading.Event()
    woke: list[BaseException] = []
    thread_done = threading.Event()

    @app.task(echo=True)
    def sleeper(self: SyncTaskHandle) -> None:
        try:
            sleeping.set()
            self.ctx.sleep(3600)
        except BaseException as exc:
            woke.append(exc)
            raise
        finally:
            thread_done.set()

    try:
        with app:
            task = app.add_task("sleeper")
            assert sleeping.wait(WAIT)
            app.cancel(task.uuid, "enough")
            final = task.wait_result(timeout=WAIT)
            # The abandoned worker thread must wake now, not after an hour.
            assert thread_done.wait(WAIT)
    finally:
        app.close()
    assert final.status is TaskStatus.CANCEL
    assert final.cancel_reason == "enough"
    assert len(woke) == 1, woke
    assert isinstance(woke[0], TaskCancelledError)
    assert woke[0].reason == "enough"
    # Its thread returned a moment after the cancel: not said to run on (nor to return late).
    assert _given_up_on(caplog) == []


def test_sync_sleep_wakes_at_max_time(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qtasks.worker")
    app = QueueTasks()
    thread_done = threading.Event()

    @app.task(echo=True, max_time=0.2)
    def slow(self: SyncTaskHandle) -> None:
        try:
            self.ctx.sleep(3600)
        finally:
            thread_done.set()

    try:
        with app:
            final = app.add_task("slow", timeout=WAIT)
            assert thread_done.wait(WAIT)
    finally:
        app.close()
    assert final.status is TaskStatus.ERROR
    assert final.error is not None
    assert "TaskMaxTimeError" in final.error
    assert _given_up_on(caplog) == []


async def test_async_sleep_hands_task_back_at_shutdown() -> None:
    # A long grace period: without the early wake-up the shutdown would take 30 s.
    app = AsyncQueueTasks(config=QueueConfig(shutdown_grace=30))
    sleeping = anyio.Event()

    @app.task(echo=True)
    async def sleeper(self: AsyncTaskHandle) -> None:
        sleeping.set()
        await self.ctx.sleep(3600)

    storage = app.storage
    async with AsyncExitStack() as hold:
        await storage.start(hold, app.config)  # keeps the storage readable after the app stops
        with anyio.fail_after(WAIT):
            async with app:
                task = await app.add_task("sleeper")
                await sleeping.wait()
        record = await storage.get(task.uuid)
    assert record is not None
    assert record.status is TaskStatus.NEW  # handed back for another worker, not lost


def test_sync_sleep_hands_task_back_at_shutdown() -> None:
    app = QueueTasks(config=QueueConfig(shutdown_grace=30))
    sleeping = threading.Event()
    thread_done = threading.Event()

    @app.task(echo=True)
    def sleeper(self: SyncTaskHandle) -> None:
        try:
            sleeping.set()
            self.ctx.sleep(3600)
        finally:
            thread_done.set()

    hold = AsyncExitStack()  # keeps the storage readable after the app stops
    app.portal.call(app.aio.storage.start, hold, app.config)
    try:
        with app:
            task = app.add_task("sleeper")
            assert sleeping.wait(WAIT)
        assert thread_done.wait(WAIT)
        record = app.portal.call(app.aio.storage.get, task.uuid)
    finally:
        app.portal.call(hold.aclose)
        app.close()
    assert record is not None
    assert record.status is TaskStatus.NEW


@pytest.mark.parametrize("seconds", [-1, -0.5, "5"])
async def test_a_bad_sleep_length_fails_the_task_saying_so(seconds: Any) -> None:
    """``ctx.sleep(-1)`` (a deadline already past) failed the task with "ExceptionGroup:
    unhandled errors in a TaskGroup", hiding the cause, and out of ``retry_on_exc``'s reach."""
    app = AsyncQueueTasks()

    @app.task(echo=True)
    async def nap(self: AsyncTaskHandle, s: Any) -> str:
        await self.ctx.sleep(s)
        return "rested"

    @app.task(echo=True)
    def sync_nap(self: SyncTaskHandle, s: Any) -> str:
        self.ctx.sleep(s)
        return "rested"

    with anyio.fail_after(WAIT):
        async with app:
            finals = [
                await (await app.add_task(name, seconds)).wait_result(timeout=WAIT)
                for name in ("nap", "sync_nap")
            ]
    for final in finals:
        assert final.status is TaskStatus.ERROR
        assert final.error == (
            f"InvalidTimeoutError: ctx.sleep expects finite seconds >= 0, got {seconds!r}"
        )
