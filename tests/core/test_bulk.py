"""Bulk enqueue (``qtasks.bulk``) with third-party components, and every enqueue (add_task,
add_tasks, run_workflow) under cancellation."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryStorage, chain, group, hookimpl
from qtasks import bulk as bulk_module
from qtasks.components import Storage
from qtasks.errors import TaskArgumentsError
from qtasks.messages import Envelope
from qtasks.record import TaskRecord

pytestmark = pytest.mark.anyio


class OlderBulkBroker(MemoryBroker):
    """A third-party broker written to ``BulkPublishNew`` before ``after`` was added to it:
    ``publish_new_many(storage, tasks)``. Each call notes how many records the storage held
    when it came, and how many tasks it got."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    async def publish_new_many(  # type: ignore[override]  # the older signature: the point
        self, storage: Storage, tasks: Sequence[tuple[TaskRecord, Envelope]]
    ) -> None:
        held = sum((await storage.stats()).values())
        self.calls.append((held, len(tasks)))
        for record, envelope in tasks:
            await self.publish_new(envelope, storage, record)


def app_on(broker: MemoryBroker) -> AsyncQueueTasks:
    app = AsyncQueueTasks("bulk", broker=broker)

    @app.task
    def double(x: int) -> int:
        return 2 * x

    return app


async def test_a_broker_with_the_older_publish_new_many_still_adds_tasks() -> None:
    """``after`` came into BulkPublishNew.publish_new_many later: a broker written before
    got it as a keyword anyway, and ``add_tasks`` raised TypeError. The core awaits ``after``
    itself for it (each batch's call comes once the batch before is stored), then calls the
    older signature."""
    broker = OlderBulkBroker()
    app = app_on(broker)
    records = await app.tasks["double"].add_tasks(range(2500))
    assert app.enqueue_path == "shared"  # the path that passes ``after`` on asyncio
    assert broker.calls == [(0, 1000), (1000, 1000), (2000, 500)]
    assert await app.storage.stats() == {"new": 2500}
    async with app:
        assert (await records[-1].wait_result(5)).returning == 4998
    await app.aclose()


async def test_the_core_awaits_after_before_an_older_publish_new_many() -> None:
    """Once, before the broker's call; when ``after`` raises, the broker is not called."""
    broker = OlderBulkBroker()
    app = app_on(broker)
    await app.start()
    try:
        tasks = [await _prepared(app, x) for x in range(3)]
        events: list[str] = []

        async def after() -> None:
            events.append(f"after, {sum((await app.storage.stats()).values())} stored")

        await bulk_module.store_and_publish_many(app, tasks, after)
        assert events == ["after, 0 stored"]
        assert broker.calls == [(0, 3)]

        class Refused(Exception):
            pass

        async def refuses() -> None:
            raise Refused

        with pytest.raises(Refused):
            await bulk_module.store_and_publish_many(app, [await _prepared(app, 9)], refuses)
        assert broker.calls == [(0, 3)]
        assert await app.storage.stats() == {"new": 3}
    finally:
        await app.aclose()


async def test_whether_publish_new_many_takes_after_is_read_once_per_broker_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hot path has a budget: the signature is read at the first batch of a class, not
    at every batch. A ``**kwargs`` is not taken for ``after`` (it may drop it unawaited)."""

    class Older(OlderBulkBroker):
        pass

    class Forwarding(MemoryBroker):
        async def publish_new_many(
            self, storage: Storage, tasks: Sequence[tuple[TaskRecord, Envelope]], **kw: Any
        ) -> None:
            assert "after" not in kw
            await super().publish_new_many(storage, tasks, **kw)

    class Newer(MemoryBroker):
        pass

    read: list[type] = []
    signature = inspect.signature

    def counted(obj: Any, *args: Any, **kwargs: Any) -> inspect.Signature:
        if isinstance(getattr(obj, "__self__", None), MemoryBroker):
            read.append(type(obj.__self__))
        return signature(obj, *args, **kwargs)

    monkeypatch.setattr(inspect, "signature", counted)
    for kind in (Older, Older, Forwarding, Newer, Newer):
        app = app_on(kind())
        await app.tasks["double"].add_tasks(range(2100))  # three batches each
        assert await app.storage.stats() == {"new": 2100}
        await app.aclose()
    assert read == [Older, Forwarding, Newer]
    assert [bulk_module._TAKES_AFTER[kind] for kind in (Older, Forwarding, Newer)] == [
        False,
        False,
        True,
    ]


async def _prepared(app: AsyncQueueTasks, x: int) -> tuple[TaskRecord, Envelope]:
    (pair,) = await bulk_module.prepare_all(app, [app.tasks["double"].s(x)])
    return pair


class Ends:
    """How each prepared task's enqueue ended: the uuids of ``qtasks_task_enqueue``, of
    ``qtasks_task_enqueued``, and ``(uuid, type of exc)`` of ``qtasks_task_enqueue_failed``,
    noted after a checkpoint (a hook that awaits, as a tracing exporter does): run unshielded
    in a cancelled scope, it would be cancelled there, and note nothing."""

    def __init__(self, cancel_at: int = 0, cancel: Callable[[], None] = lambda: None) -> None:
        self.begun: list[str] = []
        self.enqueued: list[str] = []
        self.failed: list[tuple[str, type[BaseException]]] = []
        self.cancel_at, self.cancel = cancel_at, cancel

    @hookimpl
    def qtasks_task_enqueue(self, message: Any) -> None:
        self.begun.append(message.uuid)
        if len(self.begun) == self.cancel_at:
            self.cancel()

    @hookimpl
    def qtasks_task_enqueued(self, record: Any) -> None:
        self.enqueued.append(record.uuid)

    @hookimpl
    async def qtasks_task_enqueue_failed(self, record: Any, exc: BaseException) -> None:
        await anyio.lowlevel.checkpoint()
        self.failed.append((record.uuid, type(exc)))


async def test_a_cancel_while_add_tasks_prepares_ends_the_items_prepared() -> None:
    """A cancellation while the items were prepared (a checkpoint every 100 items) fired no
    qtasks_task_enqueue_failed for the items already prepared (only an Exception did): what a
    plugin began for them (a span) never ended. Now each gets it, shielded, then the cancel
    goes on."""
    app = app_on(MemoryBroker())
    await app.start()
    try:
        with anyio.CancelScope() as scope:
            ends = Ends(cancel_at=150, cancel=scope.cancel)
            app.add_plugin(ends)
            await app.tasks["double"].add_tasks(range(2500))
        assert scope.cancelled_caught
        assert len(ends.begun) >= 150
        cancelled = anyio.get_cancelled_exc_class()
        assert ends.failed == [(uuid, cancelled) for uuid in ends.begun]
        assert ends.enqueued == []
        assert await app.storage.stats() == {}
    finally:
        await app.aclose()


class StallsAtTheSecondBatch(MemoryBroker):
    """The second batch's publish never ends; it calls ``stalled`` (the test cancels its
    scope) when it begins. ``shared``: a SharedServer with the storage (``publish_new_many``,
    batches overlapped on asyncio); else the plain path (records added, then
    ``publish_many``)."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.shared = shared
        self.batches = 0
        self.stalled: Callable[[], None] = lambda: None

    def shares_server_with(self, storage: Storage) -> bool:
        return self.shared and super().shares_server_with(storage)

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        await self._stall()
        await super().publish_many(envelopes)

    async def publish_new_many(
        self,
        storage: Storage,
        tasks: Sequence[tuple[TaskRecord, Envelope]],
        *,
        after: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if after is not None:
            await after()
        await self._stall()
        await super().publish_new_many(storage, tasks)

    async def _stall(self) -> None:
        self.batches += 1
        if self.batches == 2:
            self.stalled()
            await anyio.sleep_forever()


@pytest.mark.parametrize("shared", [True, False], ids=["overlapped", "sequential"])
async def test_a_cancel_of_add_tasks_between_batches_ends_every_task_not_enqueued(
    shared: bool,
) -> None:
    """Cancelled while its second batch was in flight, add_tasks fired no
    qtasks_task_enqueue_failed at all: not for that batch, not for the batch overlapped
    behind it, not for those never begun. Now every task prepared ends with exactly one of
    qtasks_task_enqueued (the first batch) and qtasks_task_enqueue_failed (the others), and
    the in-flight batches are cancelled too."""
    broker = StallsAtTheSecondBatch(shared)
    app = app_on(broker)
    await app.start()
    assert app.enqueue_path == ("shared" if shared else "sequential")
    ends = Ends()
    app.add_plugin(ends)
    try:
        with anyio.fail_after(5), anyio.CancelScope() as scope:
            broker.stalled = scope.cancel
            await app.tasks["double"].add_tasks(range(3500))
        assert scope.cancelled_caught
        assert len(ends.begun) == 3500
        assert ends.enqueued == ends.begun[:1000]
        cancelled = anyio.get_cancelled_exc_class()
        # The two batches in flight end their tasks at once (their hooks interleave).
        assert sorted(ends.failed) == sorted((uuid, cancelled) for uuid in ends.begun[1000:])
        assert broker.batches == 2  # the third batch never reached the broker
    finally:
        await app.aclose()


class StallsPublishing(MemoryBroker):
    """Every publish of one task never ends; it calls ``stalled`` (the test cancels its
    scope) when it begins. ``shared`` as :class:`StallsAtTheSecondBatch`'s."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.shared = shared
        self.stalled: Callable[[], None] = lambda: None

    def shares_server_with(self, storage: Storage) -> bool:
        return self.shared and super().shares_server_with(storage)

    async def publish(self, envelope: Envelope) -> None:
        self.stalled()
        await anyio.sleep_forever()

    async def publish_new(self, envelope: Envelope, storage: Storage, record: TaskRecord) -> None:
        self.stalled()
        await anyio.sleep_forever()


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "sequential"])
async def test_a_cancel_of_add_task_ends_its_task_with_enqueue_failed(shared: bool) -> None:
    """add_task caught Exception only: cancelled while its message was published, it fired
    no qtasks_task_enqueue_failed, so what a plugin began in qtasks_task_enqueue (a span)
    never ended. Now it fires once, shielded (the hook awaits), then the cancel goes on."""
    broker = StallsPublishing(shared)
    app = app_on(broker)
    await app.start()
    assert app.enqueue_path == ("shared" if shared else "sequential")
    ends = Ends()
    app.add_plugin(ends)
    try:
        with anyio.fail_after(5), anyio.CancelScope() as scope:
            broker.stalled = scope.cancel
            await app.tasks["double"].add_task(1)
        assert scope.cancelled_caught
        assert len(ends.begun) == 1 and ends.enqueued == []
        assert ends.failed == [(ends.begun[0], anyio.get_cancelled_exc_class())]
    finally:
        await app.aclose()


async def _workflow_status(app: AsyncQueueTasks) -> str:
    (record,) = await app.storage.workflows(1)  # type: ignore[attr-defined]
    status: str = record.status.value
    return status


@pytest.mark.parametrize("shared", [True, False], ids=["overlapped", "sequential"])
async def test_a_cancel_of_run_workflow_between_batches_ends_every_first_step_and_the_workflow(
    shared: bool,
) -> None:
    """run_workflow caught Exception only around its batches of first steps: cancelled while
    the second of three was in flight, the workflow stayed stored and running for ever, half
    of it started, and the third batch's tasks got no hook at all. Now each first step ends
    with exactly one of qtasks_task_enqueued (the first batch) and
    qtasks_task_enqueue_failed (the others), and the workflow is cancelled."""
    broker = StallsAtTheSecondBatch(shared)
    app = app_on(broker)
    await app.start()
    ends = Ends()
    app.add_plugin(ends)
    double = app.tasks["double"]
    try:
        with anyio.fail_after(5), anyio.CancelScope() as scope:
            broker.stalled = scope.cancel
            await app.run_workflow(group(*(double.s(i) for i in range(2500))))
        assert scope.cancelled_caught
        assert len(ends.begun) == 2500
        assert ends.enqueued == ends.begun[:1000]
        cancelled = anyio.get_cancelled_exc_class()
        assert sorted(ends.failed) == sorted((uuid, cancelled) for uuid in ends.begun[1000:])
        assert await _workflow_status(app) == "cancel"
    finally:
        await app.aclose()


class FailsAtTheSecondBatch(MemoryBroker):
    """The second batch's publish raises ConnectionError (the plain path)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def shares_server_with(self, storage: Storage) -> bool:
        return False

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        self.batches += 1
        if self.batches == 2:
            raise ConnectionError("broker gone")
        await super().publish_many(envelopes)


async def test_a_failed_batch_of_first_steps_ends_the_batches_behind_it_too() -> None:
    """A workflow whose second batch of first steps failed ended that batch's tasks with
    qtasks_task_enqueue_failed, but not the third's, never attempted (add_tasks ends both).
    Now every first step not enqueued gets it, once."""
    app = app_on(FailsAtTheSecondBatch())
    await app.start()
    ends = Ends()
    app.add_plugin(ends)
    double = app.tasks["double"]
    try:
        with pytest.raises(ConnectionError, match="broker gone") as raised:
            await app.run_workflow(group(*(double.s(i) for i in range(2500))))
        assert any("was stored, then cancelled" in note for note in raised.value.__notes__)
        assert ends.enqueued == ends.begun[:1000]
        assert sorted(ends.failed) == sorted((uuid, ConnectionError) for uuid in ends.begun[1000:])
        assert await _workflow_status(app) == "cancel"
    finally:
        await app.aclose()


class StallsStoringWorkflows(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.stalled: Callable[[], None] = lambda: None

    async def add_workflow(self, *args: Any, **kwargs: Any) -> None:
        self.stalled()
        await anyio.sleep_forever()


async def test_a_cancel_while_the_workflow_is_stored_ends_every_member() -> None:
    """Cancelled while the workflow itself was stored, run_workflow fired no
    qtasks_task_enqueue_failed (only an Exception did): now every member gets it."""
    storage = StallsStoringWorkflows()
    app = AsyncQueueTasks("bulk", broker=MemoryBroker(), storage=storage)

    @app.task
    def double(x: int) -> int:
        return 2 * x

    await app.start()
    ends = Ends()
    app.add_plugin(ends)
    try:
        with anyio.fail_after(5), anyio.CancelScope() as scope:
            storage.stalled = scope.cancel
            await app.run_workflow(chain(double.s(1), double.s(), double.s()))
        assert scope.cancelled_caught
        cancelled = anyio.get_cancelled_exc_class()
        assert len(ends.begun) == 3 and ends.enqueued == []
        assert sorted(ends.failed) == sorted((uuid, cancelled) for uuid in ends.begun)
    finally:
        await app.aclose()


@pytest.mark.parametrize("items", ["abc", b"ab", {"a": 1}, 5, None])
async def test_add_tasks_and_map_refuse_what_is_not_a_list_of_items(items: Any) -> None:
    # A string is iterable: task.add_tasks("abc") made three tasks of one letter each, and a
    # value that is not iterable raised a bare TypeError.
    app = AsyncQueueTasks("t")

    @app.task
    async def echo(x: Any = None) -> Any:
        return x

    async with app:
        with pytest.raises(TaskArgumentsError, match="add_tasks expects an iterable of items"):
            await echo.add_tasks(items)
        with pytest.raises(TaskArgumentsError, match="add_tasks expects an iterable of items"):
            await app.add_tasks(items)
        with pytest.raises(TaskArgumentsError, match=r"echo\.map expects an iterable of items"):
            echo.map(items)
        assert await app.storage.stats() == {}
