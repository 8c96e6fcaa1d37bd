"""The settle step carries the begin step (SettleBegin): a busy runner settles its task and
begins the next in one call. The in-memory broker implements the capability, but the worker
folds only with a remote broker (a local one makes no round trip to save), so these tests run
the in-memory components declared remote."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio
import pytest
from begin_scenarios import (
    cancel_while_waiting,
    count_begins,
    sharing,
    taken_over_while_waiting,
)

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryStorage, QueueConfig, TaskStatus
from qtasks.components import Delivery, SettleBegin, Storage
from qtasks.errors import BrokerConnectionError
from qtasks.record import TaskRecord
from qtasks.task import AsyncTask
from qtasks.worker import QueueWorker

pytestmark = pytest.mark.anyio


class RemoteBroker(MemoryBroker):
    """The in-memory broker declared remote, recording each ``ack_finals_begin`` call as
    (uuids settled, uuids begun); its calls can be held at a gate, fail, or leave records
    unreturned."""

    local = False

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[list[str], list[str]]] = []
        self.gates: list[anyio.Event] = []
        """Each call waits at the first gate left, if any (taking it)."""
        self.fail_begins = 0
        """How many of the next calls with begins raise a connection error."""
        self.unreturned = False

    async def ack_finals_begin(
        self,
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        begins: Sequence[TaskRecord],
        *,
        enqueued: list[str] | None = None,
    ) -> tuple[list[bool], list[TaskRecord | None]]:
        self.calls.append(([r.uuid for _, r in finals], [r.uuid for r in begins]))
        if self.gates:
            await self.gates.pop(0).wait()
        if begins and self.fail_begins:
            self.fail_begins -= 1
            raise BrokerConnectionError("the server went away")
        saved, begun = await super().ack_finals_begin(storage, finals, begins, enqueued=enqueued)
        return saved, [None] * len(begun) if self.unreturned else begun


def remote_app(concurrency: int, prefetch: int) -> tuple[AsyncQueueTasks, RemoteBroker]:
    broker = RemoteBroker()
    app = AsyncQueueTasks(
        broker=broker,
        storage=MemoryStorage(),
        config=QueueConfig(
            max_tasks_process=concurrency, prefetch=prefetch, plugins_disabled=["*"]
        ),
    )
    return app, broker


class Blocked:
    """An app whose one runner is held by a ``blocker`` task while ``job`` tasks wait in the
    worker (claimed, their records still queued)."""

    def __init__(self, app: AsyncQueueTasks) -> None:
        self.app = app
        self.release, self.started = anyio.Event(), anyio.Event()

        @app.task
        async def blocker() -> str:
            self.started.set()
            await self.release.wait()
            return "blocker"

        @app.task
        async def job(name: str) -> str:
            return name

    async def start(self, *names: str) -> tuple[AsyncTask, list[AsyncTask]]:
        """The blocker running, then one job per name waiting in the worker."""
        worker = self.app.worker
        assert isinstance(worker, QueueWorker)
        first = await self.app.add_task("blocker")
        with anyio.fail_after(5):
            await self.started.wait()
        jobs = [await self.app.add_task("job", name) for name in names]
        with anyio.fail_after(5):
            while worker.waiting < len(names):  # noqa: ASYNC110 - no event for this
                await anyio.sleep(0.002)
        return first, jobs


async def test_a_local_broker_does_not_fold() -> None:
    """The plain in-memory broker has the capability, yet its begins are not folded."""
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    assert isinstance(app.broker, SettleBegin)
    folded: list[int] = []
    plain = app.broker.ack_finals_begin

    async def counted(*args: Any, **kw: Any) -> tuple[list[bool], list[TaskRecord | None]]:
        folded.append(1)
        return await plain(*args, **kw)

    app.broker.ack_finals_begin = counted  # type: ignore[method-assign]

    @app.task
    async def one(i: int) -> int:
        return i

    async with app:
        tasks = [await app.add_task("one", i) for i in range(50)]
        assert [(await t.wait_result(5)).returning for t in tasks] == list(range(50))
    assert folded == []
    await app.aclose()


async def test_a_runners_settle_and_its_next_begin_go_in_one_call() -> None:
    """One runner, busy; two tasks wait in the worker. When it ends its task, the settle of
    that task and the begin of the next are one call; so is the next pair."""
    app, broker = remote_app(concurrency=1, prefetch=2)
    begins = count_begins(app)
    blocked = Blocked(app)
    async with app:
        first, (a, b) = await blocked.start("a", "b")
        blocked.release.set()
        results = [(await t.wait_result(5)).returning for t in (first, a, b)]
    assert results == ["blocker", "a", "b"]
    assert broker.calls[:2] == [([first.uuid], [a.uuid]), ([a.uuid], [b.uuid])]
    assert begins == [a.uuid, b.uuid], "begun once each, in the settle calls only"
    await app.aclose()


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (polled: what it watches has no event), within 5 s."""
    with anyio.fail_after(5):
        while not condition():  # noqa: ASYNC110 - what it watches has no event
            await anyio.sleep(0.002)


async def test_a_begin_goes_in_a_second_call_alongside_and_a_third_waits() -> None:
    """Three runners; three tasks wait. The first runner's settle and next begin go in a
    call held at a gate; the second's begin does not wait for its reply: a second call goes
    alongside (held too), with that begin only; the third begin waits, and goes once one
    returns (again alone, the other being in flight); the settles go in a later call."""
    app, broker = remote_app(concurrency=3, prefetch=3)
    worker = app.worker
    assert isinstance(worker, QueueWorker)
    go = {name: anyio.Event() for name in ("x", "y", "z")}
    running: set[str] = set()

    @app.task
    async def step(name: str) -> str:
        running.add(name)
        if name in go:
            await go[name].wait()
        return name

    async with app:
        x, y, z = [await app.add_task("step", name) for name in ("x", "y", "z")]
        await until(lambda: running == {"x", "y", "z"})
        c, d, e = [await app.add_task("step", name) for name in ("c", "d", "e")]
        await until(lambda: worker.waiting == 3)
        first, second = broker.gates[:] = [anyio.Event(), anyio.Event()]
        go["x"].set()
        await until(lambda: len(broker.calls) == 1)
        go["y"].set()
        await until(lambda: len(broker.calls) == 2)
        assert broker.calls == [([x.uuid], [c.uuid]), ([], [d.uuid])]
        go["z"].set()
        settler = worker._settlement._batch
        assert settler is not None
        await until(lambda: bool(settler._rounds))  # the third begin waits
        assert len(broker.calls) == 2, "a third call went while two were in flight"
        first.set()
        await until(lambda: len(broker.calls) == 3)
        assert broker.calls[2] == ([], [e.uuid])
        second.set()
        results = [(await t.wait_result(5)).returning for t in (x, y, z, c, d, e)]
    assert results == ["x", "y", "z", "c", "d", "e"]
    await app.aclose()


async def test_a_begin_whose_call_fails_hands_its_task_back_and_the_settle_is_retried() -> None:
    app, broker = remote_app(concurrency=1, prefetch=1)
    blocked = Blocked(app)
    async with app:
        first, [later] = await blocked.start("job")
        broker.fail_begins = 1
        blocked.release.set()
        assert (await first.wait_result(5)).returning == "blocker"
        done = await later.wait_result(5)  # handed back (after a second), then run
    assert (done.status, done.returning) == (TaskStatus.SUCCESS, "job")
    # The only call with the blocker's result failed: it was stored by a retry.
    assert broker.calls == [([first.uuid], [later.uuid])]
    await app.aclose()


async def test_a_record_the_call_does_not_return_is_begun_alone() -> None:
    app, broker = remote_app(concurrency=1, prefetch=1)
    begins = count_begins(app)
    broker.unreturned = True
    blocked = Blocked(app)
    async with app:
        _, [later] = await blocked.start("job")
        blocked.release.set()
        done = await later.wait_result(5)
    assert (done.status, done.returning, done.attempt) == (TaskStatus.SUCCESS, "job", 1)
    assert begins == [later.uuid, later.uuid], "in the call, then alone"
    await app.aclose()


async def test_a_cancel_while_a_delivery_waits_holds_when_begins_are_folded() -> None:
    app, _ = remote_app(concurrency=1, prefetch=3)
    await cancel_while_waiting(app, count_begins(app))
    await app.aclose()


async def test_a_waiting_delivery_another_worker_took_over_is_dropped_unstarted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A delivery waits in a worker whose renewals do not get through (its loop stalled, or
    it is cut off) until its lease runs out and another worker claims and runs it. Its begin,
    carried by the busy worker's next settle call, is refused (the record stays the other
    delivery's) and the worker drops it unstarted: before, it ran it too."""
    await taken_over_while_waiting(*sharing(RemoteBroker(), MemoryStorage()), monkeypatch)
