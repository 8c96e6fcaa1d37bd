"""Workflows and bulk enqueue on the in-memory components, with an in-process worker: the
same settle path (SharedServer.ack_final/ack_finals) the Redis backend takes."""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from late_chord import add_late, chord_ending_late
from lost_member import check_a_lost_member_reads_none
from step_inputs import check_step_inputs

from qtasks import (
    AsyncQueueTasks,
    MemoryBroker,
    MemoryStorage,
    QueueConfig,
    QueueTasks,
    Task,
    TaskDeclarationError,
    TaskRecord,
    TaskStatus,
    UnknownTaskError,
    WorkflowError,
    chain,
    chord,
    group,
    hookimpl,
)
from qtasks.components import FailedMember, WorkflowStore
from qtasks.errors import (
    ConfigError,
    SerializationError,
    StorageConnectionError,
    TaskArgumentsError,
    TaskNotFoundError,
    TaskTimeoutError,
)
from qtasks.memory.broker import MemoryDelivery
from qtasks.memory.signals import _Signal
from qtasks.messages import Envelope, Message
from qtasks.workflows import Chain, Chord, Group
from qtasks.workflows.plan import GENERATION, MIN_RUN, compact
from qtasks.workflows.runtime import _expand, generation

pytestmark = pytest.mark.anyio


class PlainBroker(MemoryBroker):
    """A memory broker that folds nothing into the storage's writes: the settle step takes
    the path of a broker without a shared server (RabbitMQ's): save, continue, publish,
    ack."""

    def shares_server_with(self, storage: object) -> bool:
        return False


def make_app(plain: bool = False) -> AsyncQueueTasks:
    app = AsyncQueueTasks(
        broker=PlainBroker() if plain else None,
        config=QueueConfig(max_tasks_process=8, lease=2.0, shutdown_grace=2.0),
    )
    calls: list[tuple[str, Any]] = []
    app.state_calls = calls  # type: ignore[attr-defined]  # the test's own log

    @app.task
    def add(a: int, b: int) -> int:
        calls.append(("add", (a, b)))
        return a + b

    @app.task
    def double(x: int) -> int:
        calls.append(("double", x))
        return 2 * x

    @app.task
    def total(xs: list[int]) -> int:
        calls.append(("total", xs))
        return sum(xs)

    @app.task
    def fail(x: int) -> int:
        calls.append(("fail", x))
        raise ValueError(f"bad {x}")

    @app.task
    def as_set(x: int) -> Any:
        return {x}

    @app.task
    def on_error(workflow: str, note: str) -> str:
        calls.append(("on_error", (workflow, note)))
        return note

    @app.task
    async def slow(x: int) -> int:
        await anyio.sleep(30)
        return x

    return app


@pytest.fixture(params=["shared", "plain"])
async def app(request: pytest.FixtureRequest) -> AsyncIterator[AsyncQueueTasks]:
    """Every test twice: settled through SharedServer.ack_final (as on Redis), and through
    the plain calls (as with RabbitMQ)."""
    app = make_app(plain=request.param == "plain")
    yield app
    expected = "sequential" if request.param == "plain" else "shared"
    assert app.enqueue_path == expected, "the test did not take the path it is named for"
    await app.aclose()


def calls(app: AsyncQueueTasks) -> list[tuple[str, Any]]:
    log: list[tuple[str, Any]] = app.state_calls  # type: ignore[attr-defined]  # set above
    return log


async def test_chain_passes_each_result_on(app: AsyncQueueTasks) -> None:
    add, double = app.tasks["add"], app.tasks["double"]
    flow = chain(add.s(1, 2), double.s(), double.s())
    async with app:
        started = await app.run_workflow(flow)
        assert started.status == "running" and len(started.members) == 3
        done = await started.wait_result(timeout=5)
    assert (done.status, done.result) == ("success", 12)
    records = [await app.get(u) for u in done.members]
    assert [r.status for r in records if r] == [TaskStatus.SUCCESS] * 3
    assert all(r is not None and r.workflow == done.id for r in records)
    assert calls(app) == [("add", (1, 2)), ("double", 3), ("double", 6)]


async def test_a_step_s_record_shows_its_input_once_it_ended(app: AsyncQueueTasks) -> None:
    # Its record showed None in its input's place for ever, even once it ended.
    await check_step_inputs(app)


async def test_group_results_in_input_order_and_map(app: AsyncQueueTasks) -> None:
    double = app.tasks["double"]
    async with app:
        done = await (await app.run_workflow(group(double.s(i) for i in range(20)))).wait_result(5)
        mapped = await (await app.run_workflow(double.map(range(5)))).wait_result(5)
    assert done.result == [2 * i for i in range(20)]
    assert mapped.result == [0, 2, 4, 6, 8]


async def test_chord_callback_gets_every_result_once(app: AsyncQueueTasks) -> None:
    double, total = app.tasks["double"], app.tasks["total"]
    async with app:
        wf = await app.run_workflow(chord(group(double.s(i) for i in range(50)), total.s()))
        done = await wf.wait_result(timeout=5)
    assert done.result == sum(2 * i for i in range(50))
    assert [c for c in calls(app) if c[0] == "total"] == [("total", [2 * i for i in range(50)])]


async def test_celery_s_chord_header_then_callback_builds_the_same_chord(
    app: AsyncQueueTasks,
) -> None:
    """Celery's ``chord(header)(callback)`` (it raised ``TypeError: missing callback``)."""
    double, total = app.tasks["double"], app.tasks["total"]
    header = [double.s(1), double.s(2)]
    built = chord(header)(total.s())
    assert built == chord(header, total.s())
    with pytest.raises(WorkflowError, match=r"no callback yet: call it with one"):
        await app.run_workflow(chord(header))  # type: ignore[arg-type]  # what is refused
    with pytest.raises(WorkflowError, match=r"no callback yet"):
        chain(double.s(1), chord(header))  # type: ignore[arg-type]  # what is refused
    async with app:
        done = await (await app.run_workflow(built)).wait_result(timeout=5)
    assert done.result == 6


async def test_celerys_chain_of_a_list_is_the_chain_of_its_items(app: AsyncQueueTasks) -> None:
    """Celery's ``chain([a.s(1, 2), b.s()])`` (a list, as ``group([...])`` already took) was
    refused: "a workflow is built of signatures ..., not [Signature(...), ...]"."""
    add, double = app.tasks["add"], app.tasks["double"]
    steps = [add.s(1, 2), double.s()]
    assert chain(steps) == chain(*steps) == chain(add.s(1, 2), (s for s in [double.s()]))
    async with app:
        done = await (await app.run_workflow(chain(steps, double.s()))).wait_result(timeout=5)
    assert (done.status, done.result) == ("success", 12)
    with pytest.raises(WorkflowError, match="a chain needs at least one step"):
        chain([])


async def test_nesting_chain_of_groups_and_group_of_chains(app: AsyncQueueTasks) -> None:
    add, double, total = app.tasks["add"], app.tasks["double"], app.tasks["total"]
    flow = chain(
        group(chain(add.s(1, 1), double.s()), chain(add.s(2, 2), double.s(), double.s())),
        total.s(),
        group(double.s(), add.s(100)),
    )
    async with app:
        done = await (await app.run_workflow(flow)).wait_result(timeout=5)
    # group of chains: [4, 16] -> total 20 -> [40, 120]
    assert done.result == [40, 120]


async def test_failing_step_fails_the_chain_and_cancels_later_steps(app: AsyncQueueTasks) -> None:
    add, fail, double = app.tasks["add"], app.tasks["fail"], app.tasks["double"]
    err = app.signature("on_error", ("note",))
    async with app:
        wf = await app.run_workflow(chain(add.s(1, 2), fail.s(), double.s()), on_error=err)
        done = await wf.wait_result(timeout=5)
        assert done.on_error is not None
        callback = await app.wait(done.on_error, 5)
    assert done.status == "error"
    assert done.error is not None and done.members[1] in done.error and "bad 3" in done.error
    later = await app.get(done.members[2])
    assert later is not None and later.status is TaskStatus.CANCEL
    assert "double" not in [name for name, _ in calls(app)]
    assert callback.returning == "note"
    assert [c for c in calls(app) if c[0] == "on_error"] == [("on_error", (done.id, "note"))]


async def test_a_failed_workflow_names_the_member_that_failed_it() -> None:
    """The error callback finds the failing member's record, its traceback with it."""
    app = AsyncQueueTasks()
    tracebacks: list[str | None] = []

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def fail(n: int) -> None:
        raise ValueError(f"bad {n}")

    @app.task
    async def alert(workflow: str) -> None:
        state = await app.get_workflow(workflow)
        assert state is not None and state.failed_member is not None
        record = await app.get(state.failed_member)
        tracebacks.append(None if record is None else record.traceback)

    async with app:
        ok = await (await app.run_workflow(chain(add.s(1, 2)))).wait_result(timeout=5)
        wf = await app.run_workflow(chain(add.s(1, 2), fail.s(), add.s(4)), on_error=alert.s())
        done = await wf.wait_result(timeout=5)
        assert done.on_error is not None
        await app.wait(done.on_error, 5)
    assert (ok.status, ok.failed_member) == ("success", None)
    assert (done.status, done.failed_member) == ("error", done.members[1])
    (traceback,) = tracebacks
    assert traceback is not None and "ValueError: bad 3" in traceback


async def test_get_workflow_records_reads_every_member_s_record(app: AsyncQueueTasks) -> None:
    add, fail, on_error = app.tasks["add"], app.tasks["fail"], app.tasks["on_error"]

    read: list[str] = []

    class Reads:
        @hookimpl
        def qtasks_storage_got(self, record: TaskRecord) -> None:
            read.append(record.uuid)

    app.add_plugin(Reads())

    async with app:
        wf = await app.run_workflow(
            chain(add.s(1, 2), fail.s(), add.s(4)), on_error=on_error.s("note")
        )
        done = await wf.wait_result(timeout=5)
        assert done.on_error is not None
        await app.wait(done.on_error, 5)
        records = await app.get_workflow_records(wf.id)
        assert await app.get_workflow_records("no-such-workflow") is None
        assert await app.get_workflow_records(done.members[0]) is None  # a member, no workflow
    assert records is not None
    assert list(records) == [*done.members, done.on_error]
    got = [(r.task_name, r.status, r.args) for r in records.values() if r is not None]
    assert got == [
        ("add", TaskStatus.SUCCESS, [1, 2]),
        ("fail", TaskStatus.ERROR, [3]),
        ("add", TaskStatus.CANCEL, [None, 4]),
        ("on_error", TaskStatus.SUCCESS, [done.id, "note"]),
    ]
    failed = records[done.members[1]]
    assert failed is not None and failed.traceback is not None and "bad 3" in failed.traceback
    assert failed.uuid == done.failed_member
    # Read as app.get reads a record: through qtasks_storage_got.
    assert set(records) <= set(read)


def forget_in(storage: object) -> Callable[[str], Awaitable[None]]:
    """Removes a record from ``storage`` (a MemoryStorage) as its expiry does, whatever its
    ``result_ttl`` and its workflow: the expiry of a workflow's members together with its
    own record leaves no moment when one member is gone and the workflow is not."""
    assert isinstance(storage, MemoryStorage)

    async def forget(uuid: str) -> None:
        del storage._records[uuid]
        storage._forget(uuid)

    return forget


async def test_get_workflow_records_gives_none_for_a_record_that_is_gone(
    app: AsyncQueueTasks,
) -> None:
    await check_a_lost_member_reads_none(app, forget_in(app.storage))


class _OlderWorkflowStore(MemoryStorage):
    """A WorkflowStore written before FailedMember existed."""

    failed_member = None  # type: ignore[assignment]


async def test_a_workflow_store_without_failed_member_still_keeps_workflows() -> None:
    app = AsyncQueueTasks(storage=_OlderWorkflowStore())

    @app.task
    async def fail(n: int) -> None:
        raise ValueError(f"bad {n}")

    assert isinstance(app.storage, WorkflowStore)
    assert not isinstance(app.storage, FailedMember)
    async with app:
        done = await (await app.run_workflow(chain(fail.s(3)))).wait_result(timeout=5)
    assert (done.status, done.failed_member) == ("error", None)
    assert done.error is not None and done.members[0] in done.error


async def test_failing_chord_member_never_runs_the_callback(app: AsyncQueueTasks) -> None:
    double, fail, total = app.tasks["double"], app.tasks["fail"], app.tasks["total"]
    async with app:
        wf = await app.run_workflow(chord([double.s(1), fail.s(7), double.s(2)], total.s()))
        done = await wf.wait_result(timeout=5)
    assert done.status == "error"
    assert done.error is not None and done.members[1] in done.error and "(fail)" in done.error
    callback = await app.get(done.members[-1])
    assert callback is not None and callback.status is TaskStatus.CANCEL
    assert "total" not in [name for name, _ in calls(app)]


async def test_cancelling_a_queued_or_delayed_member_fails_the_workflow_at_once(
    app: AsyncQueueTasks,
) -> None:
    double, total = app.tasks["double"], app.tasks["total"]
    err = app.signature("on_error", ("note",))
    members = [double.s(1), double.s(2), double.s(3).set(delay=30)]
    wf = await app.run_workflow(chord(members, total.s()), on_error=err)
    # No worker serves yet: member 1 is queued, member 2 delayed; their messages are dropped.
    for uuid in wf.members[1:3]:
        cancelled = await app.cancel(uuid, "not needed")
        assert cancelled is not None and cancelled.status is TaskStatus.CANCEL
    state = await app.get_workflow(wf.id)
    assert state is not None and state.status == "error"
    assert state.error is not None and wf.members[1] in state.error
    async with app:
        assert state.on_error is not None
        callback = await app.wait(state.on_error, 5)
    assert callback.status is TaskStatus.SUCCESS
    callback_step = await app.get(wf.members[-1])
    assert callback_step is not None and callback_step.status is TaskStatus.CANCEL
    assert [c for c in calls(app) if c[0] in ("on_error", "total")] == [
        ("on_error", (wf.id, "note"))
    ]


async def test_cancelling_a_running_member_runs_the_error_callback_once(
    app: AsyncQueueTasks,
) -> None:
    """``app.cancel`` tells the workflow at once (it publishes the error callback); the
    member's worker then stores the same cancel and continues the workflow again: a repeat,
    which must not publish the callback a second time (the older copy replaced the newer one
    and was dropped at begin as stale: the callback never ran)."""
    slow, double = app.tasks["slow"], app.tasks["double"]
    err = app.signature("on_error", ("note",))
    started, settled = anyio.Event(), anyio.Event()

    class Watch:
        @hookimpl
        def qtasks_worker_execute_before(self, record: TaskRecord) -> None:
            if record.task_name == "slow":
                started.set()

        @hookimpl
        def qtasks_task_cancelled(self, record: TaskRecord) -> None:
            if record.task_name == "slow":
                settled.set()

    app.add_plugin(Watch())
    published: list[str] = []
    publish = app.broker.publish

    async def counted(envelope: Envelope) -> None:
        published.append(envelope.id)
        await publish(envelope)

    app.broker.publish = counted  # type: ignore[method-assign]  # counts the publishes
    async with app:
        wf = await app.run_workflow(chain(slow.s(1), double.s()), on_error=err)
        with anyio.fail_after(5):
            await started.wait()
        await app.cancel(wf.members[0], "stop")
        with anyio.fail_after(5):
            await settled.wait()  # the worker stored the cancel and settled the member
        state = await app.get_workflow(wf.id)
        assert state is not None and state.status == "error" and state.on_error is not None
        callback = await app.wait(state.on_error, 5)
    assert callback.status is TaskStatus.SUCCESS
    assert [c for c in calls(app) if c[0] == "on_error"] == [("on_error", (wf.id, "note"))]
    if app.enqueue_path == "shared":
        # The settle's repeat publishes nothing sent already (plain calls publish a newer
        # generation instead, which replaces the first copy).
        assert published.count(state.on_error) == 1


async def test_a_member_that_expires_fails_the_workflow(app: AsyncQueueTasks) -> None:
    """A member whose message carries ``expires`` (a plugin's rewrite; past already) expires
    at the worker: its workflow fails and the error callback runs."""

    class ExpiredAlready:
        @hookimpl
        def qtasks_task_enqueue(self, message: Message) -> Message | None:
            if message.task_name != "double":
                return None
            message.headers["expires"] = message.created_at - 1
            return message

    app.add_plugin(ExpiredAlready())
    double = app.tasks["double"]
    err = app.signature("on_error", ("note",))
    async with app:
        wf = await app.run_workflow(chain(double.s(1), double.s()), on_error=err)
        done = await wf.wait_result(5)
        assert done.on_error is not None
        callback = await app.wait(done.on_error, 5)
    assert done.status == "error"
    assert done.error is not None and wf.members[0] in done.error and "expired" in done.error
    assert callback.status is TaskStatus.SUCCESS
    assert "double" not in [name for name, _ in calls(app)]


async def test_non_serialisable_result_fails_the_step_clearly(app: AsyncQueueTasks) -> None:
    as_set, double = app.tasks["as_set"], app.tasks["double"]
    async with app:
        done = await (await app.run_workflow(chain(as_set.s(1), double.s()))).wait_result(5)
    assert done.status == "error"
    first = await app.get(done.members[0])
    assert first is not None and first.error is not None and "SerializationError" in first.error
    assert "double" not in [name for name, _ in calls(app)]


async def test_cancel_workflow_cancels_pending_and_running_members(app: AsyncQueueTasks) -> None:
    slow, double = app.tasks["slow"], app.tasks["double"]
    started = anyio.Event()

    class Started:
        @hookimpl
        def qtasks_worker_execute_before(self) -> None:
            started.set()

    app.add_plugin(Started())
    async with app:
        wf = await app.run_workflow(chain(slow.s(1), double.s()))
        with anyio.fail_after(5):
            await started.wait()
        cancelled = await app.cancel_workflow(wf.id, "user said so")
        assert cancelled is not None and cancelled.status == "cancel"
        running = await app.wait(wf.members[0], 5)
        assert running.status is TaskStatus.CANCEL
        pending = await app.get(wf.members[1])
        assert pending is not None and pending.status is TaskStatus.CANCEL
        state = await app.get_workflow(wf.id)
        assert state is not None and (state.status, state.error) == ("cancel", "user said so")
    assert "double" not in [name for name, _ in calls(app)]


async def test_cancelling_an_ended_workflow_leaves_its_running_error_callback_alone(
    app: AsyncQueueTasks,
) -> None:
    """A workflow that failed is over: ``cancel_workflow`` changes nothing and returns its
    state (before, it returned ``error`` and yet cancelled the running error callback)."""
    fail, double = app.tasks["fail"], app.tasks["double"]
    running, release = anyio.Event(), anyio.Event()

    @app.task
    async def alert(workflow: str) -> str:
        running.set()
        await release.wait()
        return f"alerted {workflow}"

    async with app:
        wf = await app.run_workflow(chain(fail.s(1), double.s()), on_error=alert.s())
        done = await wf.wait_result(5)
        assert done.status == "error" and done.on_error is not None
        with anyio.fail_after(5):
            await running.wait()
        after = await app.cancel_workflow(wf.id, "cleanup")
        assert after is not None and (after.status, after.error) == ("error", done.error)
        release.set()
        callback = await app.wait(done.on_error, 5)
        assert (callback.status, callback.returning) == (TaskStatus.SUCCESS, f"alerted {wf.id}")
        state = await app.get_workflow(wf.id)
        assert state is not None and state.status == "error"


async def test_a_plain_cancel_of_the_workflow_record_cancels_its_members(
    app: AsyncQueueTasks,
) -> None:
    double = app.tasks["double"]
    err = app.signature("on_error", ("note",))
    wf = await app.run_workflow(chain(double.s(1), double.s(), double.s()), on_error=err)
    cancelled = await app.cancel(wf.id, "stop")
    assert cancelled is not None and cancelled.status is TaskStatus.CANCEL
    state = await app.get_workflow(wf.id)
    assert state is not None and state.on_error is not None
    for uuid in [*wf.members, state.on_error]:  # the gated ones too: none left new for ever
        member = await app.get(uuid)
        assert member is not None and member.status is TaskStatus.CANCEL, uuid
    async with app:
        assert (await app.wait_workflow(wf.id, 5)).status == "cancel"
    assert calls(app) == []


async def test_bad_input_is_refused_when_built(app: AsyncQueueTasks) -> None:
    with pytest.raises(UnknownTaskError):
        app.signature("nope")
    with pytest.raises(WorkflowError, match="at least one member"):
        group([])
    with pytest.raises(WorkflowError, match="at least one step"):
        chain()
    with pytest.raises(WorkflowError, match="signatures"):
        group([object()])  # type: ignore[list-item]  # the point: not a signature
    looped = group(app.tasks["double"].s(1))
    looped.tasks.append(looped)
    with pytest.raises(WorkflowError, match="contains itself"):
        await app.run_workflow(looped)
    with pytest.raises(TaskArgumentsError):  # add needs two arguments: the input and one more
        await app.run_workflow(chain(app.tasks["double"].s(1), app.tasks["add"].s(1, 2)))
    assert await app.get_workflow("unknown") is None
    with pytest.raises(TaskNotFoundError):
        await app.wait_workflow("unknown", 1)


async def test_an_on_error_or_bulk_item_that_is_not_a_signature_is_refused(
    app: AsyncQueueTasks,
) -> None:
    """Review r5 #7: ``on_error=alert`` (the task, not ``alert.s()``) or a task name raised
    AttributeError; ``add_tasks([double])`` too. Nothing is stored or published."""
    double, on_error = app.tasks["double"], app.tasks["on_error"]
    workflow = chain(double.s(1))
    for wrong in ("on_error", on_error, chain(on_error.s()), group(on_error.s())):
        with pytest.raises(WorkflowError, match="on_error expects a signature"):
            await app.run_workflow(workflow, on_error=wrong)  # type: ignore[arg-type]  # the point
        with pytest.raises(TaskArgumentsError, match="add_tasks expects a signature"):
            await app.add_tasks([wrong])  # type: ignore[list-item]  # the point
    stats = await app.broker.stats()
    assert (stats.ready_by_priority, stats.delayed) == ({}, 0)
    assert await app.storage.stats() == {}
    assert calls(app) == []


@pytest.mark.parametrize("delay", [float("nan"), float("inf"), float("-inf")])
async def test_a_delay_that_is_no_time_is_refused_before_anything_is_stored(
    app: AsyncQueueTasks, delay: float
) -> None:
    double = app.tasks["double"]
    with pytest.raises(TaskDeclarationError, match="delay expects finite seconds >= 0"):
        double.s(1).set(delay=delay)
    with pytest.raises(TaskArgumentsError, match="delay"):
        await app.add_task("double", 1, delay=delay)
    stats = await app.broker.stats()
    assert sum(stats.ready_by_priority.values()) == 0 and stats.delayed == 0


async def test_a_start_that_fails_after_its_first_batch_cancels_the_workflow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """run_workflow publishes the first steps in batches: when a later one fails, the steps
    already published do not leave a workflow running for ever."""
    monkeypatch.setattr("qtasks.workflows.runtime.BATCH", 2)

    class SecondBatchFails(PlainBroker):
        publishes = 0

        async def publish_many(self, envelopes: Any) -> None:
            SecondBatchFails.publishes += 1
            if SecondBatchFails.publishes == 2:
                raise StorageConnectionError("went away")
            await super().publish_many(envelopes)

    app = AsyncQueueTasks(broker=SecondBatchFails())

    @app.task
    def one(x: int) -> int:
        return x

    try:
        with pytest.raises(StorageConnectionError) as raised:
            await app.run_workflow(chord(one.map(range(3)), app.tasks["one"].s()))
        stored = await app.storage.workflows(1)  # type: ignore[attr-defined]
        assert len(stored) == 1
        state = await app.get_workflow(stored[0].uuid)
        assert state is not None and state.status == "cancel"
        assert any(state.id in note for note in raised.value.__notes__)
        members = [await app.get(uuid) for uuid in state.members]
        assert all(m is not None and m.status is TaskStatus.CANCEL for m in members)
    finally:
        await app.aclose()


async def test_wait_result_times_out(app: AsyncQueueTasks) -> None:
    wf = await app.run_workflow(app.tasks["double"].s(1))  # no worker serves
    with pytest.raises(TaskTimeoutError) as raised:
        await wf.wait_result(timeout=0.1)
    # Named as a workflow, with why nothing ran it (as a task's wait says).
    assert raised.value.what == "workflow"
    assert str(raised.value).startswith(f"workflow {wf.id} did not finish within 0.1 s")
    assert "Broker (process memory), so nothing ran it" in str(raised.value)


async def test_a_workflow_wait_timeout_names_the_members_not_final() -> None:
    app = make_app()
    double, add = app.tasks["double"], app.tasks["add"]
    async with app:
        wf = await app.run_workflow(chain(double.s(1).set(delay=60), add.s(1)))
        with pytest.raises(TaskTimeoutError) as raised:
            await wf.wait_result(timeout=0.1)
    first, second = wf.members
    assert str(raised.value) == (
        f"workflow {wf.id} did not finish within 0.1 s: 2 of its 2 members are not final: "
        f"double [{first}] (new), add [{second}] (new)"
    )


async def test_add_tasks_enqueues_each_and_fires_hooks_per_task(app: AsyncQueueTasks) -> None:
    added: list[str] = []

    class Seen:
        @hookimpl
        def qtasks_task_enqueued(self, record: Any) -> None:
            added.append(record.uuid)

    app.add_plugin(Seen())
    double = app.tasks["double"]
    records = await double.add_tasks(range(2500))
    more = await app.add_tasks([app.tasks["add"].s(1, 2), double.s(5).set(priority=-1)])
    assert added == [r.uuid for r in records + more]
    with pytest.raises(TaskArgumentsError):
        await app.add_tasks([app.tasks["add"].s(1)])
    async with app:
        results = [(await r.wait_result(5)).returning for r in records[:3] + more]
    assert results == [0, 2, 4, 3, 10]


@pytest.mark.parametrize("shape", ["list", "generator"])
async def test_a_bad_add_tasks_item_after_a_full_batch_stores_nothing(
    app: AsyncQueueTasks, shape: str
) -> None:
    """A bad item past the first 1,000 left the first batch stored and published (its tasks
    would run; the call raised, its records lost to the caller): now every item is checked
    and prepared before anything is stored, a list or a generator alike, and the error, of
    the type add_task raises, names the item's index."""
    double = app.tasks["double"]
    bad_items: list[tuple[int, Any, type[Exception], str]] = [
        (1500, double.s(1, 2), TaskArgumentsError, "add_tasks item 1500: "),
        (
            1000,
            double.s(object()),
            SerializationError,
            "add_tasks item 1000: task 'double': argument args[0] cannot be encoded (object)",
        ),
        (2499, "double", TaskArgumentsError, "add_tasks item 2499: add_tasks expects a signature"),
    ]
    for index, bad, error, says in bad_items:
        items: list[Any] = [double.s(i) for i in range(2500)]
        items[index] = bad
        given = items if shape == "list" else (item for item in items)
        with pytest.raises(error, match=f"^{re.escape(says)}"):
            await app.add_tasks(given)
        stats = await app.broker.stats()
        assert (stats.ready_by_priority, stats.delayed) == ({}, 0)
        assert await app.storage.stats() == {}
    records = await app.add_tasks(double.s(i) for i in range(1500))
    assert await app.storage.stats() == {"new": 1500}
    async with app:
        assert (await records[-1].wait_result(5)).returning == 2998


class EnqueueSeen:
    """The producer's per-task notifications: the uuids of ``qtasks_task_enqueue`` and
    ``qtasks_task_enqueued``, and ``(uuid, error)`` of ``qtasks_task_enqueue_failed``."""

    def __init__(self) -> None:
        self.begun: list[str] = []
        self.enqueued: list[str] = []
        self.failed: list[tuple[str, str]] = []

    @hookimpl
    def qtasks_task_enqueue(self, message: Any) -> None:
        self.begun.append(message.uuid)

    @hookimpl
    def qtasks_task_enqueued(self, record: Any) -> None:
        self.enqueued.append(record.uuid)

    @hookimpl
    def qtasks_task_enqueue_failed(self, record: Any, exc: BaseException) -> None:
        self.failed.append((record.uuid, str(exc)))


async def test_a_bad_add_tasks_item_fires_enqueue_failed_for_the_items_before_it(
    app: AsyncQueueTasks,
) -> None:
    """The items before a bad one had qtasks_task_enqueue applied (a tracing plugin opened a
    span for each) and nothing ended it: they get qtasks_task_enqueue_failed with the error,
    as a failed batch's tasks do. A generator that raises, likewise."""
    seen = EnqueueSeen()
    app.add_plugin(seen)
    double = app.tasks["double"]
    items = [double.s(i) for i in range(2500)]
    items[1500] = double.s(1, 2)
    with pytest.raises(TaskArgumentsError, match=r"^add_tasks item 1500: ") as raised:
        await app.add_tasks(items)
    assert len(seen.begun) == 1500
    assert seen.failed == [(uuid, str(raised.value)) for uuid in seen.begun]

    def broken() -> Any:
        yield double.s(1)
        raise OSError("the source went away")

    seen.begun.clear()
    seen.failed.clear()
    with pytest.raises(OSError, match="the source went away"):
        await app.add_tasks(broken())
    assert seen.failed == [(seen.begun[0], "the source went away")]
    assert seen.enqueued == []
    assert await app.storage.stats() == {}


async def test_add_tasks_fires_enqueue_failed_for_the_batches_behind_a_failed_one(
    app: AsyncQueueTasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every item is prepared before the first batch is stored: when a batch fails, the
    batches never begun behind it had qtasks_task_enqueue applied too, and get
    qtasks_task_enqueue_failed as the failed batch's tasks do."""
    seen = EnqueueSeen()
    app.add_plugin(seen)
    await app.start()
    add = app.storage.add
    count = 0

    async def fails_in_the_second_batch(record: TaskRecord) -> None:
        nonlocal count
        count += 1
        if count == 1001:
            raise StorageConnectionError("storage went away")
        await add(record)

    monkeypatch.setattr(app.storage, "add", fails_in_the_second_batch)
    with pytest.raises(StorageConnectionError):
        await app.tasks["double"].add_tasks(range(4500))  # the fourth never begun, both paths
    assert seen.enqueued == seen.begun[:1000]
    assert seen.failed == [(uuid, "storage went away") for uuid in seen.begun[1000:]]


def test_sync_app_twins() -> None:
    app = QueueTasks(config=QueueConfig(max_tasks_process=4))

    @app.task
    def inc(x: int) -> int:
        return x + 1

    @app.task
    def total(xs: list[int]) -> int:
        return sum(xs)

    try:
        records = inc.add_tasks([1, 2, 3])
        assert [r.status for r in records] == [TaskStatus.NEW] * 3
        with app:
            assert [r.wait_result(5).returning for r in records] == [2, 3, 4]
            wf = app.run_workflow(chord(inc.map([1, 2]), total.s()))
            assert wf.wait_result(5).result == 5
            again = app.get_workflow(wf.id)
            assert again is not None and again.status == "success"
            members = app.get_workflow_records(wf.id)
            assert members is not None and list(members) == wf.members
            assert [r.returning for r in members.values() if isinstance(r, Task)] == [2, 3, 5]
            app.portal.call(forget_in(app.storage), wf.members[0])
            members = app.get_workflow_records(wf.id)
            assert members is not None and list(members) == wf.members
            assert [r.returning if r else None for r in members.values()] == [None, 3, 5]
            assert app.get_workflow_records("no-such-workflow") is None
    finally:
        app.close()


async def test_a_member_the_worker_rejects_fails_the_workflow() -> None:
    """A worker that does not know a member's task nacks it: the workflow fails, naming it,
    instead of waiting for a step that will never come."""
    broker, storage = MemoryBroker(), MemoryStorage()
    producer = AsyncQueueTasks(broker=broker, storage=storage)

    @producer.task
    def ghost(x: int) -> int:
        return x

    worker = AsyncQueueTasks(broker=broker, storage=storage)
    try:
        wf = await producer.run_workflow(chain(ghost.s(1), ghost.s()))
        async with worker:
            done = await producer.wait_workflow(wf.id, 5)
        later = await storage.get(wf.members[1])
    finally:
        await producer.aclose()
        await worker.aclose()
    assert done.status == "error" and done.error is not None
    assert wf.members[0] in done.error and "unknown task" in done.error
    assert later is not None and later.status is TaskStatus.CANCEL


class AckFailsOnce(PlainBroker):
    """The first ack of ``victim``'s message fails, as if its worker died right after
    publishing the next step: the message comes back after its lease."""

    victim = ""

    settled_again = False

    def _settle(self, token: str) -> Any:
        entry = self._inflight.get(token)
        if entry is not None and entry.id == self.victim:
            self.victim, self.failed = "", entry.id
            raise ConnectionError("the worker died before its ack")
        if entry is not None and entry.attempt > 0 and entry.id == self.failed:
            self.settled_again = True
        return super()._settle(token)


async def test_a_member_redelivered_after_its_step_was_published_publishes_it_once() -> None:
    broker = AckFailsOnce()
    app = AsyncQueueTasks(broker=broker, config=QueueConfig(lease=0.5, max_tasks_process=4))
    runs: list[int] = []

    @app.task
    def first(x: int) -> int:
        return x + 1

    @app.task
    def second(x: int) -> int:
        runs.append(x)
        return x * 10

    try:
        wf = await app.run_workflow(chain(first.s(1), second.s()))
        broker.victim = wf.members[0]
        async with app:
            done = await wf.wait_result(10)
            # The first step's message was handed back (its ack failed), comes back after a
            # second, finds its record final and continues the workflow again: nothing left.
            with anyio.fail_after(5):
                while True:
                    stats = await broker.stats()
                    if not (stats.in_flight or stats.delayed or stats.ready_by_priority):
                        break
                    await anyio.sleep(0.05)  # broker state: nothing to wait on
    finally:
        await app.aclose()
    assert broker.failed == wf.members[0], "the ack never failed: the test tested nothing"
    assert broker.settled_again, "the first step's message never came back"
    assert (done.status, done.result) == ("success", 20)
    assert runs == [2], "the next step ran more or less than once"


async def test_a_step_published_again_while_its_first_copy_is_held_runs_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The RabbitMQ gap of issue 19, in memory: the worker that settles ``first`` publishes
    ``second`` and loses its ack, so ``first`` comes back and publishes ``second`` again. Its
    first copy is held at the worker (delivered, not begun) until the second copy runs; then
    it reaches begin, while the step runs, and is dropped: the step runs once.

    The in-memory broker replaces a message published again, so the first copy's lease is
    gone and the worker's lease check would drop it before its begin; on RabbitMQ both copies
    are held. Its lease is made to look held, as there: the storage's begin refuses it."""
    monkeypatch.setattr(MemoryDelivery, "held_until", math.inf)
    broker = AckFailsOnce()
    app = AsyncQueueTasks(broker=broker, config=QueueConfig(lease=5.0, max_tasks_process=4))
    storage = app.storage
    assert isinstance(storage, MemoryStorage)
    begins: list[tuple[str, str | None, str | None]] = []
    """(uuid, claim token, returned token) of each begin of the app's storage."""
    plain_begin = storage.begin

    async def logged_begin(record: TaskRecord, *, generation: int = 0) -> TaskRecord:
        got = await plain_begin(record, generation=generation)
        begins.append((record.uuid, record.token, got.token))
        begun_signal.fire()
        return got

    storage.begin = logged_begin  # type: ignore[method-assign]  # begin_many calls it too
    begun_signal = _Signal()
    copies: list[int] = []
    second_runs = anyio.Event()
    runs: list[int] = []
    ids: list[str] = []

    async def begun_twice() -> None:
        with anyio.fail_after(5):
            while sum(1 for b in begins if b[0] == ids[1]) < 2:
                await begun_signal.wait(None)

    class HoldFirstCopy:
        @hookimpl
        async def qtasks_worker_task_received(self, message: Message) -> None:
            if message.uuid != ids[1]:
                return
            copies.append(message.headers.get(GENERATION, 0))
            if GENERATION not in message.headers:
                with anyio.fail_after(5):
                    await second_runs.wait()

    app.add_plugin(HoldFirstCopy())

    @app.task
    def first(x: int) -> int:
        return x + 1

    @app.task
    async def second(x: int) -> int:
        runs.append(x)
        second_runs.set()
        await begun_twice()  # the first copy reaches begin while this one runs
        return x * 10

    try:
        wf = await app.run_workflow(chain(first.s(1), second.s()))
        ids.extend(wf.members)
        broker.victim = wf.members[0]
        async with app:
            done = await wf.wait_result(10)
    finally:
        await app.aclose()
    assert broker.failed == wf.members[0], "the ack never failed: the test tested nothing"
    assert copies == [0, 1], "the step was not published twice, the first copy first"
    of_second = [(claim, got) for uuid, claim, got in begins if uuid == wf.members[1]]
    assert len(of_second) == 2
    assert [claim == got for claim, got in of_second] == [True, False], (
        "the second copy should begin and the first be refused"
    )
    assert (done.status, done.result) == ("success", 20)
    assert runs == [2], "the step ran more or less than once"


def test_a_bad_publish_generation_header_counts_as_none() -> None:
    values = (2, 0, -1, True, "3", 1.5, None)
    assert [generation({GENERATION: v}) for v in values] == [2, 0, 0, 0, 0, 0, 0]
    assert generation({}) == 0


async def test_a_signatures_own_retry_is_used_for_that_call(app: AsyncQueueTasks) -> None:
    attempts: dict[int, int] = {}

    @app.task(retry=0, retry_backoff=0)
    def fails_twice(x: int) -> int:
        attempts[x] = attempts.get(x, 0) + 1
        if attempts[x] < 3:
            raise ValueError(f"attempt {attempts[x]}")
        return x

    async with app:
        retried = await (await app.run_workflow(fails_twice.s(7).set(retry=2))).wait_result(5)
        bulk = await app.add_tasks([fails_twice.s(8).set(retry=2), fails_twice.s(9)])
        results = [await r.wait_result(5) for r in bulk]
    assert (retried.status, retried.result) == ("success", 7)
    assert [r.status for r in results] == [TaskStatus.SUCCESS, TaskStatus.ERROR]
    assert attempts == {7: 3, 8: 3, 9: 1}  # the task's own retry=0 for the plain call
    with pytest.raises(TaskDeclarationError):
        fails_twice.s(1).set(retry=-1)
    with pytest.raises(TaskDeclarationError):
        app.signature("fails_twice", (1,), priority="high")  # type: ignore[arg-type]  # the point


class EnqueueLog:
    """Records the enqueue hooks by member uuid; rewrites ``double``'s argument when asked."""

    def __init__(self, bump: int = 0, want: int = 0) -> None:
        self.bump = bump
        self.rewritten: list[str] = []
        self.added: list[str] = []
        self.enqueued: list[tuple[str, str]] = []
        self.want = want
        self.all_in = anyio.Event()
        """Set once ``want`` members fired ``qtasks_task_enqueued``."""

    @hookimpl
    def qtasks_task_enqueue(self, message: Any) -> Any:
        self.rewritten.append(message.uuid)
        if self.bump and message.task_name == "double" and "qtasks.input" not in message.headers:
            message.args = [message.args[0] + self.bump]
            message.headers["seen"] = True
            return message
        return None

    @hookimpl
    def qtasks_storage_added(self, record: Any) -> None:
        self.added.append(record.uuid)

    @hookimpl
    def qtasks_task_enqueued(self, record: Any) -> None:
        self.enqueued.append((record.uuid, record.task_name))
        if len(self.enqueued) >= self.want:
            self.all_in.set()


async def test_every_member_fires_the_enqueue_hooks_once(app: AsyncQueueTasks) -> None:
    log = EnqueueLog(want=5)
    app.add_plugin(log)
    add, double, total = (app.tasks[n] for n in ("add", "double", "total"))
    flow = chain(group(add.s(1, 2), chain(double.s(1), double.s())), total.s(), double.s())
    wf = await app.run_workflow(flow, on_error=app.signature("on_error", ["x"]))
    first = set(log.enqueued)  # no worker yet: the first steps, published by the client
    async with app:
        done = await wf.wait_result(5)
        assert done.result == 14
        # The last step was enqueued by the worker as it settled the step before: the hook
        # fires once the settle returned, which may be just after the workflow's end.
        with anyio.fail_after(5):
            await log.all_in.wait()
    members = wf.members
    assert len(members) == 5 and done.on_error is not None
    assert first == {(members[0], "add"), (members[1], "double")}
    # qtasks_task_enqueue where each message is built (all at run_workflow, the error
    # callback's too); stored: every record; enqueued: each member whose message was
    # published, once (the error callback's never was).
    assert sorted(log.rewritten) == sorted([*members, done.on_error])
    assert sorted(log.added) == sorted([*members, done.on_error])
    assert sorted(u for u, _ in log.enqueued) == sorted(members)
    assert [u for u, _ in log.enqueued][2:] == members[2:]  # in the order the gates opened


async def test_the_error_callback_fires_enqueued_when_its_gate_opens(
    app: AsyncQueueTasks,
) -> None:
    log = EnqueueLog(want=3)
    app.add_plugin(log)
    add, fail = app.tasks["add"], app.tasks["fail"]
    async with app:
        wf = await app.run_workflow(
            chain(add.s(1, 2), fail.s()), on_error=app.signature("on_error", ["x"])
        )
        done = await wf.wait_result(5)
        assert done.on_error is not None
        await app.wait(done.on_error, 5)
        with anyio.fail_after(5):  # announced once the failing member's settle returned
            await log.all_in.wait()
    assert log.enqueued == [
        (wf.members[0], "add"),
        (wf.members[1], "fail"),
        (done.on_error, "on_error"),
    ]


async def test_qtasks_task_enqueue_rewrites_a_member_message(app: AsyncQueueTasks) -> None:
    app.add_plugin(EnqueueLog(bump=100))
    double = app.tasks["double"]
    async with app:
        wf = await app.run_workflow(chain(double.s(1), double.s()))
        done = await wf.wait_result(5)
        first = await app.get(wf.members[0])
    assert done.result == 404  # (1 + 100) * 2 * 2: the rewrite reached the worker
    assert first is not None and first.args == [101]  # the record says what ran


async def test_a_rewrite_may_not_change_a_member_uuid(app: AsyncQueueTasks) -> None:
    class Renamer:
        @hookimpl
        def qtasks_task_enqueue(self, message: Any) -> Any:
            message.uuid = "x" + message.uuid[1:]
            return message

    app.add_plugin(Renamer())
    async with app:
        with pytest.raises(WorkflowError, match="keeps its uuid"):
            await app.run_workflow(app.tasks["double"].s(1))


async def test_a_workflow_that_cannot_be_stored_fires_enqueue_failed_for_each_member(
    app: AsyncQueueTasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed: list[tuple[str, str]] = []
    rewritten: list[str] = []

    class Seen:
        @hookimpl
        def qtasks_task_enqueue(self, message: Any) -> None:
            rewritten.append(message.uuid)

        @hookimpl
        def qtasks_task_enqueue_failed(self, record: Any, exc: BaseException) -> None:
            failed.append((record.uuid, str(exc)))

    async def broken(*args: Any) -> None:
        raise StorageConnectionError("storage went away")

    app.add_plugin(Seen())
    await app.start()
    monkeypatch.setattr(app.storage, "add_workflow", broken)
    double = app.tasks["double"]
    with pytest.raises(StorageConnectionError):
        await app.run_workflow(chain(group(double.s(1), double.s(2)), double.s()))
    assert len(rewritten) == 3
    assert sorted(u for u, _ in failed) == sorted(rewritten)
    assert {why for _, why in failed} == {"storage went away"}


class ForgetfulStorage(MemoryStorage):
    """Reads the records in ``gone`` as missing (expired, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.gone: set[str] = set()

    async def get_many(self, uuids: Any) -> list[TaskRecord | None]:
        records = await super().get_many(uuids)
        return [None if u in self.gone else r for u, r in zip(uuids, records, strict=True)]


async def test_a_step_whose_input_is_gone_fails_once_naming_it() -> None:
    """A step whose predecessor's record is gone fails with WorkflowInputError, not retried
    (it would not heal), and the workflow fails with it."""
    storage = ForgetfulStorage()
    app = AsyncQueueTasks(storage=storage, config=QueueConfig(retry=3, retry_backoff=0))
    runs: list[int] = []

    @app.task
    def one() -> int:
        return 1

    @app.task
    def then(x: int) -> int:
        runs.append(x)
        return x

    class Forget:
        @hookimpl
        def qtasks_task_succeeded(self, record: TaskRecord) -> None:
            if record.task_name == "one":
                storage.gone.add(record.uuid)

    app.add_plugin(Forget())
    try:
        async with app:
            wf = await app.run_workflow(chain(one.s(), then.s()))
            done = await wf.wait_result(timeout=5)
            step = await app.get(wf.members[1])
    finally:
        await app.aclose()
    assert runs == []
    assert step is not None and step.status is TaskStatus.ERROR and step.attempt == 1
    assert step.error is not None and step.error.startswith("WorkflowInputError")
    assert wf.members[0] in step.error and "gone" in step.error
    assert done.status == "error"


class CountingStorage(MemoryStorage):
    """Counts the reads of each record through ``get_many`` (how a step's input is read)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: dict[str, int] = {}

    async def get_many(self, uuids: Any) -> list[TaskRecord | None]:
        for uuid in uuids:
            self.reads[uuid] = self.reads.get(uuid, 0) + 1
        return await super().get_many(uuids)


async def test_a_step_keyed_by_its_input_reads_it_once() -> None:
    """A step with a concurrency key and an input: the worker reads the input for the key,
    and the task gets that value, not a second read of the previous step's result."""
    storage = CountingStorage()
    app = AsyncQueueTasks(storage=storage)
    keys: list[Any] = []

    @app.task
    def one() -> list[int]:
        return [1, 2]

    def key(items: list[int]) -> str:
        keys.append(items)
        return str(sum(items))

    @app.task(max_concurrency=1, concurrency_key=key)
    def then(items: list[int]) -> int:
        return sum(items)

    try:
        async with app:
            wf = await app.run_workflow(chain(one.s(), then.s()))
            done = await wf.wait_result(timeout=5)
    finally:
        await app.aclose()
    assert done.status == "success" and done.result == 3
    assert keys == [[1, 2]]
    assert storage.reads[wf.members[0]] == 1, storage.reads


async def test_the_state_of_a_workflow_whose_members_expired_since_it_ended_is_read() -> None:
    """Members' records expire ``result_ttl`` after their workflow ended: reading the state of
    a workflow that succeeded after that gives it without its result, saying why (before,
    ``get_workflow``, ``wait_result`` and ``qtasks workflow ID`` raised WorkflowInputError,
    which called the workflow id a workflow step)."""
    storage = ForgetfulStorage()
    app = AsyncQueueTasks(storage=storage)

    @app.task
    def double(x: int) -> int:
        return 2 * x

    try:
        async with app:
            wf = await app.run_workflow(group(double.s(1), double.s(2)))
            assert (await wf.wait_result(5)).result == [2, 4]
            storage.gone.add(wf.members[1])  # expired
            states = [await app.get_workflow(wf.id), await wf.wait_result(5)]
    finally:
        await app.aclose()
    for state in states:
        assert state is not None and (state.status, state.result) == ("success", None)
        assert state.error is not None and wf.members[1] in state.error
        assert "result_ttl" in state.error and "workflow step" not in state.error


async def test_a_chord_whose_members_end_further_apart_than_result_ttl_succeeds(
    app: AsyncQueueTasks,
) -> None:
    """A member's result is kept while its workflow runs: the chord callback reads the first
    member's, which ended longer than ``result_ttl`` before the last (before, it was gone and
    the callback failed with WorkflowInputError)."""
    ttl = 0.5
    app.config = app.config.merged(result_ttl=ttl)
    release = add_late(app)
    async with app:
        _, done = await chord_ending_late(app, release, ttl)
    assert (done.status, done.result, done.error) == ("success", 7, None)


async def test_a_member_the_claim_dead_letters_fails_the_workflow_in_memory() -> None:
    """As on Redis (CLAIM_BEGIN_WF): every delivery of a member was lost (its worker killed
    each time: here never settled), the claim that dead-letters it ends its record and fails
    its workflow, publishing the error callback (before, the record ended but the workflow
    stayed running for ever)."""
    app = AsyncQueueTasks(config=QueueConfig(max_deliveries=2, lease=0.3))

    @app.task
    def double(x: int) -> int:
        return 2 * x

    @app.task
    def on_error(workflow: str) -> str:
        return workflow

    await app.start()
    try:
        wf = await app.run_workflow(chain(double.s(1), double.s()), on_error=on_error.s())
        broker = app.broker
        assert isinstance(broker, MemoryBroker)
        published: list[str] = []
        opened = broker.consume_begun(
            prefetch=1,
            storage=app.storage,
            worker="gone",
            starts=lambda: 1,
            published=published.extend,
        )
        seen: list[str] = []
        async with opened as deliveries:
            with anyio.fail_after(5):
                async for delivery in deliveries:  # never settled: each lease runs out
                    seen.append(delivery.id)
                    if len(seen) == 3:
                        break
        state = await app.get_workflow(wf.id)
        assert state is not None and state.status == "error" and state.error is not None
        assert wf.members[0] in state.error and "dead-lettered" in state.error
        # Two deliveries of the member, then the error callback its dead-lettering published.
        assert seen == [wf.members[0], wf.members[0], state.on_error]
        assert published == [state.on_error]
        later = await app.get(wf.members[1])
        assert later is not None and later.status is TaskStatus.CANCEL
    finally:
        await app.aclose()


async def test_an_expired_workflow_leaves_no_state_in_memory() -> None:
    """The in-memory store keeps an ended workflow's gates while its record is stored (the
    member that opened a gate may ask again); once the record expires they go with it (before,
    they stayed until something listed workflows)."""
    app = AsyncQueueTasks(config=QueueConfig(result_ttl=0.2, max_tasks_process=4))

    @app.task
    def double(x: int) -> int:
        return 2 * x

    async with app:
        ids = []
        for i in range(5):
            wf = await app.run_workflow(chain(double.s(i), double.s()))
            await wf.wait_result(5)
            ids.append(wf.id)
        with anyio.fail_after(5):
            while any([await app.get(uuid) for uuid in ids]):  # noqa: ASYNC110 - expiry is read-driven
                await anyio.sleep(0.05)
        storage = app.storage
        assert isinstance(storage, MemoryStorage)
        kept = storage._workflows._flows  # the store's own state: what would leak
        assert not set(ids) & set(kept)


async def test_a_member_the_broker_dead_letters_itself_fails_its_workflow() -> None:
    """Every delivery of a workflow's first member is lost (its worker killed each time:
    here the raw consumer's leases run out) on a broker that shares no server with the
    storage, as RabbitMQ: the broker dead-letters it at the next claim and tells the worker
    (``BuryNotice``), which ends the record ``error`` and fails the workflow, instead of
    leaving both ``process``/``running`` for ever."""
    broker = PlainBroker()
    config = QueueConfig(max_deliveries=2, lease=0.3, shutdown_grace=1.0)
    app = AsyncQueueTasks(broker=broker, config=config)

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    await app.start()
    try:
        flow = await app.run_workflow(chain(add.s(1, 2), add.s(3)))
        first = flow.members[0]
        async with broker.consume(prefetch=1) as raw:
            for attempt in (1, 2):  # the second comes once the first's lease ran out
                with anyio.fail_after(5):
                    lost = await anext(raw)
                assert (lost.id, lost.attempt) == (first, attempt)
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.serve)
            done = await flow.wait_result(timeout=10)
            app.stop()
        assert done.status == "error"
        assert done.error is not None and "dead-lettered" in done.error, done.error
        record = await app.get(first)
        assert record is not None and record.status is TaskStatus.ERROR
        [letter] = await app.dead_letters()
        assert record.error == f"dead-lettered: {letter.reason}"
        second = await app.get(flow.members[1])
        assert second is not None and second.status is not TaskStatus.SUCCESS
    finally:
        await app.aclose()


@pytest.mark.parametrize(
    "positions",
    [
        list(range(MIN_RUN)),  # a group of signatures
        list(range(3, 3 + 2 * MIN_RUN, 2)),  # the last steps of a group of chains of 2
        [7, *range(MIN_RUN + 20), 5, 5, *range(200, 100, -1), *range(300, 300 + 3 * MIN_RUN, 3)],
        [0, 2, *range(3, MIN_RUN + 3)],  # a run that starts after a different step
        list(range(MIN_RUN - 1)),  # too short: named one by one
    ],
)
def test_an_input_spec_compacts_to_ranges_and_expands_back(positions: list[int]) -> None:
    members = [f"m{i}" for i in range(500)]
    index = {uuid: i for i, uuid in enumerate(members)}
    spec = [members[i] for i in positions]
    nested: list[Any] = [members[0], spec, [spec, members[1]]]
    for value in (spec, nested):
        packed = compact(value, index)
        assert _expand(packed, members) == value
    assert (len(str(compact(spec, index))) < len(str(spec))) == (len(spec) >= MIN_RUN)


def test_signature_set_refuses_an_unknown_option_naming_the_known_ones() -> None:
    # A Celery user's .set(countdown=5) raised a bare TypeError.
    app = AsyncQueueTasks("t")

    @app.task
    async def f(x: int) -> int:
        return x

    with pytest.raises(TaskDeclarationError, match=r"'countdown' \(Celery's countdown is delay"):
        f.s(1).set(countdown=5)
    with pytest.raises(TaskDeclarationError, match="unknown option 'foo'; its options are"):
        f.s(1).set(foo=1)
    assert f.s(1).set(immutable=True) == f.si(1)


class SharedLikeBroker(MemoryBroker):
    """Stands for a broker shared with other processes (RabbitMQ's): a worker elsewhere
    would record what it runs in its own storage."""

    local = False


async def test_waiting_for_a_workflow_whose_records_stay_here_is_refused_at_once() -> None:
    app = AsyncQueueTasks(broker=SharedLikeBroker())  # no storage=: records in this process

    @app.task
    def one() -> int:
        return 1

    try:
        wf = await app.run_workflow(one.s())
        with anyio.fail_after(1), pytest.raises(ConfigError, match="waiting for workflow"):
            await wf.wait_result(timeout=30)
    finally:
        await app.aclose()


async def test_an_argument_error_names_the_workflow_member() -> None:
    app = make_app()
    add, double, total = app.tasks["add"], app.tasks["double"], app.tasks["total"]
    try:
        flow = chain(add.s(1, 2), double.s(), group(double.s(), add.s(5, 6)), total.s())
        with pytest.raises(TaskArgumentsError) as raised:
            await app.run_workflow(flow)
        assert str(raised.value).startswith(
            "workflow member 3 add.s(5, 6); the previous step's result comes first: "
            "task 'add': too many positional arguments"
        )
        error = r"^on_error double\.s\(x=1\); the workflow id comes first: task 'double'"
        with pytest.raises(TaskArgumentsError, match=error):
            await app.run_workflow(add.s(1, 2), on_error=double.s(x=1))
        assert await app.storage.workflows(10) == []  # type: ignore[attr-defined]
    finally:
        await app.aclose()


def test_celerys_apply_async_and_delay_of_a_canvas_point_to_run_workflow() -> None:
    app = make_app()
    add, total = app.tasks["add"], app.tasks["total"]
    canvases: list[Chain | Group | Chord] = [
        chain(add.s(1, 2), add.s(3)),
        group(add.s(1, 2)),
        chord([add.s(1, 2)], total.s()),
    ]
    for canvas in canvases:
        for call in (canvas.apply_async, canvas.delay):
            with pytest.raises(WorkflowError, match=r"runs with app\.run_workflow\(flow\)"):
                call()
    with pytest.raises(WorkflowError, match=r"^add\.s\(\.\.\.\)\.apply_async\(\): a workflow"):
        add.s(1, 2).apply_async(countdown=5)
    # Not "'NoneType' object is not callable": the delay option is kept as delay_seconds.
    with pytest.raises(WorkflowError, match=r"^add\.s\(\.\.\.\)\.delay\(\): a workflow"):
        add.s(1, 2).delay()
    with pytest.raises(WorkflowError, match=r"^add\.s\(\.\.\.\)\.delay\(\): a workflow"):
        add.s(1, 2).set(delay=5).delay(3)
    assert add.s(1, 2).set(delay=5).delay_seconds == 5
    assert app.signature("add", (1, 2), delay=2.5).delay_seconds == 2.5
