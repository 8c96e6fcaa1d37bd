"""The in-memory broker begins records with their claim (BeginOnClaim), as Redis does: the
core's own tests run the path the Redis worker runs. Only deliveries that start at once are
begun with the claim; a cancel made while one waits holds, with no time window."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest
from begin_scenarios import (
    cancel_while_waiting,
    cancelled_while_telling,
    claim_as_the_worker_stops,
    count_begins,
    lost_deliveries_are_told_once,
    sharing,
    taken_over_while_waiting,
)

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryStorage, QueueConfig, hookimpl
from qtasks.executor import TaskRun
from qtasks.memory.broker import _body_attempt
from qtasks.messages import Codec, Message
from qtasks.record import TaskRecord, TaskStatus
from qtasks.worker import QueueWorker

pytestmark = pytest.mark.anyio


def counting_app(concurrency: int, prefetch: int) -> tuple[AsyncQueueTasks, list[str]]:
    """An in-memory app, and the uuids its storage is asked to ``begin``, as they come."""
    app = AsyncQueueTasks(
        "begin-on-claim",
        config=QueueConfig(
            max_tasks_process=concurrency,
            prefetch=prefetch,
            shutdown_grace=1.0,
            plugins_disabled=["*"],
        ),
    )
    return app, count_begins(app)


async def test_an_idle_worker_starts_tasks_with_the_record_its_claim_began() -> None:
    app, calls = counting_app(concurrency=4, prefetch=4)

    @app.task
    async def double(i: int) -> int:
        return 2 * i

    async with app:
        done = [await app.add_task("double", i, timeout=5) for i in range(5)]
    assert [(t.status, t.returning, t.attempt) for t in done] == [
        (TaskStatus.SUCCESS, 2 * i, 1) for i in range(5)
    ]
    assert calls == [], "each was begun by the claim that took it"


async def test_a_cancel_while_a_delivery_waits_holds_without_any_cancel_notice() -> None:
    app, begins = counting_app(concurrency=1, prefetch=3)
    await cancel_while_waiting(app, begins)


async def test_a_cancel_heard_after_a_claim_began_the_record_stops_the_task_before_it_runs() -> (
    None
):
    """The claim began the record (the runner was free), then the cancel notice arrives
    before the runner got to the task: it never starts."""
    app, _ = counting_app(concurrency=1, prefetch=1)
    worker = app.worker
    assert isinstance(worker, QueueWorker)
    ran: list[str] = []

    @app.task
    async def job(name: str) -> str:
        ran.append(name)
        return name

    cancelled = anyio.Event()

    class CancelOnReceipt:
        """Cancels each task from the storage (as another process would) when the worker
        received it: its record was begun by the claim, the runner has not started it."""

        @hookimpl
        async def qtasks_worker_task_received(self, app: Any, message: Any) -> None:
            begun = await app.get(message.uuid)
            assert begun.status is TaskStatus.PROCESS, "the claim began it"
            await app.storage.cancel(message.uuid, "too late to start")
            cancelled.set()

    app.hooks.register(CancelOnReceipt())
    async with app:
        task = await app.add_task("job", "x")
        with anyio.fail_after(5):
            await cancelled.wait()
        done = await app.wait(task.uuid, timeout=5)
    assert ran == []
    assert (done.status, done.cancel_reason) == (TaskStatus.CANCEL, "too late to start")


async def test_a_delivery_begun_with_its_claim_and_handed_back_is_queued_again() -> None:
    """Stopped before a runner took it, a delivery begun with its claim goes back to the
    broker with its record ``new`` again: not a ``process`` record nobody runs, and no lost
    attempt in the attempt log when the next delivery begins it."""
    app, _ = counting_app(concurrency=1, prefetch=1)
    storage, broker, worker = app.storage, app.broker, app.worker
    await app.start()
    try:
        task = await app.add_task("anything")
        async with broker.consume_begun(  # type: ignore[attr-defined]
            prefetch=1, storage=storage, worker=worker.id, starts=lambda: 1
        ) as deliveries:
            delivery = await deliveries.__anext__()
            assert delivery.begun.status is TaskStatus.PROCESS  # begun by the claim
            worker._local.append((0, 0, delivery))
            worker._start_at_once.add(delivery.token)
            await worker._hand_back(app)
        record = await storage.get(task.uuid)
        assert record is not None and record.status is TaskStatus.NEW
        assert (await broker.stats()).ready_by_priority == {0: 1}
        async with broker.consume_begun(  # type: ignore[attr-defined]
            prefetch=1, storage=storage, worker="another", starts=lambda: 1
        ) as deliveries:
            again = await deliveries.__anext__()
            assert (again.id, again.begun.worker) == (task.uuid, "another")
        assert await storage.attempts(task.uuid) == []  # type: ignore[attr-defined]
    finally:
        await app.aclose()


async def test_a_claim_woken_as_the_worker_stops_is_handed_back_with_its_record_new() -> None:
    app, _ = counting_app(concurrency=1, prefetch=1)

    @app.task
    async def noop(i: int) -> int:
        return 2 * i

    await claim_as_the_worker_stops(app)


async def test_a_claim_that_dead_letters_lost_deliveries_fires_the_hook_once_each() -> None:
    app = AsyncQueueTasks(
        "begin-on-claim",
        config=QueueConfig(max_deliveries=1, lease=0.2, shutdown_grace=1.0),
    )

    @app.task
    async def noop(i: int) -> int:
        return 2 * i

    await lost_deliveries_are_told_once(app)


async def test_a_broker_whose_claim_takes_no_ended_still_serves() -> None:
    """``consume_begun``'s ``ended`` came after the capability: a broker written before it
    (no such parameter) is called without it, and its tasks run."""
    from collections.abc import Callable, Sequence
    from contextlib import AbstractAsyncContextManager

    from qtasks.components import Storage
    from qtasks.memory import MemoryBroker

    class OlderBroker(MemoryBroker):
        def consume_begun(  # type: ignore[override]
            self,
            *,
            prefetch: int,
            storage: Storage,
            worker: str,
            starts: Callable[[], int],
            published: Callable[[Sequence[str]], None] | None = None,
        ) -> AbstractAsyncContextManager[Any]:
            return super().consume_begun(
                prefetch=prefetch,
                storage=storage,
                worker=worker,
                starts=starts,
                published=published,
            )

    app = AsyncQueueTasks(
        "begin-on-claim", broker=OlderBroker(), config=QueueConfig(plugins_disabled=["*"])
    )

    @app.task
    async def double(i: int) -> int:
        return 2 * i

    async with app:
        done = await app.add_task("double", 21, timeout=5)
    assert (done.status, done.returning) == (TaskStatus.SUCCESS, 42)


async def test_a_last_delivery_whose_lease_runs_out_while_it_runs_fires_the_hook_once() -> None:
    """The only allowed delivery's run stalls the loop past its lease, then waits: the
    worker finds the lease lost and cancels the run, whose settle stores nothing; the
    worker's next claim dead-letters the message and ends its record, and
    ``qtasks_task_dead_lettered`` fires then, once (before, nothing fired on this path)."""
    lease = 0.3
    app = AsyncQueueTasks(
        "begin-on-claim",
        config=QueueConfig(
            max_tasks_process=1, prefetch=1, lease=lease, max_deliveries=1, shutdown_grace=1.0
        ),
    )
    heard: list[str] = []
    told, settled = anyio.Event(), anyio.Event()

    class Watch:
        @hookimpl
        def qtasks_task_dead_lettered(self, record: TaskRecord, reason: str) -> None:
            heard.append(reason)
            told.set()

        @hookimpl
        def qtasks_worker_execute_after(self, record: TaskRecord) -> None:
            settled.set()

    app.add_plugin(Watch())

    @app.task
    async def hog() -> str:
        time.sleep(lease * 2)  # noqa: ASYNC251 - stalls the loop on purpose: the lease runs out
        await anyio.Event().wait()  # until the worker cancels it (its lease is lost)
        return "never"

    async with app:
        task = await app.add_task("hog")
        with anyio.fail_after(10):
            await settled.wait()  # the run's settle is over: whatever it fires has fired
            await told.wait()
        final = await app.wait(task.uuid, timeout=5)
    assert (final.status, final.token) == (TaskStatus.ERROR, "dead-letter")
    assert final.error is not None and final.error.startswith("dead-lettered: delivery limit")
    assert heard == [final.error]


async def test_a_settle_after_a_claim_ended_the_record_fires_nothing_more() -> None:
    """A worker that consumes through ``BeginOnClaim`` holds a message's last allowed
    delivery; its lease runs out and a claim dead-letters the message and ends the record
    (that claim's worker fires the hook). The holder's settle then finds the lease lost and
    its fenced save refused: it fires nothing (before, it fired, as the claim did not)."""
    app = AsyncQueueTasks("begin-on-claim", config=QueueConfig(max_deliveries=1))
    heard: list[str] = []
    told = anyio.Event()

    class Watch:
        @hookimpl
        def qtasks_task_dead_lettered(self, record: TaskRecord, reason: str) -> None:
            heard.append(reason)
            told.set()

    app.add_plugin(Watch())

    @app.task
    async def noop(i: int) -> int:
        return 2 * i

    worker = app.worker
    assert isinstance(worker, QueueWorker)
    await app.start()
    try:
        broker, storage = app.broker, app.storage
        task = await app.add_task("noop", 1)
        async with broker.consume_begun(  # type: ignore[attr-defined]
            prefetch=1, storage=storage, worker="gone", starts=lambda: 1
        ) as deliveries:
            held = await deliveries.__anext__()  # its last allowed delivery
        # (leaving the consumer handed it back: its lease is gone, as when it runs out)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run, app)
            with anyio.fail_after(5):  # the worker's claim dead-letters it, ends the record
                await told.wait()
            ended = await storage.get(task.uuid)
            assert ended is not None and ended.status is TaskStatus.ERROR
            message = app.codec.decode(held.body)
            run = TaskRun(
                app=app, task=app.tasks["noop"], message=message, record=held.begun, delivery=held
            )
            assert await worker._settlement._dead_lettered(app, run, held) is True
            worker.stop()
        assert await storage.get(task.uuid) == ended, "the refused save wrote"
    finally:
        await app.aclose()
    assert ended is not None and heard == [ended.error]


@pytest.mark.parametrize(
    "body",
    [
        Codec().encode(Message("u", "t", attempt=3)).body,  # the fast path
        Codec().encode(Message("u", "t", kwargs={"attempt": 7}, attempt=2)).body,  # nested key
        Codec().encode(Message("u", "t", args=['"attempt":9,'], attempt=4)).body,  # in a string
        Codec().encode(Message("u", "t", kwargs={'"attempt': 1}, attempt=5)).body,  # escaped
        b'{"v":1,"uuid":"u","attempt":-1}',  # not digits: parsed
        b'{"v": 1, "attempt": 6}',  # not compact: parsed
        b'{"uuid":"u","attempt":8}',  # not the codec's: parsed
        b'{"v":1,"attempt":true}',
        b"[1, 2]",
        b"\xff not json",
    ],
)
def test_the_attempt_a_claim_begins_with_is_the_messages_own(body: bytes) -> None:
    """The memory broker reads a message's ``attempt`` for the record it begins without
    parsing the body when the codec wrote it; it is always what parsing gives."""
    try:
        expected = json.loads(body).get("attempt")
    except (ValueError, AttributeError):
        expected = None
    if not isinstance(expected, int) or isinstance(expected, bool):
        expected = None
    assert _body_attempt(body) == expected


async def test_a_consumer_cancelled_while_telling_tells_once_and_hands_back_its_claim() -> None:
    app = AsyncQueueTasks(
        "begin-on-claim",
        config=QueueConfig(max_deliveries=2, lease=30, plugins_disabled=["*"]),
    )

    @app.task
    async def noop(i: int) -> int:
        return i

    await cancelled_while_telling(app)


async def test_a_waiting_delivery_another_worker_took_over_is_not_begun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The in-memory broker's waiting deliveries are begun by the worker (not with their
    claim, nor in a settle call: the broker is local), fenced by the lease their delivery
    tells (LeaseDeadline): one another worker took over is dropped unstarted. Before, the
    busy worker began it and ran it a second time."""
    await taken_over_while_waiting(*sharing(MemoryBroker(), MemoryStorage()), monkeypatch)
