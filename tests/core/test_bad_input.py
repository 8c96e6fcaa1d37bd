"""Bad input reaching a worker: a clear error, nothing lost silently, the worker keeps serving."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryStorage, QueueConfig, TaskStatus, hookimpl
from qtasks.components import DeadLetter
from qtasks.errors import TaskExitError, UnknownTaskError
from qtasks.messages import Envelope, Message

pytestmark = pytest.mark.anyio


@pytest.fixture
async def apps() -> AsyncIterator[tuple[AsyncQueueTasks, AsyncQueueTasks]]:
    """A producer that knows no tasks and a worker app, sharing one broker and storage."""
    broker, storage = MemoryBroker(), MemoryStorage()
    producer = AsyncQueueTasks("producer", broker=broker, storage=storage)
    worker = AsyncQueueTasks("worker", broker=broker, storage=storage, config=QueueConfig())

    @worker.task
    async def add(a: int, b: int) -> int:
        return a + b

    worker.add_plugin(Rejections(), name="rejections")

    await producer.start()
    async with worker:
        yield producer, worker
    await producer.aclose()


class Rejections:
    """Sets an event per message id when the worker rejects (dead-letters) it."""

    def __init__(self) -> None:
        self.events: dict[str, anyio.Event] = {}

    def event(self, id: str) -> anyio.Event:
        return self.events.setdefault(id, anyio.Event())

    @hookimpl
    def qtasks_task_rejected(self, delivery: Any) -> None:
        self.event(delivery.id).set()


async def dead_letter(app: AsyncQueueTasks, id: str) -> DeadLetter:
    """Wait until the worker rejected message ``id``; return its dead letter."""
    plugin: Any = app.hooks.pm.get_plugin("rejections")
    with anyio.fail_after(5):
        await plugin.event(id).wait()
    letters = {letter.id: letter for letter in await app.broker.dead_letters()}
    return letters[id]


async def test_unknown_task_name(apps: tuple[AsyncQueueTasks, AsyncQueueTasks]) -> None:
    producer, worker = apps
    task = await producer.add_task("no_such_task", 1)
    final = await task.wait_result(5)
    assert final.status is TaskStatus.ERROR
    assert "unknown task 'no_such_task'" in (final.error or "")
    letter = await dead_letter(worker, task.uuid)
    assert "unknown task" in letter.reason
    # still serving
    assert (await producer.add_task("add", 1, 2, timeout=5)).returning == 3


async def test_an_unknown_task_close_to_one_of_the_workers_names_it(
    apps: tuple[AsyncQueueTasks, AsyncQueueTasks],
) -> None:
    """``app.add_task("ad", 2, 3)`` (a producer enqueues by name: it may not have the task)
    ended ``error`` with "unknown task 'ad': it is not registered in this app", where the CLI
    already suggested the close name: the worker's record, and ``app.signature``, now do."""
    producer, worker = apps
    task = await producer.add_task("ad", 2, 3)
    final = await task.wait_result(5)
    assert (
        final.error == "unknown task 'ad' (did you mean 'add'?): it is not registered in this app"
    )
    assert "did you mean 'add'?" in (await dead_letter(worker, task.uuid)).reason
    with pytest.raises(UnknownTaskError, match=r"^unknown task 'ad' \(did you mean 'add'\?\)"):
        worker.signature("ad", (2, 3))


async def test_wrong_arguments(apps: tuple[AsyncQueueTasks, AsyncQueueTasks]) -> None:
    producer, worker = apps
    task = await producer.add_task("add", 1, 2, 3)
    final = await task.wait_result(5)
    assert final.status is TaskStatus.ERROR
    assert "wrong arguments" in (final.error or "")
    assert "wrong arguments" in (await dead_letter(worker, task.uuid)).reason
    assert (await producer.add_task("add", 2, 2, timeout=5)).returning == 4


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe not utf8",
        b"{not json",
        b"[1, 2]",
        b'{"uuid": "x"}',
        b'{"uuid": 1, "task": 2,',
        # Deeper than any parser goes (RecursionError): it killed the in-memory worker.
        b"[" * 200_000 + b"]" * 200_000,
    ],
    ids=["not-utf8", "not-json", "a-list", "no-task", "cut", "too-deep"],
)
async def test_undecodable_message(
    apps: tuple[AsyncQueueTasks, AsyncQueueTasks], body: bytes
) -> None:
    producer, worker = apps
    await worker.broker.publish(Envelope(id="poison", body=body))
    letter = await dead_letter(worker, "poison")
    assert letter.body == body  # kept intact for an operator
    assert "undecodable message" in letter.reason
    assert (await producer.add_task("add", 1, 1, timeout=5)).returning == 2


def wire(**fields: Any) -> bytes:
    """A message body as the codec writes it, with ``fields`` replaced (a hand-made one)."""
    body = Message(uuid="hand-made", task_name="add", args=[1, 2]).to_wire()
    body.update(fields)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"created_at": "yesterday"}, "message field 'created_at' must be a finite number"),
        ({"created_at": [1]}, "message field 'created_at' must be a finite number"),
        ({"created_at": float("nan")}, "message field 'created_at' must be a finite number"),
        ({"priority": True}, "message fields 'priority'/'attempt' must be integers"),
        ({"headers": {"expires": "soon"}}, "message header 'expires' is malformed: 'soon'"),
        ({"headers": {"expires": float("inf")}}, "message header 'expires' is malformed"),
        ({"headers": {"unique": 5}}, "message header 'unique' is malformed: 5"),
        ({"headers": {"unique": ["a"]}}, "message header 'unique' is malformed: ['a']"),
        ({"headers": {"unique": ["k", 1, 0]}}, "message header 'unique' is malformed"),
        ({"headers": {"retry": "many"}}, "message header 'retry' is malformed: 'many'"),
        ({"headers": {"retry": -1}}, "message header 'retry' is malformed: -1"),
        ({"headers": {"parent_uuid": 5}}, "message header 'parent_uuid' is malformed: 5"),
        ({"headers": {"qtasks.input": [["a"], 5]}}, "message header 'qtasks.input' is malformed"),
        (
            {"headers": {"qtasks.input": [{"members": [5, 2, 1]}]}},
            "message header 'qtasks.input' is malformed",
        ),
        # The wire version was not read: a message of another version ran, its fields misread.
        ({"v": 7}, "unsupported message version 7 (this qtasks reads version 1)"),
        ({"v": 0}, "unsupported message version 0"),
        ({"v": "1"}, "unsupported message version '1'"),
        ({"v": 1.0}, "unsupported message version 1.0"),
        ({"v": True}, "unsupported message version True"),
        ({"v": None}, "unsupported message version None"),
    ],
    ids=lambda value: f"{value!r:.40}",
)
async def test_a_bad_field_or_header_is_undecodable_at_once(
    apps: tuple[AsyncQueueTasks, AsyncQueueTasks],
    fields: dict[str, Any],
    says: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review r5 #6: these escaped the decoding as ValueError/TypeError/IndexError, so the
    worker reported a failure of its own with a traceback per delivery and handed the
    message back until ``max_deliveries``; now the message is dead-lettered on its first
    delivery, as undecodable, saying what is wrong."""
    producer, worker = apps
    body = wire(uuid="poison", **fields)
    with caplog.at_level("ERROR", logger="qtasks"):
        await worker.broker.publish(Envelope(id="poison", body=body))
        letter = await dead_letter(worker, "poison")
        assert (await producer.add_task("add", 1, 1, timeout=5)).returning == 2
    assert letter.reason.startswith(f"undecodable message: {says}")
    assert (letter.body, letter.deliveries) == (body, 1)
    assert [r.exc_info for r in caplog.records if r.exc_info] == []  # no traceback
    assert not any("worker failed" in r.getMessage() for r in caplog.records)


async def test_message_without_record_still_runs(
    apps: tuple[AsyncQueueTasks, AsyncQueueTasks],
) -> None:
    _, worker = apps
    finished = anyio.Event()

    class Done:
        @hookimpl
        def qtasks_task_succeeded(self) -> None:
            finished.set()

    worker.add_plugin(Done())
    message = Message(uuid="raw-1", task_name="add", args=[5, 6])
    await worker.broker.publish(worker.codec.encode(message))
    with anyio.fail_after(5):
        await finished.wait()
    final = await worker.wait("raw-1", 5)
    assert final.returning == 11


async def test_dead_letters_can_be_requeued(apps: tuple[AsyncQueueTasks, AsyncQueueTasks]) -> None:
    producer, worker = apps
    task = await producer.add_task("missing_for_now")
    await dead_letter(worker, task.uuid)

    @worker.task
    async def missing_for_now() -> str:
        return "deployed"

    # An operator deploys the task, then requeues the dead letter.
    assert await worker.requeue_dead_letters([task.uuid]) == 1
    assert await worker.dead_letters() == []
    assert (await task.wait_result(5)).returning == "deployed"


async def test_a_requeued_dead_letter_starts_with_no_steps(
    apps: tuple[AsyncQueueTasks, AsyncQueueTasks],
) -> None:
    """The reset record of a requeued dead letter counts no steps: the steps of the run that
    was dead-lettered are dropped with it (``Storage.add`` replaces them), and its count too."""
    producer, worker = apps
    task = await producer.add_task("steps_for_now")
    await dead_letter(worker, task.uuid)
    # As if a run had yielded two steps before it was dead-lettered (a step after the end is
    # refused): the record set back to running, its steps, then its dead-lettered end again.
    ended = await worker.storage.get(task.uuid)
    assert ended is not None
    running = ended.copy()
    running.status = TaskStatus.PROCESS
    await worker.storage.add(running)
    for step in ("old-0", "old-1"):
        await worker.storage.add_step(task.uuid, step)
    ended.steps = 2
    assert await worker.storage.save(ended)
    before = await worker.storage.get(task.uuid)
    assert before is not None and before.steps == 2

    assert await worker.requeue_dead_letters([task.uuid]) == 1
    again = await worker.wait(task.uuid, 5)  # still unknown: dead-lettered again, no step
    assert (again.status, again.steps) == (TaskStatus.ERROR, 0)
    assert [step async for step in worker.storage.steps(task.uuid)] == []


async def test_a_worker_with_no_task_registered_warns_that_it_dead_letters_everything(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A process that only enqueues but serves (``async with app:``) takes other workers'
    messages and dead-letters them as unknown: the worker says so when it starts."""
    broker, storage = MemoryBroker(), MemoryStorage()
    idle = AsyncQueueTasks("enqueues only", broker=broker, storage=storage)
    serving = AsyncQueueTasks("serves", broker=broker, storage=storage)

    @serving.task
    async def add(a: int, b: int) -> int:
        return a + b

    with caplog.at_level("WARNING", logger="qtasks.worker"):
        async with serving:
            pass
        assert not [r for r in caplog.records if "no task registered" in r.getMessage()]
        async with idle:
            pass
    [warning] = [r for r in caplog.records if "no task registered" in r.getMessage()]
    assert "dead-letters every message" in warning.getMessage()
    assert "await app.start()" in warning.getMessage()
    # It named only the async app's forms; a sync app's user wrote `with app:`.
    assert "(the sync app's `app.start()`)" in warning.getMessage()
    assert "instead of `async with app:` (the sync app's `with app:`)" in warning.getMessage()


async def test_a_task_calling_sys_exit_fails_and_the_worker_serves_on() -> None:
    """``sys.exit()`` in a task's code (or a click command it calls, which exits when done)
    raised ``SystemExit`` through the worker: ``qtasks run`` exited with the task's code and
    the sync app's background loop died, every later call failing with "This portal is not
    running" (walk-through). Now the task fails with ``TaskExitError``, chained from the
    ``SystemExit``, retried as any error is, and the worker serves on."""
    app = AsyncQueueTasks("exits")

    @app.task
    def sync_exit() -> None:
        sys.exit(3)

    @app.task(retry=1, retry_backoff=0)
    async def async_exit() -> None:
        sys.exit()

    @app.task
    def generator_exit() -> Iterator[int]:
        yield 1
        sys.exit("done")

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    async with app:
        exits = [
            await app.add_task(name, timeout=10)
            for name in ("sync_exit", "async_exit", "generator_exit")
        ]
        after = await app.add_task("add", 1, 2, timeout=10)
    assert [(r.status, r.attempt) for r in exits] == [
        (TaskStatus.ERROR, 1),
        (TaskStatus.ERROR, 2),
        (TaskStatus.ERROR, 1),
    ]
    assert [r.error for r in exits] == [
        f"TaskExitError: task {name!r} raised SystemExit({code}) (sys.exit() in its code): it "
        "fails the task, not the worker"
        for name, code in (("sync_exit", 3), ("async_exit", None), ("generator_exit", "'done'"))
    ]
    assert "SystemExit: 3" in (exits[0].traceback or "")
    assert (after.status, after.returning) == (TaskStatus.SUCCESS, 3)
    assert TaskExitError("t", "3").code == "3"
