"""The in-memory broker begins records with their claim (BeginOnClaim), as Redis does: the
core's own tests run the path the Redis worker runs. Only deliveries that start at once are
begun with the claim; a cancel made while one waits holds, with no time window."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from begin_scenarios import cancel_while_waiting, claim_as_the_worker_stops, count_begins

from qtasks import AsyncQueueTasks, QueueConfig, hookimpl
from qtasks.memory.broker import _body_attempt
from qtasks.messages import Codec, Message
from qtasks.record import TaskStatus
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
