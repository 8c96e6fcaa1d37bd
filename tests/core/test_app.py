"""The async app end to end with an in-process worker and the in-memory components."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, TaskRecord, TaskStatus, TaskTimeoutError, hookimpl
from qtasks.errors import (
    MessageTooLargeError,
    QTasksError,
    SerializationError,
    TaskArgumentsError,
    TaskNotFoundError,
)
from qtasks.worker import QueueWorker
from qtasks.workflows import chain

pytestmark = pytest.mark.anyio


@pytest.fixture
async def app() -> AsyncIterator[AsyncQueueTasks]:
    app = AsyncQueueTasks(config=QueueConfig(max_tasks_process=4, lease=2.0, shutdown_grace=2.0))
    yield app
    await app.aclose()


async def test_add_task_returns_new_record_then_result(app: AsyncQueueTasks) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    task = await add.add_task(2, 3)
    assert task.status is TaskStatus.NEW
    assert (task.task_name, task.args, task.kwargs) == ("add", [2, 3], {})
    stored = await app.get(task.uuid)
    assert stored is not None and stored.status is TaskStatus.NEW
    async with app:
        done = await task.wait_result(timeout=5)
    assert done.status is TaskStatus.SUCCESS
    assert done.returning == 5
    assert done.attempt == 1
    assert done.updated_at >= done.created_at


async def test_task_ids_are_uuid4_hex_and_records_serialize_without_the_client(
    app: AsyncQueueTasks,
) -> None:
    @app.task
    async def job() -> None:
        return None

    tasks = [await job.add_task() for _ in range(200)]
    ids = {task.uuid for task in tasks}
    assert len(ids) == 200
    for task_id in ids:
        parsed = uuid.UUID(hex=task_id)
        assert (parsed.hex, parsed.version, parsed.variant) == (task_id, 4, uuid.RFC_4122)
    data = tasks[0].to_dict()  # a bound task: its client is not a field of the record
    assert "_client" not in data and data["status"] == "new"
    assert TaskRecord.from_dict(data).uuid == tasks[0].uuid


async def test_timeout_raises_and_never_returns_none(app: AsyncQueueTasks) -> None:
    @app.task
    async def slow() -> None: ...

    # No worker runs, so the task cannot finish.
    with pytest.raises(TaskTimeoutError) as info:
        await app.add_task("slow", timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, QTasksError)


async def test_wait_for_unknown_uuid(app: AsyncQueueTasks) -> None:
    with pytest.raises(TaskNotFoundError):
        await app.wait("nope", timeout=1)
    assert await app.get("nope") is None


async def test_timeout_waits_for_the_result(app: AsyncQueueTasks) -> None:
    @app.task
    def mul(a: int, b: int) -> int:
        return a * b

    async with app:
        record = await app.add_task("mul", 6, 7, timeout=5)
    assert record.status is TaskStatus.SUCCESS and record.returning == 42


async def test_task_with_reserved_parameter_names(app: AsyncQueueTasks) -> None:
    @app.task
    async def schedule(priority: str, timeout: int) -> str:
        return f"{priority}/{timeout}"

    async with app:
        task = await schedule.enqueue(kwargs={"priority": "high", "timeout": 3}, timeout=5)
        other = await app.enqueue("schedule", ["low", 1], timeout=5)
    assert task.returning == "high/3"
    assert other.returning == "low/1"


async def test_sync_task_runs_in_a_thread_and_does_not_block_the_loop(
    app: AsyncQueueTasks,
) -> None:
    release = threading.Event()

    @app.task
    def blocking() -> str:
        assert release.wait(5), "never released"
        return threading.current_thread().name

    @app.task
    async def quick() -> str:
        release.set()
        return "ok"

    async with app:
        slow = await app.add_task("blocking")
        # The blocking task holds a thread; an async task still runs and releases it.
        assert (await app.add_task("quick", timeout=5)).returning == "ok"
        done = await slow.wait_result(5)
    assert done.status is TaskStatus.SUCCESS
    assert done.returning != threading.main_thread().name


async def test_priority_order_lower_first_fifo_within() -> None:
    app = AsyncQueueTasks(config=QueueConfig(max_tasks_process=1, prefetch=0))
    order: list[str] = []

    @app.task
    async def record(label: str) -> None:
        order.append(label)

    for label, priority in [("c1", 5), ("a1", 1), ("b1", 3), ("a2", 1), ("c2", 5), ("b2", 3)]:
        await app.add_task("record", label, priority=priority)
    last = await app.add_task("record", "z", priority=9)
    async with app:
        await last.wait_result(5)
    await app.aclose()
    assert order == ["a1", "a2", "b1", "b2", "c1", "c2", "z"]


async def test_task_default_priority_applies() -> None:
    app = AsyncQueueTasks(config=QueueConfig(max_tasks_process=1, prefetch=0))
    order: list[str] = []

    @app.task(priority=9)
    async def low() -> None:
        order.append("low")

    @app.task(priority=0)
    async def high() -> None:
        order.append("high")

    first = await app.add_task("low")
    second = await app.add_task("high")
    assert (first.priority, second.priority) == (9, 0)
    async with app:
        await first.wait_result(5)
        await second.wait_result(5)
    await app.aclose()
    assert order == ["high", "low"]  # enqueued second, ran first


async def test_delayed_task_waits_for_its_eta(app: AsyncQueueTasks) -> None:
    ran_at: list[float] = []

    @app.task
    async def later() -> None:
        ran_at.append(time.time())

    async with app:
        start = time.time()
        task = await app.add_task("later", delay=0.3)
        assert (await app.get(task.uuid)).status is TaskStatus.NEW  # type: ignore[union-attr]
        await task.wait_result(5)
    assert ran_at and ran_at[0] >= start + 0.3


async def test_absolute_eta(app: AsyncQueueTasks) -> None:
    @app.task
    async def at() -> float:
        return time.time()

    async with app:
        eta = time.time() + 0.2
        done = await app.add_task("at", eta=eta, timeout=5)
    assert done.returning >= eta


async def test_cancel_queued_task_never_runs(app: AsyncQueueTasks) -> None:
    ran: list[int] = []

    @app.task
    async def job() -> None:
        ran.append(1)

    task = await app.add_task("job")
    cancelled = await app.cancel(task.uuid, "not needed")
    assert cancelled is not None and cancelled.status is TaskStatus.CANCEL
    marker = await app.add_task("job")
    async with app:
        await marker.wait_result(5)
        final = await task.wait_result(1)
    assert final.status is TaskStatus.CANCEL and final.cancel_reason == "not needed"
    assert ran == [1]  # only the marker ran


async def test_cancel_running_async_task(app: AsyncQueueTasks) -> None:
    started = anyio.Event()

    @app.task
    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    async with app:
        task = await app.add_task("forever")
        with anyio.fail_after(5):
            await started.wait()
        await app.cancel(task.uuid, "stop it")
        final = await task.wait_result(5)
    assert final.status is TaskStatus.CANCEL
    assert final.cancel_reason == "stop it"


async def test_runner_serves_normally_after_a_cancel() -> None:
    # One runner: the tasks after a cancelled one run in a fresh cancel scope, so their awaits
    # are not cancelled too, also after a task that swallowed its cancellation.
    app = AsyncQueueTasks(config=QueueConfig(max_tasks_process=1, lease=2.0))
    started = anyio.Event()
    stubborn_started = anyio.Event()
    swallowed = anyio.Event()

    @app.task
    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    @app.task
    async def stubborn() -> str:
        stubborn_started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            swallowed.set()  # swallows the cancellation and returns
        return "ignored the cancel"

    @app.task
    async def sleeper(n: int) -> int:
        await anyio.sleep(0.001)
        await anyio.lowlevel.checkpoint()
        return n

    async with app:
        first = await app.add_task("forever")
        with anyio.fail_after(5):
            await started.wait()
        await app.cancel(first.uuid, "stop it")
        assert (await first.wait_result(5)).status is TaskStatus.CANCEL
        after = [await app.add_task("sleeper", i) for i in range(3)]
        for i, task in enumerate(after):
            final = await task.wait_result(5)
            assert (final.status, final.returning) == (TaskStatus.SUCCESS, i)
        second = await app.add_task("stubborn")
        with anyio.fail_after(5):
            await stubborn_started.wait()
        await app.cancel(second.uuid, "please")
        with anyio.fail_after(5):
            await swallowed.wait()
        last = await app.add_task("sleeper", 7, timeout=5)
        assert (last.status, last.returning) == (TaskStatus.SUCCESS, 7)
    await app.aclose()


async def test_cancel_between_begin_and_start_never_runs_the_code() -> None:
    app = AsyncQueueTasks(config=QueueConfig(max_tasks_process=1, plugins_disabled=["*"]))
    ran: list[str] = []

    class CancelOnBefore:
        @hookimpl
        def qtasks_worker_execute_before(self, app: Any, record: Any) -> None:
            assert app.worker.cancel_local(record.uuid, "changed my mind")

    app.hooks.register(CancelOnBefore())

    @app.task
    async def job() -> None:
        ran.append("job")

    async with app:
        final = await app.add_task("job", timeout=5)
    assert (final.status, final.cancel_reason) == (TaskStatus.CANCEL, "changed my mind")
    assert ran == []
    await app.aclose()


async def test_hooks_of_a_plugin_added_while_serving_fire_from_then_on() -> None:
    # Unimplemented hooks are skipped before their arguments are built (Hooks.active): adding
    # a plugin later must switch its hooks on. (Entry-point plugins off: the dev environment's
    # test plugin implements qtasks_task_succeeded.)
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    seen: list[str] = []

    class Late:
        @hookimpl
        def qtasks_task_succeeded(self, record: Any) -> None:
            seen.append(f"succeeded {record.returning}")

        @hookimpl
        def qtasks_executor_result(self, result: Any) -> Any:
            return result + 100

    @app.task
    async def one(n: int) -> int:
        return n

    async with app:
        assert (await one.add_task(1, timeout=5)).returning == 1
        assert "qtasks_task_succeeded" not in app.hooks.active
        app.add_plugin(Late())
        assert {"qtasks_task_succeeded", "qtasks_executor_result"} <= app.hooks.active
        assert (await one.add_task(2, timeout=5)).returning == 102
    assert seen == ["succeeded 102"]
    await app.aclose()


async def test_max_time_async_task(app: AsyncQueueTasks) -> None:
    cancelled = anyio.Event()

    @app.task(max_time=0.1)
    async def too_long() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async with app:
        final = await app.add_task("too_long", timeout=5)
    assert final.status is TaskStatus.ERROR
    assert "max_time" in (final.error or "")
    assert cancelled.is_set()


async def test_max_time_sync_task_record_says_error_at_deadline(app: AsyncQueueTasks) -> None:
    release = threading.Event()

    @app.task(max_time=0.1)
    def stuck() -> None:
        release.wait(5)

    async with app:
        start = time.monotonic()
        final = await app.add_task("stuck", timeout=5)
        elapsed = time.monotonic() - start
        release.set()
    assert final.status is TaskStatus.ERROR and "max_time" in (final.error or "")
    assert elapsed < 4  # recorded at the deadline, not when the thread ended


async def test_retry_until_success_keeps_attempts(app: AsyncQueueTasks) -> None:
    calls: list[int] = []

    @app.task(retry=2, retry_backoff=0)
    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError(f"boom {len(calls)}")
        return "ok"

    async with app:
        final = await app.add_task("flaky", timeout=5)
    assert final.status is TaskStatus.SUCCESS and final.returning == "ok"
    assert final.attempt == 3 and len(calls) == 3


async def test_retry_exhausted_keeps_last_traceback(app: AsyncQueueTasks) -> None:
    @app.task(retry=1, retry_backoff=0)
    async def broken() -> None:
        raise ValueError("always")

    async with app:
        final = await app.add_task("broken", timeout=5)
    assert final.status is TaskStatus.ERROR
    assert final.attempt == 2
    assert "ValueError: always" in (final.traceback or "")


async def test_retry_on_exc_matches_subclasses_only(app: AsyncQueueTasks) -> None:
    calls: dict[str, int] = {"sub": 0, "other": 0}

    @app.task(retry=1, retry_on_exc=[OSError], retry_backoff=0)
    async def sub() -> None:
        calls["sub"] += 1
        raise ConnectionResetError("subclass of OSError")

    @app.task(retry=3, retry_on_exc=OSError, retry_backoff=0)
    async def other() -> None:
        calls["other"] += 1
        raise KeyError("not an OSError")

    async with app:
        a = await app.add_task("sub", timeout=5)
        b = await app.add_task("other", timeout=5)
    assert (a.status, calls["sub"]) == (TaskStatus.ERROR, 2)
    assert (b.status, calls["other"]) == (TaskStatus.ERROR, 1)


async def test_retry_on_exc_matches_a_task_groups_exception_group(app: AsyncQueueTasks) -> None:
    """A ``ConnectionError`` raised in a task group's child reaches the task's caller as
    ``ExceptionGroup([ConnectionError])``, which ``retry_on_exc=[ConnectionError]`` did not
    match: an async task using a task group was never retried (walk-through). A group is
    retried when every exception in it matches, as ``except*`` would handle it all; one
    with another error in it is not."""
    calls: dict[str, int] = {"all": 0, "mixed": 0}

    async def fail(key: str, exc: Exception) -> None:
        calls[key] += 1
        raise exc

    @app.task(retry=2, retry_on_exc=[OSError], retry_backoff=0)
    async def all_match() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(fail, "all", ConnectionError("flaky"))

    @app.task(retry=2, retry_on_exc=[OSError], retry_backoff=0)
    async def mixed() -> None:
        raise ExceptionGroup("two", [ConnectionError("flaky"), KeyError("a bug")])

    async with app:
        retried = await app.add_task("all_match", timeout=5)
        kept = await app.add_task("mixed", timeout=5)
    assert (retried.status, retried.attempt, calls["all"]) == (TaskStatus.ERROR, 3, 3)
    assert (kept.status, kept.attempt) == (TaskStatus.ERROR, 1)


async def test_retry_backoff_goes_through_delayed_delivery(app: AsyncQueueTasks) -> None:
    times: list[float] = []

    @app.task(retry=1, retry_backoff=0.2)
    async def again() -> None:
        times.append(time.monotonic())
        if len(times) == 1:
            raise RuntimeError("first")

    retried: list[tuple[str, float]] = []

    class SeeRetry:
        @hookimpl
        async def qtasks_worker_task_retry(
            self, app: AsyncQueueTasks, record: Any, delay: float
        ) -> None:
            stored = await app.get(record.uuid)
            retried.append((stored.status.value if stored else "?", delay))

    app.add_plugin(SeeRetry())
    async with app:
        final = await app.add_task("again", timeout=5)
    assert final.status is TaskStatus.SUCCESS
    assert retried[0][0] == "retry"  # the record said retry while it waited
    assert 0.1 <= retried[0][1] <= 0.2
    # equal jitter: between half and all of the 0.2 s base delay
    assert times[1] - times[0] >= 0.1


async def test_generators_send_handler_results_back(app: AsyncQueueTasks) -> None:
    seen: list[Any] = []

    async def handler(value: int) -> int:
        return value * 10

    @app.task(generate_handler=handler)
    def sync_gen():  # type: ignore[no-untyped-def]
        step = yield 1
        seen.append(step)
        step = yield 2
        seen.append(step)
        return "final"

    @app.task(generate_handler=lambda v: v + 1)
    async def async_gen():  # type: ignore[no-untyped-def]
        step = yield 1
        seen.append(step)
        yield step

    async with app:
        a = await app.add_task("sync_gen", timeout=5)
        b = await app.add_task("async_gen", timeout=5)
        steps = [s async for s in b.stream(timeout=5)]
    assert a.returning == "final"
    assert b.returning == [2, 3]
    assert seen == [10, 20, 2]
    assert steps == [2, 3]


async def test_sync_generator_without_return_gives_handler_results(app: AsyncQueueTasks) -> None:
    @app.task
    def gen(n: int):  # type: ignore[no-untyped-def]
        yield from range(n)

    async with app:
        done = await app.add_task("gen", 3, timeout=5)
    assert done.returning == [0, 1, 2]


async def test_decode_encodes_result(app: AsyncQueueTasks) -> None:
    @app.task(decode=lambda r: {"wrapped": sorted(r)})
    async def as_set() -> set[int]:
        return {3, 1, 2}

    async with app:
        done = await app.add_task("as_set", timeout=5)
    assert done.returning == {"wrapped": [1, 2, 3]}


async def test_unserializable_result_is_a_clear_error(app: AsyncQueueTasks) -> None:
    @app.task
    async def returns_object() -> object:
        return object()

    @app.task
    async def fine() -> int:
        return 1

    async with app:
        bad = await app.add_task("returns_object", timeout=5)
        good = await app.add_task("fine", timeout=5)
    assert bad.status is TaskStatus.ERROR
    assert "cannot be stored" in (bad.error or "")
    assert good.returning == 1


async def test_unserializable_arguments_fail_before_sending(app: AsyncQueueTasks) -> None:
    @app.task
    async def takes(x: object) -> None: ...

    with pytest.raises(SerializationError):
        await app.add_task("takes", object())
    stats = await app.broker.stats()
    assert sum(stats.ready_by_priority.values()) == 0
    assert await app.storage.stats() == {}


async def test_wrong_arguments_for_a_known_task_fail_in_add_task(app: AsyncQueueTasks) -> None:
    @app.task
    async def two(a: int, b: int) -> None: ...

    with pytest.raises(TaskArgumentsError, match="two"):
        await app.add_task("two", 1)


async def test_oversized_payload_is_refused() -> None:
    app = AsyncQueueTasks(config=QueueConfig(max_message_size=1000))

    @app.task
    async def big(data: str) -> None: ...

    @app.task
    async def first() -> str:
        return "x"

    with pytest.raises(MessageTooLargeError, match="task 'big': encoded message is 2"):
        await app.add_task("big", "x" * 2000)
    # Of a workflow, the error names the member that does not fit.
    with pytest.raises(MessageTooLargeError, match="task 'big'") as caught:
        await app.run_workflow(chain(first.s(), big.si("x" * 2000)))
    assert caught.value.task == "big" and caught.value.limit == 1000
    await app.aclose()


async def test_worker_survives_failures_and_keeps_serving(app: AsyncQueueTasks) -> None:
    @app.task
    async def fails(i: int) -> None:
        raise RuntimeError(f"task {i}")

    @app.task
    async def ok(i: int) -> int:
        return i

    async with app:
        failed = [await app.add_task("fails", i) for i in range(20)]
        results = [await app.add_task("ok", i, timeout=5) for i in range(5)]
        finals = [await t.wait_result(5) for t in failed]
    assert {f.status for f in finals} == {TaskStatus.ERROR}
    assert [r.returning for r in results] == list(range(5))


class Holding:
    """An app (concurrency 1, prefetch 5) whose task ``hold`` runs until :attr:`release` is
    set, and ``queued`` tasks that wait behind it in the worker; its components are started on
    :attr:`stack` too, so they can be inspected after the app stops."""

    def __init__(self) -> None:
        self.app = AsyncQueueTasks(
            config=QueueConfig(
                max_tasks_process=1, prefetch=5, shutdown_grace=5, plugins_disabled=["*"]
            )
        )
        self.started, self.release = anyio.Event(), anyio.Event()
        self.stack = AsyncExitStack()

        @self.app.task
        async def hold() -> str:
            self.started.set()
            await self.release.wait()
            return "done"

        @self.app.task
        async def queued(i: int) -> int:
            return i

    async def inspectable(self) -> None:
        await self.app.broker.start(self.stack, self.app.config)
        await self.app.storage.start(self.stack, self.app.config)

    async def hold_one(self) -> TaskRecord:
        """``hold`` enqueued and running."""
        running = await self.app.add_task("hold")
        with anyio.fail_after(5):
            await self.started.wait()
        return running


async def test_graceful_shutdown_finishes_running_and_hands_back_waiting() -> None:
    held = Holding()
    broker_app = held.app
    # Keep the components started past the app's own stop, to inspect them afterwards.
    await held.inspectable()
    async with broker_app:
        running = await held.hold_one()
        waiting = [await broker_app.add_task("queued", i) for i in range(3)]
        # stop while one runs and three wait locally
        broker_app.worker.stop()
        held.release.set()
    final = await broker_app.storage.get(running.uuid)
    assert final is not None and final.status is TaskStatus.SUCCESS
    stats = await broker_app.broker.stats()
    # the waiting ones went back to the broker, not lost and not run
    assert sum(stats.ready_by_priority.values()) == 3
    for task in waiting:
        record = await broker_app.storage.get(task.uuid)
        assert record is not None and record.status is TaskStatus.NEW
    await held.stack.aclose()


async def test_a_hand_back_that_fails_at_shutdown_leaves_running_tasks_their_grace(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker cannot take a waiting message back as the worker stops (a Redis requeue
    gives up at the lease's end): the message is left to its lease, and the running task
    still finishes in its grace period and is stored (before, the error ended the shutdown
    at once: the running task was cancelled, the worker raised)."""
    from qtasks.memory import broker as memory_broker

    held = Holding()
    app = held.app

    async def requeue(self: Any, *, delay: float | None = None, body: bytes | None = None) -> bool:
        raise ConnectionError("broker down")

    await held.inspectable()
    async with app:
        running = await held.hold_one()
        waiting = await app.add_task("queued", 1)  # waits in the worker's local queue
        monkeypatch.setattr(memory_broker.MemoryDelivery, "requeue", requeue)
        app.worker.stop()
        held.release.set()
    final = await app.storage.get(running.uuid)
    assert final is not None and final.status is TaskStatus.SUCCESS
    left = await app.storage.get(waiting.uuid)
    assert left is not None and left.status is TaskStatus.NEW  # not run: back after its lease
    assert "could not hand message" in caplog.text
    await held.stack.aclose()


async def test_a_task_whose_begin_ends_after_stop_is_handed_back_not_started() -> None:
    """The worker is told to stop while a runner is beginning its next task: that task does
    not start (before, it started during the shutdown and was then cancelled without its
    teardown, grace or hooks): it is handed back as the waiting ones are, its message back
    in the queue."""
    app = AsyncQueueTasks(
        config=QueueConfig(
            plugins_disabled=["*"], shutdown_grace=2.0, max_tasks_process=1, prefetch=1
        )
    )
    events: list[str] = []

    class StopOnSecond:
        """Stops the worker as the second message is received (its begin still to come)."""

        received = 0

        @hookimpl
        def qtasks_broker_message_received(self) -> None:
            StopOnSecond.received += 1
            if StopOnSecond.received == 2:
                events.append("stop")
                app.worker.stop()

    app.add_plugin(StopOnSecond())

    @app.task
    async def work(n: int) -> int:
        events.append(f"code {n}")
        return n

    inspect_stack = AsyncExitStack()
    await app.broker.start(inspect_stack, app.config)
    await app.storage.start(inspect_stack, app.config)
    async with app:
        first = await work.add_task(1, timeout=5)
        second = await work.add_task(2)
        with anyio.fail_after(5):
            while "stop" not in events:  # noqa: ASYNC110 - a hook's record
                await anyio.sleep(0.01)
    assert first.status is TaskStatus.SUCCESS
    assert events == ["code 1", "stop"]  # task 2 never started
    record = await app.storage.get(second.uuid)
    assert record is not None and not record.status.final
    stats = await app.broker.stats()
    assert sum(stats.ready_by_priority.values()) == 1  # back in the queue, not lost
    await inspect_stack.aclose()


async def test_unset_prefetch_is_a_fifth_of_the_concurrency() -> None:
    """Held once the worker's runs are seen to be short (qtasks.hold): a few quick runs first,
    then tasks that run until released."""
    worker = QueueWorker()
    app = AsyncQueueTasks(
        config=QueueConfig(max_tasks_process=60, plugins_disabled=["*"]), worker=worker
    )
    release, all_started = anyio.Event(), anyio.Event()
    started: list[int] = []

    @app.task
    async def quick() -> None:
        pass

    @app.task
    async def hold(i: int) -> None:
        started.append(i)
        if len(started) == 60:
            all_started.set()
        await release.wait()

    async def until(done: Callable[[], bool]) -> None:
        with anyio.fail_after(5):
            while not done():
                await anyio.lowlevel.checkpoint()

    async with app:
        for _ in range(3):
            await app.add_task("quick", timeout=5)
        await until(lambda: worker._hold.now == 12)
        for i in range(100):
            await app.add_task("hold", i)
        with anyio.fail_after(5):
            await all_started.wait()
        # 60 running and 12 (60 // 5) waiting; the other 28 stay with the broker.
        await until(lambda: app.worker.waiting == 12)
        assert app.worker.running == 60
        stats = await app.broker.stats()
        assert (stats.in_flight, sum(stats.ready_by_priority.values())) == (72, 28)
        release.set()


async def test_a_worker_serving_more_than_the_config_says_gets_threads_for_all() -> None:
    """The app's thread limiter is sized from its config when the app is made; a worker with
    a higher max_tasks_process of its own runs that many sync tasks at once, not fewer."""
    app = AsyncQueueTasks(
        config=QueueConfig(max_tasks_process=1, prefetch=0),
        worker=QueueWorker(max_tasks_process=3),
    )
    barrier = threading.Barrier(3, timeout=5)

    @app.task
    def meet() -> int:
        return barrier.wait()  # each of the three returns once all three are in

    async with app:
        tasks = [await app.add_task("meet") for _ in range(3)]
        done = [await app.wait(t.uuid, timeout=10) for t in tasks]
    assert [d.status for d in done] == [TaskStatus.SUCCESS] * 3
    assert sorted(d.returning for d in done) == [0, 1, 2]
    assert app.thread_limiter.total_tokens == 3
