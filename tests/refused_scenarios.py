"""A final record the storage refuses for what it holds (a result or an error over its size
limit), run on the in-memory storage (a limit of its own) and on Redis (``proto-max-bulk-len``),
settled in one batched call with other tasks or by each task's runner."""

from __future__ import annotations

import re
from typing import Protocol

import anyio

from qtasks import AsyncQueueTasks, TaskRecord, TaskStatus, hookimpl


class ClosedCounter:
    """Sets ``all_closed`` once ``expected`` tasks reached ``qtasks_executor_closed``, the
    last hook before the runner hands the task to the settler (without yielding)."""

    name = "closed-counter"

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.all_closed = anyio.Event()

    @hookimpl
    def qtasks_executor_closed(self) -> None:
        self.expected -= 1
        if self.expected == 0:
            self.all_closed.set()


class HeldBroker(Protocol):
    """A broker whose batched settle calls wait for ``gate`` when it is set, and are
    recorded (the uuids of each call's finals in ``batches``)."""

    gate: anyio.Event | None
    entered: anyio.Event
    batches: list[list[str]]


class Outcomes:
    """Records the hooks that end a task, and ``qtasks_executor_error``: ``(hook, uuid, the
    exception's class name)``."""

    name = "outcomes"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []

    @hookimpl
    def qtasks_executor_error(self, record: TaskRecord, exc: BaseException) -> None:
        self.calls.append(("error", record.uuid, type(exc).__name__))

    @hookimpl
    def qtasks_task_succeeded(self, record: TaskRecord) -> None:
        self.calls.append(("succeeded", record.uuid, None))

    @hookimpl
    def qtasks_task_failed(self, record: TaskRecord, exc: BaseException) -> None:
        self.calls.append(("failed", record.uuid, type(exc).__name__))

    @hookimpl
    def qtasks_worker_execute_after(self, record: TaskRecord) -> None:
        self.calls.append(("after", record.uuid, None))


async def refused_result(
    app: AsyncQueueTasks, held: HeldBroker | None, *, size: int, refusal: str
) -> None:
    """Three small tasks, one returning ``size`` characters and one raising an error of that
    size, which the storage refuses with an error matching ``refusal``. With ``held`` (the
    app's broker, settling in batches), the first settle call is held until the others ended,
    so that their results go in the next call together.

    The small ones are stored once each; the refused ones end ``error`` with the reason,
    without the result, after one run (not run again to meet the same refusal, then
    dead-lettered for "delivery limit reached"), their error hooks fired once each:
    ``qtasks_executor_error`` with what the task raised (the refused result's with the
    :class:`~qtasks.errors.UnstorableRecordError`, since its task raised nothing), not again
    for the refusal of the error record; ``qtasks_task_failed`` with the refusal."""
    outcomes, closed = Outcomes(), ClosedCounter(6)
    app.add_plugin(outcomes)
    app.add_plugin(closed)
    runs: list[str] = []

    @app.task
    async def first() -> str:
        return "first"

    @app.task
    async def big() -> str:
        runs.append("big")
        return "x" * size

    @app.task
    async def small(i: int) -> int:
        runs.append(f"small{i}")
        return i

    @app.task
    async def loud() -> None:
        runs.append("loud")
        raise ValueError("y" * size)

    async with app:
        assert (app.shared_server is not None) is (held is not None)
        gate = anyio.Event()
        if held is not None:
            held.gate = gate
        tasks = [await app.add_task("first")]
        if held is not None:
            with anyio.fail_after(10):
                await held.entered.wait()
        tasks += [await app.add_task("big"), *[await app.add_task("small", i) for i in range(3)]]
        tasks.append(await app.add_task("loud"))
        with anyio.fail_after(10):
            await closed.all_closed.wait()
        gate.set()
        done = [await app.wait(task.uuid, timeout=20) for task in tasks]
        assert await app.dead_letters() == []
        with anyio.fail_after(10):
            while (await app.broker.stats()).in_flight:  # noqa: ASYNC110 - the acks follow
                await anyio.sleep(0.02)
    await app.aclose()
    one, result, *smalls, error = done
    assert (one.status, one.returning) == (TaskStatus.SUCCESS, "first")
    assert [(s.status, s.returning) for s in smalls] == [(TaskStatus.SUCCESS, i) for i in range(3)]
    assert (result.status, result.returning, error.status) == (
        TaskStatus.ERROR,
        None,
        TaskStatus.ERROR,
    )
    stored = f"the result ({size + 2:,} bytes encoded)"
    assert re.fullmatch(
        f"UnstorableRecordError: {re.escape(stored)} could not be stored: {refusal}",
        result.error or "",
    ), result.error
    assert re.fullmatch(
        f"UnstorableRecordError: its error record could not be stored: {refusal}",
        error.error or "",
    ), error.error
    assert sorted(runs) == ["big", "loud", "small0", "small1", "small2"]  # each ran once
    if held is not None:
        assert sorted(held.batches[1]) == sorted(task.uuid for task in tasks[1:5])
    ended = {call for call in outcomes.calls if call[0] in ("succeeded", "failed")}
    assert ended == {
        ("failed", result.uuid, "UnstorableRecordError"),
        ("failed", error.uuid, "UnstorableRecordError"),
        *{("succeeded", record.uuid, None) for record in (one, *smalls)},
    }
    errors = sorted(call for call in outcomes.calls if call[0] == "error")
    assert errors == sorted(
        [("error", result.uuid, "UnstorableRecordError"), ("error", error.uuid, "ValueError")]
    )
    # Each ended once, and its after hook fired once.
    assert len(outcomes.calls) == 2 * len(tasks) + len(errors)
    after = sorted(uuid for hook, uuid, _ in outcomes.calls if hook == "after")
    assert after == sorted(task.uuid for task in tasks)


async def refused_retry(app: AsyncQueueTasks, *, size: int, refusal: str) -> None:
    """A task with retries left raising an error of ``size`` characters, whose ``retry`` record
    the storage refuses with an error matching ``refusal``: it ends ``error`` with the reason
    after one run, not retried, acked and not dead-lettered; ``qtasks_executor_error`` fired
    once, with what the task raised, and ``qtasks_task_failed`` once, with the refusal. The
    final record keeps nothing of the refused retry record (its ``eta``: due again).
    Before, the refusal was taken for a component's failure: the message was handed back, run
    again, and dead-lettered at ``max_deliveries`` ("worker failed N times")."""
    outcomes = Outcomes()
    app.add_plugin(outcomes)
    runs: list[int] = []

    @app.task(retry=2, retry_backoff=0)
    async def loud_retried() -> None:
        runs.append(1)
        raise ValueError("y" * size)

    async with app:
        task = await app.add_task("loud_retried")
        final = await app.wait(task.uuid, timeout=20)
        with anyio.fail_after(10):
            while (await app.broker.stats()).in_flight:  # noqa: ASYNC110 - the ack follows
                await anyio.sleep(0.02)
        stats = await app.broker.stats()
        assert sum(stats.ready_by_priority.values()) == stats.delayed == 0
        assert await app.dead_letters() == []
    await app.aclose()
    assert final.status is TaskStatus.ERROR
    assert re.fullmatch(
        f"UnstorableRecordError: its retry record could not be stored: {refusal}",
        final.error or "",
    ), final.error
    assert runs == [1]
    assert (final.eta, final.attempt) == (None, 1)
    assert [(hook, exc) for hook, _, exc in outcomes.calls] == [
        ("error", "ValueError"),
        ("failed", "UnstorableRecordError"),
        ("after", None),
    ]
