"""Sync tasks whose thread runs on after ``max_time`` or a cancel gave up on it (Python cannot
stop a thread): the thread keeps its place in ``max_tasks_process`` and its task's concurrency
slot until it returns, though the task's record is final at once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from sync_threads import a_slot_is_kept_while_its_thread_runs, waits

from qtasks import AsyncQueueTasks, Depends, QueueConfig, TaskStatus
from qtasks.errors import TaskCancelledError, TaskMaxTimeError
from qtasks.threads import still_running

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("kind", ["function", "generator"])
async def test_threads_given_up_on_still_count_in_max_tasks_process(kind: str) -> None:
    app = AsyncQueueTasks("t", config=QueueConfig(max_tasks_process=2))
    gate, quick_runs = threading.Event(), threading.Event()
    lock = threading.Lock()
    bodies = {"now": 0, "most": 0}

    def body() -> None:
        with lock:
            bodies["now"] += 1
            bodies["most"] = max(bodies["most"], bodies["now"])
        try:
            gate.wait(30)  # a blocking call that hangs
        finally:
            with lock:
                bodies["now"] -= 1

    if kind == "function":

        @app.task(name="stuck", max_time=0.2)
        def stuck_function(i: int) -> None:
            body()

    else:

        @app.task(name="stuck", max_time=0.2)
        def stuck_generator(i: int) -> Iterator[int]:
            body()
            yield i

    @app.task
    def quick() -> str:
        quick_runs.set()
        return "ok"

    @app.task
    async def ping() -> str:
        return "pong"

    try:
        async with app:
            tasks = [await app.add_task("stuck", i) for i in range(6)]
            for task in tasks:
                record = await app.wait(task.uuid, timeout=10)
                assert record.status is TaskStatus.ERROR and "max_time" in (record.error or "")
            late = await app.add_task("quick")
            # Both threads still run: the sync task waits for one; an async one does not.
            assert (await app.add_task("ping", timeout=5)).returning == "pong"
            assert not await waits(quick_runs, 0.5)
            hung = still_running()  # what `qtasks run` names at its stop, not waiting for it
            assert len(hung) == 2 and {call.run.task.name for call in hung} == {"stuck"}
            gate.set()
            assert (await app.wait(late.uuid, timeout=10)).status is TaskStatus.SUCCESS
            with anyio.fail_after(10):
                for call in hung:
                    assert call.done is not None
                    await call.done.wait()  # the thread returned, its token back
            assert not still_running()
    finally:
        gate.set()
    assert bodies["most"] == 2


@pytest.mark.parametrize("how", ["max_time", "cancel"])
async def test_a_concurrency_slot_is_kept_while_the_thread_runs(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qtasks.worker")
    app = AsyncQueueTasks("t", config=QueueConfig(lease=1.0))
    uuid = await a_slot_is_kept_while_its_thread_runs(app, how)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if uuid in r.getMessage()]
    if how == "max_time":  # the task's failure, logged when it is settled
        failed = [m for level, m in said if level == logging.ERROR]
        assert len(failed) == 1 and "failed: TaskMaxTimeError" in failed[0], said
        said = [(level, m) for level, m in said if level != logging.ERROR]
    assert [level for level, _ in said] == [logging.WARNING, logging.INFO], said
    assert "sync task call_api" in said[0][1] and "concurrency slot" in said[0][1]
    assert f"given up on ({'max_time' if how == 'max_time' else 'cancelled'})" in said[0][1]
    assert "returned" in said[1][1]


async def test_a_retry_waits_for_the_thread_of_the_attempt_before_it() -> None:
    app = AsyncQueueTasks("t", config=QueueConfig(lease=1.0))
    gate, again = threading.Event(), threading.Event()
    attempts: list[int] = []

    @app.task(concurrency_key="key", max_concurrency=1, max_time=0.2, retry=1, retry_backoff=0)
    def call_api(key: str) -> int:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            gate.wait(30)
        else:
            again.set()
        return len(attempts)

    try:
        async with app:
            task = await app.add_task("call_api", "k")
            assert not await waits(again, 2 * app.config.lease)
            gate.set()
            record = await app.wait(task.uuid, timeout=10)
    finally:
        gate.set()
    assert (record.status, record.attempt, record.returning) == (TaskStatus.SUCCESS, 2, 2)


async def test_a_stopping_worker_leaves_the_slot_of_a_running_thread_to_its_lease() -> None:
    app = AsyncQueueTasks("t", config=QueueConfig(lease=30, shutdown_grace=0.5))
    gate, runs = threading.Event(), threading.Event()

    @app.task(concurrency_key="key", max_concurrency=1, max_time=0.2)
    def hang(key: str) -> None:
        runs.set()
        gate.wait(30)

    try:
        with anyio.fail_after(10):  # the stop is not held up by the thread (it hangs 30 s)
            async with app:
                task = await app.add_task("hang", "k")
                assert (await app.wait(task.uuid, timeout=5)).status is TaskStatus.ERROR
                assert runs.is_set()
        async with app:
            state: dict[str, Any] = await app.global_config.flow_state()  # type: ignore[attr-defined]
    finally:
        gate.set()
    assert state["slots:hang:k"]["held"] == 1  # not freed at the stop: its lease frees it


class Conn:
    """A connection a sync task is given: using it after it was closed is the fault."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.closed = False

    def query(self) -> None:
        self.events.append("query on a closed connection" if self.closed else "query")


@pytest.mark.parametrize("how", ["max_time", "cancel"])
async def test_a_task_scoped_dependency_waits_for_the_thread_given_up_on(how: str) -> None:
    app = AsyncQueueTasks("t")
    gate, started, closed = threading.Event(), threading.Event(), threading.Event()
    events: list[str] = []

    def connect() -> Iterator[Conn]:
        conn = Conn(events)
        try:
            yield conn
        except BaseException as exc:
            events.append(f"rollback ({type(exc).__name__})")
            raise
        finally:
            conn.closed = True
            events.append("closed")
            closed.set()

    @app.task(max_time=0.3 if how == "max_time" else None)
    def report(conn: Conn = Depends(connect)) -> None:
        started.set()
        gate.wait(30)  # a blocking call that Python cannot interrupt
        conn.query()

    try:
        async with app:
            task = await app.add_task("report")
            assert await waits(started, 10)
            if how == "cancel":
                await app.cancel(task.uuid, "enough")
            record = await app.wait(task.uuid, timeout=10)
            assert record.status is (TaskStatus.ERROR if how == "max_time" else TaskStatus.CANCEL)
            assert not closed.is_set(), events  # settled, but its thread still holds the conn
            gate.set()
            assert await waits(closed, 10)
    finally:
        gate.set()
    error = TaskMaxTimeError if how == "max_time" else TaskCancelledError
    assert events == ["query", f"rollback ({error.__name__})", "closed"]


async def test_a_stopping_worker_tears_down_what_a_running_thread_was_given(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="qtasks.worker")
    app = AsyncQueueTasks("t", config=QueueConfig(shutdown_grace=0.5))
    gate, started, returned = threading.Event(), threading.Event(), threading.Event()
    events: list[str] = []

    def pool() -> Iterator[str]:
        yield "pool"
        events.append("pool closed")

    def connect(pool: str = Depends(pool, scope="worker")) -> Iterator[Conn]:
        conn = Conn(events)
        try:
            yield conn
        finally:
            conn.closed = True
            events.append("conn closed")

    @app.task(max_time=0.2)
    def report(conn: Conn = Depends(connect)) -> None:
        started.set()
        gate.wait(30)
        conn.query()
        returned.set()

    try:
        with anyio.fail_after(10):  # the stop is not held up by the thread (it hangs 30 s)
            async with app:
                task = await app.add_task("report")
                assert await waits(started, 10)
                assert (await app.wait(task.uuid, timeout=10)).status is TaskStatus.ERROR
                assert events == []
        # Torn down at the stop, the task scope before the worker's.
        assert events == ["conn closed", "pool closed"]
        said = [r.getMessage() for r in caplog.records if task.uuid in r.getMessage()]
        assert any("torn down while its thread still runs" in line for line in said), said
        gate.set()
        assert await waits(returned, 10)
    finally:
        gate.set()
    assert events == ["conn closed", "pool closed", "query on a closed connection"]  # once
