"""The optional SharedServer capability: the app folds storage writes into broker calls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from refused_scenarios import ClosedCounter, refused_result, refused_retry

import qtasks.settle_batch
from qtasks import (
    AsyncQueueTasks,
    MemoryBroker,
    MemoryStorage,
    QueueConfig,
    TaskStatus,
)
from qtasks.components import Delivery, SharedServer, Storage
from qtasks.errors import BrokerConnectionError, StorageError
from qtasks.messages import Envelope
from qtasks.record import TaskRecord

pytestmark = pytest.mark.anyio


class FoldingBroker(MemoryBroker):
    """The in-memory broker, declaring that it shares a server with one given storage."""

    def __init__(self, partner: Storage) -> None:
        super().__init__()
        self.partner = partner
        self.calls: list[str] = []

    def shares_server_with(self, storage: Storage) -> bool:
        return storage is self.partner

    async def publish_new(self, envelope: Envelope, storage: Storage, record: TaskRecord) -> None:
        self.calls.append("publish_new")
        await storage.add(record)
        await self.publish(envelope)

    async def ack_final(
        self,
        delivery: Delivery,
        storage: Storage,
        record: TaskRecord,
        *,
        enqueued: list[str] | None = None,
    ) -> bool:
        self.calls.append("ack_final")
        if await storage.save(record, fence=delivery.token):
            await delivery.ack()
            return True
        stored = await storage.get(record.uuid)
        if stored is not None and stored.status.final and stored.token == delivery.token:
            await delivery.ack()  # refused only because the task is over (e.g. cancelled)
        return False

    async def ack_finals(
        self,
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        *,
        enqueued: list[str] | None = None,
    ) -> list[bool]:
        self.calls.append("ack_finals")
        return [await self.ack_final(delivery, storage, record) for delivery, record in finals]


async def test_folding_broker_is_used_for_enqueue_and_settle() -> None:
    storage = MemoryStorage()
    broker = FoldingBroker(storage)
    assert isinstance(broker, SharedServer)
    app = AsyncQueueTasks(broker=broker, storage=storage)

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    async with app:
        assert app.shared_server is broker
        done = await app.add_task("double", 4, timeout=5)
    assert (done.status, done.returning) == (TaskStatus.SUCCESS, 8)
    # The worker settles through the batched call (one task here).
    assert broker.calls == ["publish_new", "ack_finals", "ack_final"]
    await app.aclose()


async def test_not_used_with_another_storage() -> None:
    broker = FoldingBroker(MemoryStorage())
    app = AsyncQueueTasks(broker=broker, storage=MemoryStorage())

    @app.task
    async def one() -> int:
        return 1

    async with app:
        assert app.shared_server is None
        assert (await app.add_task("one", timeout=5)).returning == 1
    assert broker.calls == []


class BatchingBroker(FoldingBroker):
    """A FoldingBroker whose batched settle can be held at a gate, recording batch sizes."""

    def __init__(self, partner: Storage) -> None:
        super().__init__(partner)
        self.batches: list[list[str]] = []
        self.gate: anyio.Event | None = None
        self.entered = anyio.Event()
        self.fail = False
        self.settled: dict[str, bool] = {}

    async def ack_finals(
        self,
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        *,
        enqueued: list[str] | None = None,
    ) -> list[bool]:
        self.batches.append([record.uuid for _, record in finals])
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise BrokerConnectionError("the server went away")
        saved = [await self.ack_final(delivery, storage, record) for delivery, record in finals]
        self.settled.update(
            (record.uuid, ok) for (_, record), ok in zip(finals, saved, strict=True)
        )
        return saved


def batching_app(concurrency: int = 4, **config: Any) -> tuple[AsyncQueueTasks, BatchingBroker]:
    storage = MemoryStorage()
    broker = BatchingBroker(storage)
    app = AsyncQueueTasks(
        broker=broker,
        storage=storage,
        config=QueueConfig(max_tasks_process=concurrency, plugins_disabled=["*"], **config),
    )
    return app, broker


async def test_tasks_finishing_during_a_settle_go_in_the_next_call_together() -> None:
    app, broker = batching_app(concurrency=3)
    broker.gate = anyio.Event()
    closed = ClosedCounter(4)
    app.add_plugin(closed)
    release, all_started = anyio.Event(), anyio.Event()
    started: list[int] = []

    @app.task
    async def first() -> str:
        return "first"

    @app.task
    async def later(i: int) -> int:
        started.append(i)
        if len(started) == 3:
            all_started.set()
        await release.wait()
        return i

    async with app:
        one = await app.add_task("first")
        with anyio.fail_after(5):
            await broker.entered.wait()  # first's settle is in flight, held at the gate
        others = [await app.add_task("later", i) for i in range(3)]
        # Its runner did not wait for the settle: all three others run at once.
        with anyio.fail_after(5):
            await all_started.wait()
        release.set()
        with anyio.fail_after(5):
            await closed.all_closed.wait()
        broker.gate.set()
        done = [await app.wait(t.uuid, timeout=5) for t in (one, *others)]
        assert (await broker.stats()).in_flight == 0
    assert [t.returning for t in done] == ["first", 0, 1, 2]
    assert broker.batches == [[one.uuid], [t.uuid for t in others]]
    await app.aclose()


async def test_hooks_of_a_batched_settle_keep_their_order() -> None:
    from test_plugins_order import ENQUEUE, RECEIVE_AND_START, SUCCESS_END, Recorder

    app, broker = batching_app()
    recorder = Recorder()
    app.add_plugin(recorder)

    @app.task
    async def ok() -> int:
        return 1

    async with app:
        await ok.add_task()
        await recorder.wait_finished(1)
    assert recorder.calls == [*ENQUEUE, *RECEIVE_AND_START, *SUCCESS_END]
    assert len(broker.batches) == 1
    await app.aclose()


async def test_stopping_waits_for_settles_in_flight() -> None:
    app, broker = batching_app(shutdown_grace=5.0)
    broker.gate = anyio.Event()
    stopping, stopped = anyio.Event(), anyio.Event()
    uuids: list[str] = []

    @app.task
    async def ok() -> int:
        return 7

    async def serve() -> None:
        async with app:
            uuids.append((await app.add_task("ok")).uuid)
            await broker.entered.wait()
            stopping.set()  # leaving the block stops the worker, its settle still held
        stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        with anyio.fail_after(5):
            await stopping.wait()
        with anyio.move_on_after(0.2):
            await stopped.wait()
        assert not stopped.is_set()  # the stop waits for the settle in flight
        broker.gate.set()
        with anyio.fail_after(5):
            await stopped.wait()
    assert broker.settled == {uuids[0]: True}  # stored and acked, not handed back


async def test_a_settle_that_meets_an_outage_is_retried_while_the_leases_hold(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 14 item 6 on the batched path: the server is down when the task ends; the batch
    retries (its lease renewed meanwhile, over three leases), and the task runs once."""
    app, broker = batching_app(lease=0.3)
    broker.fail = True
    runs: list[int] = []

    @app.task
    async def counted(i: int) -> int:
        runs.append(i)
        return i

    async with app:
        task = await app.add_task("counted", 5)
        with anyio.fail_after(5):
            while len(broker.batches) < 4:  # noqa: ASYNC110 - retries of the settle
                await anyio.sleep(0.01)
        await anyio.sleep(1.0)  # the outage outlasts three leases
        broker.fail = False  # the server is back
        done = await app.wait(task.uuid, timeout=10)
    assert done.returning == 5
    assert runs == [5]  # stored once the server was back: no second run
    messages = [r.getMessage() for r in caplog.records if r.name == "qtasks.worker"]
    assert messages == [
        "task storage unreachable (the server went away); retrying",
        "task storage reachable again",
    ]
    await app.aclose()


async def test_a_broken_settle_call_does_not_kill_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, broker = batching_app(lease=0.3)
    calls = 0
    plain = broker.ack_finals

    async def wrong_length(
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        *,
        enqueued: list[str] | None = None,
    ) -> list[bool]:
        nonlocal calls
        calls += 1
        saved = await plain(storage, finals, enqueued=enqueued)
        return [*saved, True] if calls == 1 else saved  # a broker bug: one result too many

    broker.ack_finals = wrong_length  # type: ignore[method-assign]

    @app.task
    async def one(i: int) -> int:
        return i

    async with app:
        first = await app.add_task("one", 1, timeout=5)
        second = await app.add_task("one", 2, timeout=5)  # the worker still serves
    assert (first.returning, second.returning) == (1, 2)
    assert "worker failed while settling 1 finished tasks" in caplog.text
    await app.aclose()


async def test_settle_calls_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qtasks.settle_batch, "SETTLE_BATCH", 2)
    # A runner for each task: a task that waited for a runner would be begun in the next
    # settle call (SettleBegin), which the gate holds.
    app, broker = batching_app(concurrency=6)
    broker.gate = anyio.Event()
    closed = ClosedCounter(6)
    app.add_plugin(closed)

    @app.task
    async def quick(i: int) -> int:
        return i

    async with app:
        tasks = [await app.add_task("quick", i) for i in range(6)]
        with anyio.fail_after(5):
            await closed.all_closed.wait()  # the first call is held; the rest wait behind it
        broker.gate.set()
        done = [await app.wait(t.uuid, timeout=5) for t in tasks]
    assert [t.returning for t in done] == list(range(6))
    sizes = [len(batch) for batch in broker.batches]
    assert sum(sizes) == 6
    assert max(sizes) == 2  # without the cap, those held back would go in one call
    await app.aclose()


class SizeLimitedStorage(MemoryStorage):
    """The in-memory storage with a limit on what one record holds, as a server has one
    (Redis's ``proto-max-bulk-len``): a record over it is refused with an error that is not a
    lost connection, and that saving it again meets again. With ``refuse_final``, every final
    record of that task is refused."""

    LIMIT = 10_000

    def __init__(self, refuse_final: str | None = None) -> None:
        super().__init__()
        self.refuse_final = refuse_final

    async def save(self, record: TaskRecord, *, fence: str | None = None) -> bool:
        texts = (record.returning, record.error, record.traceback)
        size = sum(len(text) for text in texts if isinstance(text, str))
        if size > self.LIMIT:
            raise StorageError(f"ERR record of {size} characters, over {self.LIMIT}")
        if record.task_name == self.refuse_final and record.status.final:
            raise StorageError(f"ERR {record.task_name} is refused")
        return await super().save(record, fence=fence)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "alone"])
async def test_a_record_the_storage_refuses_fails_only_its_own_task(batched: bool) -> None:
    """See :func:`refused_scenarios.refused_result`: the results settled in one call
    (batched) or each by its runner (alone, the broker sharing no server with the storage)."""
    storage = SizeLimitedStorage()
    held = BatchingBroker(storage) if batched else None
    config = QueueConfig(
        max_tasks_process=6, lease=0.5, max_deliveries=2, retry_backoff=0.05, plugins_disabled=["*"]
    )
    app = AsyncQueueTasks(
        broker=held or FoldingBroker(MemoryStorage()), storage=storage, config=config
    )
    refusal = r"StorageError: ERR record of \d+ characters, over 10000"
    await refused_result(app, held, size=20_000, refusal=refusal)


async def test_a_retry_record_the_storage_refuses_ends_the_task_without_retrying_it() -> None:
    """See :func:`refused_scenarios.refused_retry`."""
    config = QueueConfig(
        max_tasks_process=2, lease=0.5, max_deliveries=2, retry_backoff=0.05, plugins_disabled=["*"]
    )
    app = AsyncQueueTasks(storage=SizeLimitedStorage(), config=config)
    refusal = r"StorageError: ERR record of \d+ characters, over 10000"
    await refused_retry(app, size=20_000, refusal=refusal)


async def test_a_task_whose_error_record_is_refused_too_is_handed_back_with_the_reason() -> None:
    """When even the ``error`` record of a refused result is refused, the task is handed back
    as for any component failure (counted in its message) and dead-lettered at the last
    allowed delivery with that reason, not left to run again until "delivery limit reached";
    the tasks settled in the same call are stored."""
    storage = SizeLimitedStorage(refuse_final="doomed")
    broker = BatchingBroker(storage)
    config = QueueConfig(
        max_tasks_process=4, lease=0.5, max_deliveries=2, retry_backoff=0.05, plugins_disabled=["*"]
    )
    app = AsyncQueueTasks(broker=broker, storage=storage, config=config)
    closed = ClosedCounter(3)
    app.add_plugin(closed)
    runs: list[str] = []

    @app.task
    async def first() -> str:
        return "first"

    @app.task
    async def doomed() -> str:
        runs.append("doomed")
        return "fine, but refused"

    @app.task
    async def small() -> int:
        runs.append("small")
        return 1

    async with app:
        broker.gate = anyio.Event()
        await app.add_task("first")
        with anyio.fail_after(5):
            await broker.entered.wait()
        bad, good = await app.add_task("doomed"), await app.add_task("small")
        with anyio.fail_after(5):
            await closed.all_closed.wait()
        broker.gate.set()
        assert (await app.wait(good.uuid, timeout=10)).returning == 1
        with anyio.fail_after(10):
            while not (letters := await app.dead_letters()):  # noqa: ASYNC110 - no event
                await anyio.sleep(0.02)
    assert sorted(broker.batches[1]) == sorted([bad.uuid, good.uuid])
    assert runs.count("small") == 1
    assert runs.count("doomed") == 2  # handed back once, then dead-lettered
    [letter] = letters
    assert letter.reason == (
        "worker failed 2 times: UnstorableRecordError: its error record could not be stored: "
        "StorageError: ERR doomed is refused"
    )
    await app.aclose()
