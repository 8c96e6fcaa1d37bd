"""Sync generator tasks keep one worker thread for their whole life (creation, every step, the
close), and are closed in it when ``max_time``, a cancel or the worker's stop ends them: their
``finally`` runs there, at once between steps, or as soon as a step given up on returns."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator

import anyio
import anyio.from_thread
import pytest
from sync_threads import waits

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus

pytestmark = pytest.mark.anyio
WAIT = 10


async def test_a_generator_keeps_its_thread_while_another_runs_beside_it() -> None:
    """Two generators hold a sqlite3 connection across ``yield``. Their first steps run at once
    (two threads); then ``a``'s next step is asked for after ``b``'s first returned, while
    ``b`` waits: a thread pool would give ``a`` the thread ``b`` just left."""
    app = AsyncQueueTasks("t")
    barrier = threading.Barrier(2, timeout=WAIT)
    a_handled = threading.Event()
    b_handled, a_resumed = anyio.Event(), anyio.Event()
    seen: dict[str, list[int]] = {}

    async def handler(value: str) -> str:
        if value == "a0":
            a_handled.set()
            await b_handled.wait()
        elif value == "b0":
            b_handled.set()
            await a_resumed.wait()
        return value

    @app.task(generate_handler=handler)
    def rows(name: str) -> Iterator[str]:
        idents = seen[name] = [threading.get_ident()]
        conn = sqlite3.connect(":memory:")  # usable only in the thread that made it
        try:
            conn.execute("create table t(x)")
            conn.executemany("insert into t values (?)", [(i,) for i in range(3)])
            barrier.wait()
            if name == "b" and not a_handled.wait(WAIT):
                raise AssertionError("a's first step was not handled")
            for (x,) in conn.execute("select x from t"):
                idents.append(threading.get_ident())
                yield f"{name}{x}"
                if name == "a" and x == 0:
                    anyio.from_thread.run_sync(a_resumed.set)
        finally:
            idents.append(threading.get_ident())
            conn.close()

    with anyio.fail_after(WAIT):
        async with app:
            a, b = await app.add_task("rows", "a"), await app.add_task("rows", "b")
            finals = [await app.wait(a.uuid, timeout=WAIT), await app.wait(b.uuid, timeout=WAIT)]
    for final, name in zip(finals, "ab", strict=True):
        assert final.status is TaskStatus.SUCCESS, final.traceback
        assert final.returning == [f"{name}0", f"{name}1", f"{name}2"]
        assert len(seen[name]) == 5 and len(set(seen[name])) == 1, seen  # made, 3 steps, closed
    assert seen["a"][0] != seen["b"][0]


@pytest.mark.parametrize("how", ["max_time", "cancel", "stop"])
async def test_a_generator_given_up_on_in_a_step_is_closed_in_its_thread_when_it_returns(
    how: str,
) -> None:
    app = AsyncQueueTasks("t", config=QueueConfig(shutdown_grace=0.3))
    gate, blocked, closed = threading.Event(), threading.Event(), threading.Event()
    idents: list[int] = []
    events: list[str] = []

    @app.task(max_time=0.3 if how == "max_time" else None)
    def slow() -> Iterator[int]:
        idents.append(threading.get_ident())
        try:
            yield 0
            blocked.set()
            gate.wait(30)  # a step Python cannot interrupt
            yield 1
            events.append("resumed")
        except GeneratorExit:
            events.append("GeneratorExit")
            raise
        finally:
            idents.append(threading.get_ident())
            events.append("finally")
            closed.set()

    try:
        with anyio.fail_after(WAIT):  # the stop does not wait for the step
            async with app:
                task = await app.add_task("slow")
                assert await waits(blocked, WAIT)
                if how == "cancel":
                    await app.cancel(task.uuid, "enough")
                if how != "stop":
                    record = await app.wait(task.uuid, timeout=WAIT)
                    status = TaskStatus.ERROR if how == "max_time" else TaskStatus.CANCEL
                    assert record.status is status, record
        assert not closed.is_set()  # the step still runs
        gate.set()
        assert await waits(closed, WAIT)
    finally:
        gate.set()
    assert events == ["GeneratorExit", "finally"]
    assert len(idents) == 2 and len(set(idents)) == 1


async def test_a_generator_cancelled_between_steps_is_closed_in_its_thread_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="qtasks.worker")
    app = AsyncQueueTasks("t")
    handling = anyio.Event()
    closed = threading.Event()
    idents: list[int] = []

    async def hold(value: int) -> int:
        handling.set()
        await anyio.sleep_forever()  # the loop stores the step while the thread waits
        return value

    @app.task(generate_handler=hold)
    def gen() -> Iterator[int]:
        idents.append(threading.get_ident())
        try:
            yield 0
        finally:
            idents.append(threading.get_ident())
            closed.set()

    with anyio.fail_after(WAIT):
        async with app:
            task = await app.add_task("gen")
            await handling.wait()
            await app.cancel(task.uuid, "enough")
            assert (await app.wait(task.uuid, timeout=WAIT)).status is TaskStatus.CANCEL
            assert await waits(closed, WAIT)
    assert len(idents) == 2 and len(set(idents)) == 1
    said = [r.getMessage() for r in caplog.records if task.uuid in r.getMessage()]
    assert not any("given up on" in line for line in said), said  # no thread left behind
