"""A ``CancelledError`` that code under the worker raises of its own (it awaited something that
was cancelled, a library let an inner cancellation escape) is that code's failure, not the
worker's stop: before, it ended the runner, or the whole serving loop, without a word, and the
message stopped every worker it was delivered to. The worker's real teardown still leaves the
running task unsettled. The scenarios shared with Redis are in ``stray_scenarios.py``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from stray_scenarios import (
    WAIT,
    a_cancelled_task_raising_a_fresh_cancellation_is_cancelled_and_the_worker_serves_on,
    a_cancelled_task_whose_settle_write_raises_its_own_cancellation_is_handed_back,
    a_cancelled_task_whose_teardown_raises_its_own_cancellation_is_settled,
    a_hook_raising_its_own_cancellation_is_ignored_as_a_failed_hook,
    a_task_raising_its_own_cancellation_fails_and_the_worker_serves_on,
    assert_ignored_as_errors,
    cancelled_inner,
    register_torn_down,
    register_waits,
    replace_the_cancellation,
    stray_failures,
)

from qtasks import AsyncQueueTasks, Depends, MemoryStorage, QueueConfig, TaskStatus, hookimpl
from qtasks.cancels import is_stray, shielded
from qtasks.components import Delivery, Storage
from qtasks.errors import StrayCancellationError
from qtasks.memory import MemoryBroker, MemoryGlobalConfig
from qtasks.record import TaskRecord

pytestmark = pytest.mark.anyio


def one_at_a_time(**components: Any) -> AsyncQueueTasks:
    config = QueueConfig(
        max_tasks_process=1,
        prefetch=1,
        lease=30.0,
        shutdown_grace=1.0,
        retry_backoff=0.01,
        plugins_disabled=["*"],
    )
    return AsyncQueueTasks(config=config, **components)


async def test_a_task_raising_its_own_cancellation_fails_and_the_worker_serves_on() -> None:
    await a_task_raising_its_own_cancellation_fails_and_the_worker_serves_on(one_at_a_time())


async def test_a_cancelled_task_raising_a_fresh_cancellation_is_cancelled() -> None:
    await a_cancelled_task_raising_a_fresh_cancellation_is_cancelled_and_the_worker_serves_on(
        one_at_a_time()
    )


async def test_a_hook_raising_its_own_cancellation_is_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await a_hook_raising_its_own_cancellation_is_ignored_as_a_failed_hook(one_at_a_time(), caplog)


class CancelsOnce(MemoryStorage):
    """Its first read of the record of the first message the worker receives raises a
    cancellation of its own (a client library letting an inner one escape)."""

    armed: str | None = None
    received = 0

    @hookimpl
    def qtasks_broker_message_received(self, delivery: Any) -> None:
        self.received += 1
        if self.received == 1:
            self.armed = delivery.id

    async def get(self, uuid: str) -> TaskRecord | None:
        if uuid == self.armed:
            self.armed = None
            await cancelled_inner()
        return await super().get(uuid)


async def test_a_components_own_cancellation_hands_the_message_back_as_its_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A component's own cancellation while the worker handles a message is that component's
    failure: the message is handed back with its failures counted (the lease is long: not
    handed back, it would not come back within the test), and the worker serves on."""
    storage = CancelsOnce()
    app = one_at_a_time(storage=storage)
    app.add_plugin(storage, name="arms")

    @app.task
    async def plain(i: int) -> int:
        return i

    with caplog.at_level(logging.ERROR, logger="qtasks.worker"):
        async with app:
            # An unknown task: the worker reads its record before it dead-letters it.
            ghost = await app.add_task("ghost")
            final = await ghost.wait_result(WAIT)
            assert final.status is TaskStatus.ERROR
            assert "unknown task 'ghost'" in (final.error or "")
            after = await app.add_task("plain", 1, timeout=WAIT)
            assert after.returning == 1
    failed = [r for r in caplog.records if "worker failed while handling message" in r.message]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert isinstance(failed[0].exc_info[1], StrayCancellationError)


class CancelledBeat(MemoryGlobalConfig):
    """A heartbeat that raises a cancellation of its own."""

    async def heartbeat(self, worker_id: str, info: dict[str, Any], ttl: float) -> None:
        await cancelled_inner()


async def test_a_stray_cancellation_in_the_serving_loop_ends_the_worker_with_an_error() -> None:
    """Out of a task of the serving loop (here the heartbeat), a stray cancellation ended the
    loop as a stop does, and nothing said so; it ends the worker with an error now."""
    app = one_at_a_time(global_config=CancelledBeat())

    async def serve() -> None:
        with anyio.fail_after(WAIT):
            async with app:
                await anyio.sleep_forever()

    with pytest.raises(ExceptionGroup) as raised:
        await serve()
    assert raised.group_contains(StrayCancellationError, match="heartbeats", depth=None)


async def test_the_worker_torn_down_while_a_task_runs_leaves_it_unsettled() -> None:
    """The scope around the worker cancelled while tasks run (one that lets the cancellation
    through, one that answers it with a CancelledError of its own): neither is settled, their
    records say ``process`` and their messages are not acked (they come back after the lease,
    or are handed back by the consumer's exit)."""
    app = one_at_a_time()
    app.config.max_tasks_process = 2
    running = [anyio.Event(), anyio.Event()]

    @app.task
    async def waits(i: int) -> None:
        running[i].set()
        await anyio.sleep_forever()

    @app.task
    async def answers(i: int) -> None:
        running[i].set()
        await replace_the_cancellation()

    async with AsyncExitStack() as stack:
        await app.broker.start(stack, app.config)
        await app.storage.start(stack, app.config)
        await app.global_config.start(stack, app.config)
        tasks = [await app.add_task("waits", 0), await app.add_task("answers", 1)]
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(app.worker.run, app)
                for event in running:
                    await event.wait()
                tg.cancel_scope.cancel()
        for task in tasks:
            record = await app.storage.get(task.uuid)
            assert record is not None and record.status is TaskStatus.PROCESS, record
        stats = await app.broker.stats()
        assert stats.in_flight + sum(stats.ready_by_priority.values()) == 2


async def test_a_task_scoped_teardown_raising_its_own_cancellation_is_logged_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task-scoped ``Depends`` teardown (run once the task's code ended) that raises a
    cancellation of its own is logged and ignored, as its errors are: the task's result
    stands, the worker serves on."""
    app = one_at_a_time()

    async def resource() -> AsyncIterator[str]:
        yield "opened"
        await cancelled_inner()

    @app.task
    async def uses(value: str = Depends(resource)) -> str:
        return value

    with caplog.at_level(logging.ERROR, logger="qtasks.worker"):
        async with app:
            for _ in range(2):
                final = await app.add_task("uses", timeout=WAIT)
                assert (final.status, final.returning) == (TaskStatus.SUCCESS, "opened")
    closing = [r for r in caplog.records if "closing what task" in r.getMessage()]
    assert len(closing) == 2


class StrayFirstSettle(MemoryBroker):
    """A memory broker whose first batched settle call raises a cancellation of its own."""

    calls = 0

    async def ack_finals(
        self,
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        *,
        enqueued: list[str] | None = None,
    ) -> list[bool]:
        self.calls += 1
        if self.calls == 1:
            await cancelled_inner()
        return await super().ack_finals(storage, finals, enqueued=enqueued)


async def test_a_stray_cancellation_in_the_batched_settle_leaves_the_batch_to_its_leases(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before, it ended the settler without a word: the worker served on, settling nothing
    more, and its stop waited for the settler for ever."""
    broker = StrayFirstSettle()
    app = AsyncQueueTasks(
        broker=broker,
        storage=MemoryStorage(),
        config=QueueConfig(
            max_tasks_process=1, lease=0.5, shutdown_grace=1.0, plugins_disabled=["*"]
        ),
    )

    @app.task
    async def plain(i: int) -> int:
        return i

    with anyio.fail_after(WAIT):
        async with app:
            added = [await app.add_task("plain", i) for i in range(6)]
            for task in added:  # the first batch's come back after their lease
                done = await task.wait_result(timeout=WAIT)
                assert done.status is TaskStatus.SUCCESS
    assert broker.calls > 1
    assert "worker failed while settling" in caplog.text


class StrayAloneSettle(MemoryBroker):
    """A memory broker that refuses every batched settle call (not an outage: the batch is
    redone task by task), whose first call waits until ``closed`` is set; and whose settle
    of the first task of a batch of several, redone alone, raises a cancellation of its own
    once."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = anyio.Event()
        self.batches: list[list[str]] = []
        self.fired: str | None = None

    async def ack_finals(
        self,
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        *,
        enqueued: list[str] | None = None,
    ) -> list[bool]:
        if not self.batches:
            await self.closed.wait()  # every task ended: in this batch, or all in the next
        self.batches.append([record.uuid for _, record in finals])
        raise RuntimeError("refused")

    async def ack_final(
        self,
        delivery: Delivery,
        storage: Storage,
        record: TaskRecord,
        *,
        enqueued: list[str] | None = None,
    ) -> bool:
        batch = self.batches[-1]
        if self.fired is None and len(batch) > 1 and record.uuid == batch[0]:
            self.fired = record.uuid
            await cancelled_inner()
        return await super().ack_final(delivery, storage, record, enqueued=enqueued)


class Closed:
    """Sets ``event`` once ``count`` runs ended (``qtasks_executor_closed`` fires right before
    a succeeded run is handed to the batched settle)."""

    def __init__(self, count: int, event: anyio.Event) -> None:
        self.left, self.event = count, event

    @hookimpl
    def qtasks_executor_closed(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.event.set()


async def test_a_stray_cancellation_while_a_batch_is_redone_alone_settles_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batched settle call that fails (not an outage) is redone task by task: a component's
    own cancellation there ended the redo, the rest of the batch left to their leases (here
    30 s, past the test's deadline). Now that task is handed back as for a component's
    failure, logged naming the component, and every other task of the batch is settled."""
    broker = StrayAloneSettle()
    app = AsyncQueueTasks(
        broker=broker,
        storage=MemoryStorage(),
        config=QueueConfig(
            max_tasks_process=4,
            lease=30.0,
            shutdown_grace=1.0,
            retry_backoff=0.01,
            plugins_disabled=["*"],
        ),
    )
    app.add_plugin(Closed(4, broker.closed), name="closed")
    go = anyio.Event()

    @app.task
    async def held(i: int) -> int:
        await go.wait()
        return i

    with caplog.at_level(logging.ERROR, logger="qtasks.worker"), anyio.fail_after(WAIT):
        async with app:
            added = [await app.add_task("held", i) for i in range(4)]
            go.set()
            for i, task in enumerate(added):
                done = await task.wait_result(timeout=WAIT)
                assert (done.status, done.returning) == (TaskStatus.SUCCESS, i)
    assert broker.fired is not None  # a batch of several was redone alone
    [failure] = stray_failures(caplog)
    assert failure.culprit == (
        f"the broker (StrayAloneSettle.ack_final) settling task {broker.fired}"
    ), failure.culprit
    assert "worker failed while settling" not in caplog.text


class CancelledTransforms:
    """Transform hooks that raise a cancellation of their own: awaited (``qtasks_executor_args``)
    and from a plain function (``qtasks_executor_result``)."""

    @hookimpl
    async def qtasks_executor_args(self, task: Any) -> None:
        if task.name == "args":
            await cancelled_inner()

    @hookimpl
    def qtasks_executor_result(self, record: TaskRecord) -> None:
        if record.task_name == "result":
            raise asyncio.CancelledError()


async def test_a_transform_hook_raising_its_own_cancellation_fails_the_task_with_plugin_error() -> (
    None
):
    """As any exception of a transform: ``PluginError`` naming the plugin, not retried. Before,
    it was blamed on the task (``StrayCancellationError``) and retried."""
    app = one_at_a_time()
    app.add_plugin(CancelledTransforms(), name="cancelled-transforms")

    @app.task(retry=2, retry_backoff=0)
    async def args() -> int:
        return 1

    @app.task(retry=2, retry_backoff=0)
    async def result() -> int:
        return 1

    async with app:
        for name, hook in (("args", "qtasks_executor_args"), ("result", "qtasks_executor_result")):
            final = await app.add_task(name, timeout=WAIT)
            assert (final.status, final.attempt) == (TaskStatus.ERROR, 1), (name, final)
            assert (final.error or "").startswith(
                f"PluginError: plugin 'cancelled-transforms': hook {hook} raised CancelledError"
            ), final.error


async def test_a_cancelled_task_whose_teardown_raises_its_own_cancellation_is_settled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await a_cancelled_task_whose_teardown_raises_its_own_cancellation_is_settled(
        one_at_a_time(), caplog
    )


@asynccontextmanager
async def stopped_while_running(
    app: AsyncQueueTasks, name: str, started: anyio.Event
) -> AsyncIterator[str]:
    """The app's components started (they outlive the worker's stop), task ``name`` added
    and served until it set ``started``, then the worker stopped (past its grace, the task
    is handed back): the task's uuid, the components still up."""
    async with AsyncExitStack() as stack:
        await app.broker.start(stack, app.config)
        await app.storage.start(stack, app.config)
        await app.global_config.start(stack, app.config)
        task = await app.add_task(name)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(app.worker.run, app)
                await started.wait()
                app.worker.stop()
        yield task.uuid


async def test_a_task_handed_back_at_the_stop_whose_teardown_raises_its_own_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stop's hand-back of a task still running after the grace takes the same shielded
    settle: the teardown's and the hook's own cancellations are logged and ignored, the record
    is put back to ``new`` and the message requeued at once. Before, the hand-back stopped
    there: the record stayed ``process`` and the message waited for its lease."""
    app = one_at_a_time()
    app.config.shutdown_grace = 0.05
    started = anyio.Event()
    hooks = register_torn_down(app, started)
    with caplog.at_level(logging.ERROR):
        async with stopped_while_running(app, "torn_down", started) as uuid:
            assert hooks.seen == [("requeued", None), ("after", TaskStatus.NEW)]
            record = await app.storage.get(uuid)
            assert record is not None and record.status is TaskStatus.NEW
            stats = await app.broker.stats()
            assert (stats.in_flight, sum(stats.ready_by_priority.values())) == (0, 1)
    assert_ignored_as_errors(caplog)


async def test_within_shielded_only_a_cancel_request_made_after_entering_is_a_stop() -> None:
    """The request pending as :func:`shielded` is entered (the cancelled runner's) does not
    make a ``CancelledError`` inside it a stop; one made inside it does, and so does the
    pending one again once the shield is left."""
    task = asyncio.current_task()
    assert task is not None
    with anyio.CancelScope() as outer:
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await anyio.lowlevel.checkpoint()  # the cancel is delivered
        pending = task.cancelling()
        assert pending > 0
        with shielded():
            assert is_stray(asyncio.CancelledError())
            task.cancel()  # a stop from outside anyio (asyncio.run ending, wait_for)
            assert not is_stray(asyncio.CancelledError())
            task.uncancel()
            assert is_stray(asyncio.CancelledError())
        assert not is_stray(asyncio.CancelledError())
    assert task.cancelling() == 0


class StraySettleSave(MemoryStorage):
    """Its first fenced save of a record in ``status`` (a settle's write) raises a
    cancellation of its own (a client library letting an inner one escape)."""

    def __init__(self, status: TaskStatus) -> None:
        super().__init__()
        self.status = status
        self.fired = False

    async def save(self, record: TaskRecord, *, fence: str | None = None) -> bool:
        if fence is not None and record.status is self.status and not self.fired:
            self.fired = True
            await cancelled_inner()
        return await super().save(record, fence=fence)


async def test_a_cancelled_task_whose_cancel_record_save_raises_its_own_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await a_cancelled_task_whose_settle_write_raises_its_own_cancellation_is_handed_back(
        one_at_a_time(storage=StraySettleSave(TaskStatus.CANCEL)),
        caplog,
        "the storage (StraySettleSave.save)",
    )


async def test_a_task_handed_back_at_the_stop_whose_save_raises_its_own_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stop's hand-back of a task still running after the grace, whose ``new`` record's
    save raises a cancellation of its own: logged as the storage's failure, the message handed
    back with it counted (not left to its lease, without a word, as before)."""
    storage = StraySettleSave(TaskStatus.NEW)
    app = one_at_a_time(storage=storage)
    app.config.shutdown_grace = 0.05
    app.config.retry_backoff = 60.0  # the hand-back's delay: it stays delayed in the test
    started = register_waits(app)
    with caplog.at_level(logging.ERROR, logger="qtasks.worker"):
        async with stopped_while_running(app, "waits", started) as uuid:
            assert storage.fired
            stats = await app.broker.stats()
            assert (stats.in_flight, stats.delayed) == (0, 1)
            record = await app.storage.get(uuid)
            assert record is not None and record.status is TaskStatus.PROCESS
    [failure] = stray_failures(caplog)
    assert failure.culprit.startswith("the storage (StraySettleSave.save)"), failure.culprit


async def test_a_settle_write_raising_its_own_cancellation_names_the_component(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The runner's own settle (a task that failed: not cancelled, not batched) whose
    ``error`` record's write raises a cancellation of its own: the message is handed back as
    for a component's failure, and the failure logged names the storage's method (it said
    "a hook or component"). Its next delivery settles it."""
    storage = StraySettleSave(TaskStatus.ERROR)
    app = one_at_a_time(storage=storage)

    @app.task
    async def fails() -> None:
        raise ValueError("no")

    with caplog.at_level(logging.ERROR, logger="qtasks.worker"):
        async with app:
            task = await app.add_task("fails")
            final = await task.wait_result(WAIT)
            assert (final.status, final.error) == (TaskStatus.ERROR, "ValueError: no")
    assert storage.fired
    [failure] = stray_failures(caplog)
    assert failure.culprit == f"the storage (StraySettleSave.save) handling task {task.uuid}"
