"""A component or plugin that fails while the worker handles a message (not an outage): the
message is handed back later each time, its failures counted in it, and dead-lettered at the
``max_deliveries``-th, instead of coming back every second forever."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from begin_scenarios import (
    SaveFailsOnce,
    a_dead_letter_not_written_is_told_again,
    lost_deliveries_are_told_once,
)

from qtasks import (
    AsyncQueueTasks,
    MemoryBroker,
    MemoryStorage,
    QueueConfig,
    TaskStatus,
    hookimpl,
    poison,
)
from qtasks.errors import SerializationError, StorageConnectionError
from qtasks.memory import MemoryGlobalConfig
from qtasks.messages import JSONSerializer
from qtasks.poison import FAILURES_HEADER
from qtasks.record import TaskRecord

pytestmark = pytest.mark.anyio


class Unreadable(MemoryStorage):
    """Reading a record fails as if it had been written by something else, while ``broken``."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True
        self.reads = 0

    async def get(self, uuid: str) -> TaskRecord | None:
        if self.broken:
            self.reads += 1
            raise SerializationError("stored record unreadable")
        return await super().get(uuid)


class Seen:
    """Records each message the worker received and each dead-lettered id."""

    def __init__(self) -> None:
        self.headers: list[dict[str, Any]] = []
        self.rejected: dict[str, str] = {}
        self.requeue_delays: list[float | None] = []
        self.dead = anyio.Event()

    @hookimpl
    def qtasks_worker_task_received(self, message: Any) -> None:
        self.headers.append(dict(message.headers))

    @hookimpl
    def qtasks_broker_requeued(self, delay: float | None) -> None:
        self.requeue_delays.append(delay)

    @hookimpl
    def qtasks_task_rejected(self, delivery: Any, reason: str) -> None:
        self.rejected[delivery.id] = reason
        self.dead.set()


async def test_a_message_that_fails_every_time_is_dead_lettered_after_max_deliveries() -> None:
    storage = Unreadable()
    config = QueueConfig(max_deliveries=3, retry_backoff=0.02, retry_backoff_max=0.03)
    app = AsyncQueueTasks(broker=MemoryBroker(), storage=storage, config=config)
    seen = Seen()
    app.add_plugin(seen, name="seen")

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    async with app:
        # An unknown task's stored record is read to say why it is rejected: that read fails.
        await app.broker.publish(app.codec.encode(_message("no_such_task")))
        with anyio.fail_after(5):
            await seen.dead.wait()
        assert storage.reads == 4  # three handlings, then the dead-lettering's own read
        reason = seen.rejected["m-1"]
        assert reason.startswith("worker failed 3 times: SerializationError")
        assert "stored record unreadable" in reason
        # Handed back twice, the second time later than the first.
        assert seen.requeue_delays == [0.02, 0.03]
        [letter] = await app.broker.dead_letters()
        assert letter.id == "m-1" and letter.reason == reason
        # Its body says how many failures it had before the last one.
        assert json.loads(letter.body)["headers"] == {FAILURES_HEADER: 2}
        storage.broken = False
        record = await app.storage.get("m-1")  # replaced by one made from the message
        assert record is not None and record.status is TaskStatus.ERROR
        assert record.error == reason
        # The worker still serves, and nothing else was handed back meanwhile.
        assert (await app.add_task("add", 2, 3, timeout=5)).returning == 5
        assert len(seen.requeue_delays) == 2


class FlakyJSON(JSONSerializer):
    """Fails to decode the ``fail``-th body it is given (a broken codec plugin, once)."""

    def __init__(self, fail: int) -> None:
        super().__init__()
        self.fail = fail
        self.loads_calls = 0

    def loads(self, data: bytes) -> Any:
        self.loads_calls += 1
        if self.loads_calls == self.fail:
            raise RuntimeError("codec plugin bug")
        return super().loads(data)


async def test_a_failure_that_passes_loses_nothing_and_a_retry_starts_its_count_afresh() -> None:
    serializer = FlakyJSON(fail=1)
    app = AsyncQueueTasks(
        broker=MemoryBroker(),
        storage=MemoryStorage(),
        serializer=serializer,
        config=QueueConfig(retry_backoff=0.01),
    )
    seen = Seen()
    app.add_plugin(seen, name="seen")
    runs: list[int] = []

    @app.task(retry=1)
    async def once_more(x: int) -> int:
        runs.append(x)
        if len(runs) == 1:
            raise ValueError("first run fails")
        return x * 2

    async with app:
        task = await app.add_task("once_more", 21)
        final = await task.wait_result(5)
    assert final.status is TaskStatus.SUCCESS and final.returning == 42
    assert runs == [21, 21]
    # The delivery the codec failed on never reached the task; the next carried the count,
    # and the task's own retry (after its first run failed) carried none.
    assert seen.headers == [{FAILURES_HEADER: 1}, {}]
    assert seen.rejected == {}


def _message(task_name: str, args: list[Any] | None = None) -> Any:
    from qtasks.messages import Message

    return Message(uuid="m-1", task_name=task_name, args=args or [])


class Order(MemoryGlobalConfig):
    """Logs when a concurrency slot is freed."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def release_slot_waking(self, key: str, holder: str, *, wake: bool = True) -> str | None:
        # Every release goes through it (release_slot too): the core frees a slot waking the
        # key's next waiter (SlotWake).
        self.log.append("release")
        return await super().release_slot_waking(key, holder, wake=wake)


class FailsOnce(MemoryStorage):
    """The begin of a waiting task's record fails once (a storage bug)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def _fail(self, records: Sequence[TaskRecord]) -> None:
        if not self.failed and any(r.task_name == "limited" for r in records):
            self.failed = True
            raise RuntimeError("storage bug")

    async def begin_many(self, records: Sequence[TaskRecord]) -> list[TaskRecord]:
        self._fail(records)
        return await super().begin_many(records)

    async def begin(self, record: TaskRecord, *, generation: int = 0) -> TaskRecord:
        self._fail([record])
        return await super().begin(record, generation=generation)


async def test_a_handed_back_message_frees_its_concurrency_slot_before_it_comes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Admitted (its slot taken), then a component fails before it starts: the slot is freed
    before the message is handed back, so its next delivery does not wait behind its own
    stale slot (before, the release came after the requeue)."""
    from qtasks.memory import broker as memory_broker

    log: list[str] = []
    requeue = memory_broker.MemoryDelivery.requeue

    async def logged(self: Any, *, delay: float | None = None, body: bytes | None = None) -> bool:
        log.append("requeue")
        return await requeue(self, delay=delay, body=body)

    monkeypatch.setattr(memory_broker.MemoryDelivery, "requeue", logged)
    app = AsyncQueueTasks(
        broker=MemoryBroker(),
        storage=FailsOnce(),
        global_config=Order(log),
        # prefetch 1: the limited task waits in the worker while the other runs.
        config=QueueConfig(max_tasks_process=1, prefetch=1, retry_backoff=0.01),
    )
    release = anyio.Event()

    @app.task
    async def hold() -> None:
        await release.wait()

    @app.task(max_concurrency=1, concurrency_key="key")
    async def limited(key: str) -> str:
        return key

    async with app:
        await app.add_task("hold")
        waiting = await app.add_task("limited", key="k")  # waits: begun when it starts
        release.set()
        done = await app.wait(waiting.uuid, timeout=5)
    assert done.status is TaskStatus.SUCCESS
    assert log[:2] == ["release", "requeue"]


class NoticingBroker(MemoryBroker):
    """A memory broker sharing no server with the storage: the worker consumes it through
    ``BuryNotice`` (RabbitMQ's path), not ``BeginOnClaim``."""

    def shares_server_with(self, storage: object) -> bool:
        return False


async def test_a_message_the_broker_dead_letters_itself_fires_the_dead_lettered_hook() -> None:
    """Every delivery of two messages is lost; the broker buries them at the worker's next
    claim and tells it (``BuryNotice``): each record ends ``error`` and
    ``qtasks_task_dead_lettered`` fires once per message, as for a dead letter the worker
    decides itself (the scenario :func:`begin_scenarios.lost_deliveries_are_told_once`)."""
    app = AsyncQueueTasks(
        broker=NoticingBroker(),
        config=QueueConfig(max_deliveries=1, lease=0.2, shutdown_grace=1.0),
    )

    @app.task
    async def noop(i: int) -> int:
        return 2 * i

    await lost_deliveries_are_told_once(app)


async def test_a_dead_letter_whose_record_could_not_be_written_is_told_again() -> None:
    """The in-memory broker's notice (``BuryNotice``) for which ``buried()`` returned False
    (the storage down for its first save) is kept and told again at a later claim or idle
    wake: the record ends, the hook fires once (the scenario
    :func:`begin_scenarios.a_dead_letter_not_written_is_told_again`)."""
    storage = SaveFailsOnce()
    app = AsyncQueueTasks(
        broker=NoticingBroker(),
        storage=storage,
        config=QueueConfig(max_deliveries=1, lease=0.2, shutdown_grace=1.0),
    )

    @app.task
    async def noop(i: int) -> int:
        return 2 * i

    await a_dead_letter_not_written_is_told_again(app, storage)


async def test_a_dead_letter_told_by_a_notice_while_its_run_ends_fires_the_hook_once() -> None:
    """The last allowed delivery's run stalls the loop past its lease; meanwhile another
    consumer (played inline) buries the redelivery and its notice ends the record and fires
    ``qtasks_task_dead_lettered``. The run's own settle then finds the lease lost and its
    fenced save refused: it fires nothing more (before, the hook fired twice)."""
    lease = 0.3
    app = AsyncQueueTasks(
        broker=NoticingBroker(lease=lease),
        config=QueueConfig(max_tasks_process=1, lease=lease, max_deliveries=1),
    )
    heard: list[str] = []
    settled = anyio.Event()

    class Watch:
        @hookimpl
        def qtasks_task_dead_lettered(self, record: TaskRecord, reason: str) -> None:
            heard.append(reason)

        @hookimpl
        def qtasks_worker_execute_after(self, record: TaskRecord) -> None:
            settled.set()

    app.add_plugin(Watch())
    uuids: list[str] = []

    @app.task
    async def hog() -> str:
        time.sleep(lease * 2)  # noqa: ASYNC251 - stalls the loop on purpose: the lease runs out
        await poison.buried(app, uuids[0], "delivery limit reached (another consumer)")
        return "late"

    async with app:
        task = await app.add_task("hog")
        uuids.append(task.uuid)
        with anyio.fail_after(10):
            await settled.wait()  # the run's settle is over: whatever it fires has fired
        final = await app.get(task.uuid)
    assert final is not None and final.status is TaskStatus.ERROR
    assert heard == ["dead-lettered: delivery limit reached (another consumer)"]


class ReadTogether(MemoryStorage):
    """Each read of record ``uuid`` waits until two are under way: two callers both read it
    before either writes."""

    def __init__(self, uuid: str) -> None:
        super().__init__()
        self.uuid = uuid
        self.reads = 0
        self.both = anyio.Event()

    async def get(self, uuid: str) -> TaskRecord | None:
        record = await super().get(uuid)
        if uuid == self.uuid:
            self.reads += 1
            if self.reads == 2:
                self.both.set()
            with anyio.fail_after(5):
                await self.both.wait()
        return record


@pytest.mark.parametrize(
    ("status", "token"), [(TaskStatus.NEW, None), (TaskStatus.PROCESS, "delivery-1")]
)
async def test_two_notices_of_one_dead_letter_at_once_end_its_record_once(
    status: TaskStatus, token: str | None
) -> None:
    """Two consumers tell the same dead letter at once (a Redis consumer's start tells the
    notices left in the pending hash, maybe while the consumer that claimed it tells it too):
    both read the record before either writes; it ends once and the hook fires once. Before,
    a record never begun (no token: its fenced save is never refused) was ended twice and
    fired the hook twice."""
    uuid = "m-1"
    storage = ReadTogether(uuid)
    app = AsyncQueueTasks(storage=storage, config=QueueConfig(plugins_disabled=["*"]))
    heard: list[str] = []

    class Watch:
        @hookimpl
        def qtasks_task_dead_lettered(self, record: TaskRecord, reason: str) -> None:
            heard.append(record.uuid)

    app.add_plugin(Watch())
    await app.start()
    try:
        await storage.add(TaskRecord(uuid=uuid, task_name="noop", status=status, token=token))
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(poison.buried, app, uuid, "delivery limit reached")
        final = await storage.get(uuid)
    finally:
        await app.aclose()
    assert storage.reads >= 2  # both read it before either wrote
    assert heard == [uuid]
    assert final is not None
    assert (final.status, final.error, final.token) == (
        TaskStatus.ERROR,
        "dead-lettered: delivery limit reached",
        poison.DEAD_LETTER_TOKEN,
    )


class SavesFail(MemoryStorage):
    """Every save fails as if the storage's server were down."""

    async def save(self, record: TaskRecord, *, fence: str | None = None) -> bool:
        raise StorageConnectionError("the storage is down")


async def test_buried_says_whether_the_record_was_dealt_with() -> None:
    """``buried()`` returns False when the record could not be written (a broker then keeps
    the notice to tell it again), True once it is ended, or when telling it again cannot
    change anything (a record that cannot be decoded, one already final)."""
    unreadable = Unreadable()
    told: list[bool] = []
    for storage in (SavesFail(), unreadable, MemoryStorage()):
        app = AsyncQueueTasks(storage=storage, config=QueueConfig(plugins_disabled=["*"]))
        await app.start()
        try:
            unreadable.broken = False
            await storage.add(TaskRecord(uuid="m-1", task_name="noop", status=TaskStatus.NEW))
            unreadable.broken = True
            told.append(await poison.buried(app, "m-1", "delivery limit reached"))
            if type(storage) is MemoryStorage:  # ended: told again, it is found final
                told.append(await poison.buried(app, "m-1", "delivery limit reached"))
                final = await storage.get("m-1")
                assert final is not None and final.status is TaskStatus.ERROR
        finally:
            await app.aclose()
    assert told == [False, True, True, True]
