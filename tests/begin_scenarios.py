"""The begin step's scenarios, run on the backends they apply to (memory, Redis, RabbitMQ)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, TaskRecord, TaskStatus, hookimpl
from qtasks.components import BeginOnClaim, Broker, SettleBegin, Storage
from qtasks.errors import StorageConnectionError
from qtasks.memory import MemoryStorage
from qtasks.task import AsyncTask
from qtasks.worker import QueueWorker


def count_begins(app: AsyncQueueTasks) -> list[str]:
    """The uuids of the records the app's storage is asked to ``begin``, as they come: by a
    call of its own, or folded into a settle call of the broker (:class:`SettleBegin`)."""
    storage, broker = app.storage, app.broker
    calls: list[str] = []
    inside: list[bool] = []  # within the broker's call: its begins are counted already
    plain_begin = storage.begin

    async def counted_begin(record: TaskRecord, *, generation: int = 0) -> TaskRecord:
        if not inside:
            calls.append(record.uuid)
        return await plain_begin(record, generation=generation)

    storage.begin = counted_begin  # type: ignore[method-assign]
    if isinstance(broker, SettleBegin):
        plain_settle = broker.ack_finals_begin

        async def counted_settle(
            storage: Storage, finals: Any, begins: Sequence[TaskRecord], **kw: Any
        ) -> tuple[list[bool], list[TaskRecord | None]]:
            calls.extend(record.uuid for record in begins)
            inside.append(True)
            try:
                return await plain_settle(storage, finals, begins, **kw)
            finally:
                inside.pop()

        broker.ack_finals_begin = counted_settle  # type: ignore[method-assign]
    return calls


async def cancel_while_waiting(app: AsyncQueueTasks, begins: list[str]) -> None:
    """One runner (``app`` has concurrency 1 and a prefetch of 2 or more), busy; the next
    messages are claimed while it is. They start later, so their claim leaves their records
    queued, and each is begun when it starts: a cancel made while one waits is seen then,
    with no notice from the cancel feed (dropped here) and however soon after the claim it is
    made. Decided by state, not by time. ``begins`` lists the uuids the app's storage is asked
    to ``begin`` (filled by the caller's wrapper)."""
    worker = app.worker
    assert isinstance(worker, QueueWorker)
    worker._cancelled_elsewhere = lambda uuid, reason: None  # type: ignore[method-assign]
    release, started = anyio.Event(), anyio.Event()
    ran: list[str] = []

    @app.task
    async def blocker() -> None:
        started.set()
        await release.wait()

    @app.task
    async def job(name: str) -> str:
        ran.append(name)
        return name

    async with app:
        first = await app.add_task("blocker")
        with anyio.fail_after(5):
            await started.wait()
        doomed = await app.add_task("job", "doomed")
        kept = await app.add_task("job", "kept")
        with anyio.fail_after(5):  # both claimed by the worker and waiting in its queue
            while worker.waiting < 2:  # noqa: ASYNC110 - the worker has no event for this
                await anyio.sleep(0.002)
        for waiting in (doomed, kept):
            stored = await app.get(waiting.uuid)
            assert stored is not None and stored.status is TaskStatus.NEW, stored
        await app.storage.cancel(doomed.uuid, "changed my mind")
        release.set()
        assert (await kept.wait_result(5)).returning == "kept"
        assert (await first.wait_result(5)).status is TaskStatus.SUCCESS
    assert ran == ["kept"]
    final = await app.get(doomed.uuid)
    assert final is not None and final.status is TaskStatus.CANCEL
    assert begins == [doomed.uuid, kept.uuid], "the waiting ones are begun when they start"


HoldClaim = Callable[[AsyncQueueTasks], Callable[[], Awaitable[None]]]
"""Given a started app, makes its worker's idle claim wait for the worker's stop alone (a
publish does not end it) and returns a wait, with a deadline, until such a claim is
outstanding: for a backend whose claim a stop could otherwise miss or race."""


async def publish_as_the_worker_stops(
    app: AsyncQueueTasks, hold: HoldClaim | None = None
) -> AsyncTask:
    """Run ``app``'s worker (started) until it waits for a message, ask it to stop and
    publish a task ``noop`` as it does; return the task once the worker has stopped.

    Without ``hold``, the stop and the publish are made in the same turn (in memory, the
    claim the publish wakes is cancelled only at its next wait: it takes the message). With
    ``hold``, the worker's claim is held open first, the task published (the claim does not
    take it yet) and the stop then asked: the claim, cut short by the stop, takes the
    message every time, however the event loop orders the rest."""
    outstanding = None if hold is None else hold(app)
    async with anyio.create_task_group() as tg:
        await tg.start(app.worker.run, app)
        if outstanding is None:
            await anyio.wait_all_tasks_blocked()  # the worker waits for a message
            app.worker.stop()
            task = await app.add_task("noop", 4)  # no wait in between: the same turn
        else:
            await outstanding()
            task = await app.add_task("noop", 4)
            app.worker.stop()
    return task


def watch_put_backs(app: AsyncQueueTasks, refusal: Exception | None = None) -> list[str]:
    """The uuids of the records ``app``'s storage is asked to save as ``new`` again (a claim
    took the message of a record it began, and the worker or consumer put it back), as they
    come; each such save raises ``refusal`` when given."""
    storage = app.storage
    put_backs: list[str] = []
    plain_save = storage.save

    async def watched(record: TaskRecord, *, fence: str | None = None) -> bool:
        if record.status is TaskStatus.NEW:
            put_backs.append(record.uuid)
            if refusal is not None:
                raise refusal
        return bool(await plain_save(record, fence=fence))

    storage.save = watched  # type: ignore[method-assign]
    return put_backs


async def claim_as_the_worker_stops(app: AsyncQueueTasks, hold: HoldClaim | None = None) -> None:
    """An idle worker is asked to stop and a task ``noop`` is published as it does (see
    :func:`publish_as_the_worker_stops` for ``hold``): a claim takes the message and begins
    its record as the worker stops (in memory, a cancel reaches a woken task only at its next
    wait, so the delivery is handed to the worker; on Redis, the blocked claim is cut short
    and its reply read all the same, and the consumer hands it back). Either way it goes back
    unstarted with its record ``new``, not ``process`` (a waiter and the dashboard saw it
    running while nobody ran it), and the next worker runs it. ``app`` is started here and
    closed."""
    await app.start()
    try:
        put_backs = watch_put_backs(app)
        task = await publish_as_the_worker_stops(app, hold)
        # Else the claim missed the message and what follows holds trivially.
        assert put_backs == [task.uuid], "no put-back: no claim took the message as it stopped?"
        record = await app.get(task.uuid)
        assert record is not None
        assert (record.status, record.worker) == (TaskStatus.NEW, None)
        stats = await app.broker.stats()
        assert (stats.ready_by_priority, stats.in_flight) == ({0: 1}, 0)
        async with anyio.create_task_group() as tg:
            await tg.start(app.worker.run, app)
            done = await app.wait(task.uuid, timeout=5)
            app.worker.stop()
    finally:
        await app.aclose()
    assert (done.status, done.returning) == (TaskStatus.SUCCESS, 8)


async def lost_deliveries_are_told_once(app: AsyncQueueTasks) -> None:
    """``app`` (not started, ``max_deliveries=1``, a short lease, tasks ``noop`` declared):
    every allowed delivery of two tasks is lost (a consumer takes them and goes away without
    settling: its worker was killed); the broker dead-letters them on its own, and the worker
    learns it, from its claim (:class:`~qtasks.components.BeginOnClaim`: the claim ended the
    records) or from a notice (:class:`~qtasks.components.BuryNotice`: the worker ends them).
    Each record ends ``error`` and ``qtasks_task_dead_lettered`` fires once per message, with
    the record as ended and its error (before, neither path fired it: the metrics plugin and
    user plugins missed them). ``app`` is started here and closed."""
    heard: list[tuple[str, str, TaskStatus, str]] = []
    both = anyio.Event()

    class Watch:
        @hookimpl
        def qtasks_task_dead_lettered(self, record: TaskRecord, reason: str) -> None:
            heard.append((record.uuid, reason, record.status, record.token or ""))
            if len(heard) == 2:
                both.set()

    app.add_plugin(Watch())
    await app.start()
    try:
        tasks = [await app.add_task("noop", i) for i in range(2)]
        async with app.broker.consume(prefetch=2) as raw:  # never settled
            for _ in tasks:
                with anyio.fail_after(5):
                    await anext(raw)
        async with anyio.create_task_group() as tg:
            await tg.start(app.worker.run, app)
            with anyio.fail_after(10):
                await both.wait()
            # A task run after them: the claims that took it told nothing more.
            later = await app.add_task("noop", 3)
            assert (await later.wait_result(5)).returning == 6
            app.worker.stop()
        records = [await app.wait(task.uuid, timeout=5) for task in tasks]
    finally:
        await app.aclose()
    errors = {record.uuid: record.error or "" for record in records}
    assert all(error.startswith("dead-lettered: delivery limit") for error in errors.values())
    assert sorted(heard) == sorted(
        (uuid, error, TaskStatus.ERROR, "dead-letter") for uuid, error in errors.items()
    )


class SaveFailsOnce(MemoryStorage):
    """Its first save of the record of ``uuid`` raises (the storage down while ``buried()``
    ends the record); ``failed`` is set then."""

    def __init__(self) -> None:
        super().__init__()
        self.uuid = ""
        self.failed = anyio.Event()

    async def save(self, record: TaskRecord, *, fence: str | None = None) -> bool:
        if record.uuid == self.uuid and not self.failed.is_set():
            self.failed.set()
            raise StorageConnectionError("the storage is down (once)")
        return await super().save(record, fence=fence)


async def a_dead_letter_not_written_is_told_again(
    app: AsyncQueueTasks, storage: SaveFailsOnce
) -> None:
    """``app`` (not started, on ``storage``, a :class:`~qtasks.components.BuryNotice` broker
    with ``max_deliveries=1``, task ``noop`` declared): a task's one allowed delivery is lost
    (its consumer goes away without settling); the worker's consumer dead-letters it and
    tells it, and ``buried()`` cannot write the record (``storage`` raises once): it returns
    False, so the broker keeps the notice and tells it again. The record ends ``error`` (a
    waiter gets it), ``qtasks_task_dead_lettered`` fires once. Before, the notice was
    dropped and the record stayed ``new`` for ever. ``app`` is started here and closed."""
    heard: list[str] = []
    ended = anyio.Event()

    class Watch:
        @hookimpl
        def qtasks_task_dead_lettered(self, record: TaskRecord, reason: str) -> None:
            heard.append(record.uuid)
            ended.set()

    app.add_plugin(Watch())
    await app.start()
    try:
        task = await app.add_task("noop", 1)
        storage.uuid = task.uuid
        async with app.broker.consume(prefetch=1) as raw:  # never settled
            with anyio.fail_after(5):
                await anext(raw)
        async with anyio.create_task_group() as tg:
            await tg.start(app.worker.run, app)
            with anyio.fail_after(10):
                await storage.failed.wait()
            with anyio.fail_after(10):
                await ended.wait()
            app.worker.stop()
        record = await app.wait(task.uuid, timeout=5)
    finally:
        await app.aclose()
    assert record.status is TaskStatus.ERROR
    assert (record.error or "").startswith("dead-lettered: delivery limit reached")
    assert heard == [task.uuid]


async def cancelled_while_telling(app: AsyncQueueTasks) -> None:
    """``app`` (not started, ``max_deliveries=2``, a lease of seconds, task ``noop``
    declared): a message's every allowed delivery is lost, then a consumer's claim
    dead-letters it and takes a second message in the same claim; the consumer is cancelled
    while ``ended`` tells the first record (a worker stopping). The record is told once (it
    was told twice: the consumer's exit told it again), and the second message is handed back
    at once, not after its lease (the in-memory claim did not count it as held yet). ``app``
    is started here and closed."""
    await app.start()
    try:
        broker, storage = app.broker, app.storage
        assert isinstance(broker, BeginOnClaim)
        lost = await app.add_task("noop", 1)
        for _ in range(2):  # both allowed deliveries, never settled
            async with broker.consume(prefetch=1) as raw:
                with anyio.fail_after(5):
                    await anext(raw)
        second = await app.add_task("noop", 2)
        told: list[str] = []
        telling = anyio.Event()

        async def ended(record: TaskRecord) -> None:
            told.append(record.uuid)
            telling.set()
            await anyio.sleep_forever()  # cancelled here

        async def consume() -> None:
            async with broker.consume_begun(
                prefetch=2, storage=storage, worker="w", starts=lambda: 0, ended=ended
            ) as deliveries:
                await anext(deliveries)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            with anyio.fail_after(5):
                await telling.wait()
            tg.cancel_scope.cancel()
        assert told == [lost.uuid]
        async with broker.consume(prefetch=1) as raw:
            with anyio.fail_after(1):  # the lease is 30 s: only a hand-back comes this soon
                again = await anext(raw)
        assert again.id == second.uuid
    finally:
        await app.aclose()


def sharing(broker: Broker, storage: Storage) -> tuple[AsyncQueueTasks, AsyncQueueTasks]:
    """Two apps, ``busy`` and ``other``, on ``broker`` and ``storage``, as
    :func:`taken_over_while_waiting` takes them: one runner each, a prefetch of 1, a lease of
    0.3 s."""
    config = QueueConfig(lease=0.3, max_tasks_process=1, prefetch=1, plugins_disabled=["*"])
    busy, other = (
        AsyncQueueTasks(name, broker=broker, storage=storage, config=config)
        for name in ("busy", "other")
    )
    return busy, other


async def taken_over_while_waiting(
    busy: AsyncQueueTasks, other: AsyncQueueTasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``busy`` and ``other`` (not started; one runner each, a prefetch of 1, a short lease)
    serve one queue and one storage. ``busy`` runs a blocker while a job waits in it, whose
    renewals do not get through (its loop stalled, or it is cut off) until its lease runs out
    and ``other`` claims, begins and runs it. When the blocker ends, ``busy`` must neither
    begin the job (the record stays the other delivery's) nor run it. Both apps are closed."""
    release, running, finish = anyio.Event(), anyio.Event(), anyio.Event()
    runs: list[str] = []
    for app in (busy, other):

        @app.task(name="blocker")
        async def blocker() -> None:
            running.set()
            await release.wait()

        @app.task(name="job")
        async def job(where: str = app.name) -> str:
            runs.append(where)
            await finish.wait()
            return where

    worker = busy.worker
    assert isinstance(worker, QueueWorker)
    renew = worker._leases._renew

    async def running_only(app: Any, waiting: list[Any], runs: list[Any]) -> None:
        # The waiting job's renewals do not get through; the running blocker's do. Were the
        # blocker's lease to run out too, it would be ready a few milliseconds before the job,
        # and the other worker, started in between, would take it into its one slot and never
        # get to the job (seen once in a CI run).
        await renew(app, [], runs)

    async def until(condition: Callable[[], object]) -> None:
        with anyio.fail_after(10):
            while not condition():  # noqa: ASYNC110 - what it watches has no event
                await anyio.sleep(0.002)

    monkeypatch.setattr(worker._leases, "_renew", running_only)
    try:
        async with busy:
            await busy.add_task("blocker")
            with anyio.fail_after(10):
                await running.wait()
            task = await busy.add_task("job")
            await until(lambda: worker.waiting)
            async with other:
                await until(lambda: runs)  # the other worker runs it once its lease ends
                begun = await other.get(task.uuid)
                assert begun is not None and begun.status is TaskStatus.PROCESS
                release.set()  # the busy worker settles the blocker and takes the job
                await until(lambda: not (worker.waiting or worker.running) or "busy" in runs)
                now = await other.get(task.uuid)
                finish.set()
                assert runs == ["other"], "the stale delivery was run"
                assert now is not None and now.token == begun.token, "the stale one began it"
                done = await task.wait_result(10)
        assert (done.status, done.returning) == (TaskStatus.SUCCESS, "other")
        assert runs == ["other"]
    finally:
        finish.set()
        release.set()
        await busy.aclose()
        await other.aclose()
