"""Running workflows: start one, read and wait for its record, cancel it, feed each step its
input, and continue a workflow when one of its members ends (for the settle step)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import anyio

from qtasks import local_wait
from qtasks.bulk import BATCH, enqueue_batch, notify_failed, notify_stored, publish_many
from qtasks.checks import check_timeout
from qtasks.components import FailedMember, GateMessage, WorkflowStore, provides
from qtasks.errors import TaskNotFoundError, TaskTimeoutError, WorkflowError, WorkflowInputError
from qtasks.memory.signals import _Signal
from qtasks.messages import Envelope, Message
from qtasks.record import TaskRecord, TaskStatus
from qtasks.workflows.canvas import Node, Signature
from qtasks.workflows.plan import (
    GENERATION,
    INPUT,
    RANGE,
    WORKFLOW_HEADER,
    WORKFLOW_TASK,
    Spec,
    compile_plan,
)

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.executor import TaskRun

log = logging.getLogger("qtasks.workflows")

RUNNING = "running"


@dataclass(slots=True)
class Workflow:
    """A workflow's state as stored: ``status`` is ``running``, ``success``, ``error`` or
    ``cancel``; ``members`` the uuids of its tasks in the order they were declared;
    ``result`` (once ``success``) the result of its last step, a list for a group; ``error``
    names the member that failed (or, for a ``success`` whose members' records expired
    since it ended, says why ``result`` is ``None``); ``failed_member`` (once ``error``) is
    that member's uuid, for ``app.get(wf.failed_member)`` and its traceback."""

    id: str
    status: str
    members: list[str]
    result: Any = None
    error: str | None = None
    on_error: str | None = None
    failed_member: str | None = None
    _client: Any = field(default=None, repr=False, compare=False)

    @property
    def done(self) -> bool:
        """Whether the workflow ended (``success``, ``error`` or ``cancel``)."""
        return self.status != RUNNING

    async def wait_result(self, timeout: float | None = None) -> Workflow:
        """Wait until the workflow ended (woken, not polled) and return its state; raises
        :class:`~qtasks.errors.TaskTimeoutError` when ``timeout`` runs out."""
        workflow: Workflow = await self._client.wait_workflow(self.id, timeout)
        return workflow


@dataclass(slots=True)
class SyncWorkflow(Workflow):
    """A :class:`Workflow` of the sync app: :meth:`wait_result` blocks."""

    # The sync twin blocks and returns the state instead of a coroutine (hence the ignore).
    def wait_result(self, timeout: float | None = None) -> SyncWorkflow:  # type: ignore[override]
        """Block until the workflow ended and return its state."""
        workflow: SyncWorkflow = self._client.wait_workflow(self.id, timeout)
        return workflow


def store_of(app: AsyncQueueTasks) -> WorkflowStore:
    """The app's storage as a :class:`WorkflowStore`, or a clear error."""
    storage = app.storage
    if not provides(storage, WorkflowStore):
        raise WorkflowError(
            f"{type(storage).__name__} does not keep workflows (it is not a WorkflowStore); "
            "use the in-memory or the Redis storage"
        )
    return cast(WorkflowStore, storage)


async def run(app: AsyncQueueTasks, node: Node, on_error: Signature | None) -> Workflow:
    """Compile ``node``, store the workflow and publish the members that start at once."""
    store = store_of(app)
    plan = await compile_plan(app, node, on_error)
    try:
        await store.add_workflow(plan.record, plan.members, plan.gates, plan.feeds)
    except BaseException as exc:  # a cancel too; nothing will be published
        await notify_failed(app, [*plan.start, *((r, None) for r in plan.members)], exc)
        raise
    # The first steps' records go with their messages, as add_tasks stores them.
    begun = 0
    try:
        for begun in range(0, len(plan.start), BATCH):
            await enqueue_batch(app, plan.start[begun : begun + BATCH])
    except BaseException as exc:  # a cancel too
        # enqueue_batch ended its own batch's tasks; those of the batches behind it end here.
        # Earlier batches may run already: the workflow is cancelled, so it does not stay
        # half started for ever; the error names it (a note) for whoever reads it.
        await notify_failed(app, plan.start[begun + BATCH :], exc)
        if isinstance(exc, Exception):
            exc.add_note(f"workflow {plan.id} was stored, then cancelled")
        with anyio.CancelScope(shield=not isinstance(exc, Exception)):
            await _cancel_started(app, plan.id, exc)
        raise
    # The others are stored and wait in gates: enqueued when a worker opens their gate.
    await notify_stored(app, plan.members, enqueued=False)
    return Workflow(plan.id, RUNNING, plan.record.kwargs["members"], _client=app)


async def state(app: AsyncQueueTasks, record: TaskRecord) -> Workflow:
    """The :class:`Workflow` of a workflow record (its result read from the members). Never
    raises for a member's record that is gone (it expired ``result_ttl`` after the workflow
    ended): the state then has no result, and ``error`` says why."""
    info = record.kwargs
    status = record.status.value if record.status.final else RUNNING
    result: Any = None
    error = record.error if record.status is TaskStatus.ERROR else record.cancel_reason
    if record.status is TaskStatus.SUCCESS:
        records, problem = await _read(app, info["result"])
        if problem is None:
            result = _build(info["result"], records)
        else:
            error = (
                f"its result cannot be read: {problem} (members' records expire result_ttl "
                "after their workflow ended)"
            )
    failed = None
    if record.status is TaskStatus.ERROR:
        store = store_of(app)
        if provides(store, FailedMember):
            failed = await cast(FailedMember, store).failed_member(record.uuid)
    return Workflow(
        record.uuid, status, list(info["members"]), result, error, info.get("on_error"), failed, app
    )


def summary(record: TaskRecord) -> dict[str, Any]:
    """A workflow record in a line, JSON-ready (``qtasks inspect``, ``qtasks workflow``):
    ``id``, ``status`` (as :class:`Workflow`'s), ``size`` (how many members, the error
    callback included), ``created_at`` and ``error`` (why it failed or was cancelled)."""
    info = record.kwargs
    status = record.status.value if record.status.final else RUNNING
    error = record.error if record.status is TaskStatus.ERROR else record.cancel_reason
    size = len(info.get("members", ())) + (1 if info.get("on_error") else 0)
    return {
        "id": record.uuid,
        "status": status,
        "size": size,
        "created_at": record.created_at,
        "error": error,
    }


async def newest(app: AsyncQueueTasks, limit: int) -> list[dict[str, Any]]:
    """:func:`summary` of the newest ``limit`` workflows, newest first; ``[]`` when the
    storage keeps no workflows."""
    storage = app.storage
    if not provides(storage, WorkflowStore):
        return []
    return [summary(r) for r in await cast(WorkflowStore, storage).workflows(limit)]


async def get(app: AsyncQueueTasks, id: str) -> Workflow | None:
    """The workflow ``id``, or ``None`` when no such workflow is stored."""
    record = await app.storage.get(id)
    if record is None or record.task_name != WORKFLOW_TASK:
        return None
    return await state(app, record)


def _member_uuids(record: TaskRecord) -> list[str]:
    """The members of the workflow ``record``, in the order they were declared, its error
    callback last."""
    uuids: list[str] = list(record.kwargs["members"])
    if record.kwargs.get("on_error"):
        uuids.append(record.kwargs["on_error"])
    return uuids


async def records(app: AsyncQueueTasks, id: str) -> dict[str, TaskRecord | None] | None:
    """The stored records of the members of the workflow ``id``, by uuid, in the order they
    were declared, its error callback last (``None`` for a record that expired), read in one
    call; ``None`` when no such workflow is stored."""
    record = await app.storage.get(id)
    if record is None or record.task_name != WORKFLOW_TASK:
        return None
    uuids = _member_uuids(record)
    return dict(zip(uuids, await store_of(app).get_many(uuids), strict=True))


async def wait(app: AsyncQueueTasks, id: str, timeout: float | None) -> Workflow:
    """Wait for the workflow ``id`` to end; return its state. An unknown id raises
    :class:`~qtasks.errors.TaskNotFoundError` at once, a ``timeout`` that is not seconds
    :class:`~qtasks.errors.InvalidTimeoutError`."""
    timeout = check_timeout(timeout, "wait_workflow: timeout")
    local_wait.check_waitable(app, f"waiting for workflow {id}")
    record = await app.storage.get(id)
    if record is None or record.task_name != WORKFLOW_TASK:
        raise TaskNotFoundError(id)
    if not record.status.final:
        try:
            record = await app.storage.wait(id, timeout)
        except TaskTimeoutError as exc:
            why = await _unfinished(app, record)
            late = TaskTimeoutError(id, exc.timeout, why, what="workflow")
            raise local_wait.explained(app, late) from None
    return await state(app, record)


async def _unfinished(app: AsyncQueueTasks, record: TaskRecord) -> str:
    """What the workflow ``record`` still waits for, for its wait's timeout: its first
    members not final, with their status."""
    members: list[str] = record.kwargs["members"]
    waiting = [
        m for m in await store_of(app).get_many(members) if m is not None and not m.status.final
    ]
    if not waiting:
        return ""
    shown = [f"{m.task_name} [{m.uuid}] ({m.status.value})" for m in waiting[:3]]
    more = f" and {len(waiting) - 3} more" if len(waiting) > 3 else ""
    return (
        f": {len(waiting)} of its {len(members)} members are not final: " + ", ".join(shown) + more
    )


async def cancel(app: AsyncQueueTasks, id: str, reason: str) -> Workflow | None:
    """Cancel the workflow: its record first, with its gates deleted (no member continues it
    from then on, see :meth:`WorkflowStore.cancel_workflow`), then every member not final
    yet: queued ones never run, running ones are cancelled. A workflow that had ended
    (``success`` or ``error``) is left as it is: its state is returned, and its error
    callback, which may be running, is not cancelled."""
    store = store_of(app)
    record = await app.storage.get(id)
    if record is None or record.task_name != WORKFLOW_TASK:
        return None
    record = await store.cancel_workflow(id, reason)
    if record is None:
        return None
    if record.status is not TaskStatus.CANCEL:
        # It had ended (success or error) before: nothing is cancelled, its error callback
        # (which may be running) included; its state is returned as it is.
        return await state(app, record)
    uuids = _member_uuids(record)
    stored = await store.get_many(uuids)
    for uuid, member in zip(uuids, stored, strict=True):
        if member is not None and not member.status.final:
            await app.cancel(uuid, reason)
    return await state(app, record)


async def _cancel_started(app: AsyncQueueTasks, id: str, exc: BaseException) -> None:
    """Best effort: cancel the workflow ``id`` whose start failed with ``exc`` (or was
    cancelled)."""
    why = str(exc) or type(exc).__name__
    try:
        await cancel(app, id, f"not all its first steps could be enqueued: {why}")
    except Exception:  # the caller raises exc: this one is only logged
        log.warning("could not cancel workflow %s after its start failed", id, exc_info=True)


async def resolve(app: AsyncQueueTasks, spec: Spec, uuid: str, workflow: str | None) -> Any:
    """The value ``spec`` names, read from the members' stored records, for step ``uuid`` of
    ``workflow``: raises :class:`~qtasks.errors.WorkflowInputError` when one is gone or did
    not succeed."""
    if _ranged(spec):  # {"members": [start, stop, step]}: read from the workflow's record
        own = None if workflow is None else await app.storage.get(workflow)
        if own is None:
            raise WorkflowInputError(uuid, f"the record of its workflow {workflow} is gone")
        spec = _expand(spec, own.kwargs["members"])
    records, problem = await _read(app, spec)
    if problem is not None:
        raise WorkflowInputError(uuid, problem)
    return _build(spec, records)


async def _read(app: AsyncQueueTasks, spec: Spec) -> tuple[dict[str, TaskRecord], str | None]:
    """The stored records ``spec`` names, by uuid, and what keeps them from giving its value
    (``None`` when every one of them succeeded)."""
    uuids: list[str] = []
    _flatten(spec, uuids)
    records = await store_of(app).get_many(uuids)
    by_uuid: dict[str, TaskRecord] = {}
    for wanted, record in zip(uuids, records, strict=True):
        if record is None:
            return by_uuid, f"the record of {wanted} is gone (expired?)"
        if record.status is not TaskStatus.SUCCESS:
            return by_uuid, f"{wanted} has status {record.status.value}"
        by_uuid[wanted] = record
    return by_uuid, None


def _ranged(spec: Spec) -> bool:
    return not isinstance(spec, str) and any(
        isinstance(item, dict) or (isinstance(item, list) and _ranged(item)) for item in spec
    )


def _expand(spec: Spec, members: list[str]) -> Spec:
    """``spec`` with its ``{"members": [start, stop, step]}`` items replaced by those uuids."""
    if isinstance(spec, str):
        return spec
    out: list[Any] = []
    for item in spec:
        if isinstance(item, dict):
            start, stop, step = item[RANGE]
            out.extend(members[start:stop:step])
        else:
            out.append(_expand(item, members))
    return out


def _flatten(spec: Spec, out: list[str]) -> None:
    if isinstance(spec, str):
        out.append(spec)
    else:
        for item in spec:
            _flatten(item, out)


def _build(spec: Spec, records: dict[str, TaskRecord]) -> Any:
    if isinstance(spec, str):
        return records[spec].returning
    return [_build(item, records) for item in spec]


async def member_ended(app: AsyncQueueTasks, record: TaskRecord, *, again: bool = False) -> None:
    """Continue ``record``'s workflow after its final record was stored, by plain calls
    (:meth:`WorkflowStore.member_done`, then the publish of what it opened, each confirmed):
    the settle step's path when the broker does not do it in its own step
    (:class:`~qtasks.components.SharedServer`). Called before the member's message is acked,
    so a worker that dies in between leaves the message to be redelivered, and the worker
    that gets it calls this again (:meth:`~WorkflowStore.member_done` returns the opened
    gate's messages again to the member that opened it; ``again``: this is that second call,
    so only the steps that have not begun are published, each with a new publish generation:
    see :meth:`~WorkflowStore.republish`)."""
    store = store_of(app)
    opened = await store.member_done(record)
    if opened and again:
        # Published already unless the worker died before: a step that has begun (or ended)
        # got its message, so it is not sent twice; one still new may have a copy queued, so
        # it is published with a new generation and that copy, when it comes, is dropped at
        # begin (WorkflowStore.republish): the copy that runs is the last one published.
        generations = await store.republish([m.id for m in opened])
        opened = [
            replace(m, body=_with_generation(app, m.body, g))
            for m, g in zip(opened, generations, strict=True)
            if g
        ]
    if opened:
        await publish_many(app.broker, gate_envelopes(opened, app.clock()))
        await announce(app, [m.id for m in opened])


def _with_generation(app: AsyncQueueTasks, body: bytes, generation: int) -> bytes:
    """``body`` whose message carries the publish ``generation`` (header
    :data:`~qtasks.workflows.plan.GENERATION`)."""
    message = app.codec.decode(body)
    message.headers[GENERATION] = generation
    return app.codec.encode(message).body


def generation(headers: dict[str, Any]) -> int:
    """The publish generation a message's ``headers`` carry (0 without one, or a bad one):
    what the worker passes to :meth:`~qtasks.components.Storage.begin`."""
    value = headers.get(GENERATION, 0)
    return value if type(value) is int and value > 0 else 0


async def announce(app: AsyncQueueTasks, uuids: Sequence[str]) -> None:
    """``qtasks_task_enqueued`` of the workflow members whose messages a settle step just
    published (the gates it opened), with their stored records; one read of the records, and
    only when a plugin implements the hook."""
    if not uuids or "qtasks_task_enqueued" not in app.hooks.active:
        return
    for record in await store_of(app).get_many(uuids):
        if record is not None:
            await app.hooks.notify("qtasks_task_enqueued", app=app, record=record)


class Announcer:
    """``qtasks_task_enqueued`` of the workflow steps a broker published while it claimed
    (the error callback of a member dead-lettered at claim; see ``published`` of
    :meth:`~qtasks.components.BeginOnClaim.consume_begun`), fired by a task of the worker's
    own so the claim is not held up."""

    __slots__ = ("_app", "_ids", "_ready")

    def __init__(self, app: AsyncQueueTasks) -> None:
        self._app = app
        self._ids: list[str] = []
        self._ready = _Signal()

    def published(self, ids: Sequence[str]) -> None:
        """What the broker calls with the ids a claim published."""
        self._ids.extend(ids)
        self._ready.fire()

    async def serve(self) -> None:
        """Announce what claims published, until cancelled."""
        while True:
            while not self._ids:
                await self._ready.wait(None)
            ids, self._ids = self._ids, []
            try:
                await announce(self._app, ids)
            except Exception:  # a plugin's error must not end the worker's serving
                log.exception("qtasks_task_enqueued failed for %d workflow steps", len(ids))


async def found_final(app: AsyncQueueTasks, record: TaskRecord) -> None:
    """A workflow member's message was delivered while its record is already final: it was
    cancelled (or dead-lettered) before it ran, or an earlier attempt stored its result and
    its worker died before the ack. Its workflow is continued, unless a shared server already
    did that atomically with the stored success (then there is nothing left to do, and the
    next step must not be published twice)."""
    if record.status is TaskStatus.SUCCESS and app.shared_server is not None:
        return
    await member_ended(app, record, again=True)


def gate_envelopes(messages: Sequence[GateMessage], now: float) -> list[Envelope]:
    """The envelopes of an opened gate's messages, due ``delay`` after ``now``."""
    return [
        Envelope(m.id, m.body, m.priority, now + m.delay if m.delay else None) for m in messages
    ]


async def with_input(run: TaskRun, args: list[Any]) -> list[Any]:
    """``args`` of a workflow step (its message has the ``INPUT`` header) with its input,
    the predecessors' results read from storage, as the first argument (the executor's
    step after the ``qtasks_executor_args`` transform); the value the worker read before
    the run (``run.step_input``, for a concurrency key of it) is not read again. Raises
    :class:`~qtasks.errors.WorkflowInputError` when a predecessor's record is gone or did
    not succeed: not retried, it would not heal."""
    read = run.step_input
    value = await step_input(run.app, run.message) if read is None else read[0]
    _record_input(run, value)
    return [value, *args[1:]]


def _record_input(run: TaskRun, value: Any) -> None:
    """Write the step's input into ``run.record`` in place of the placeholder it was stored
    with (its predecessors had not ended then): the worker saves the record whole when the run
    ends, so the stored record shows what the step was called with from then on. Not saved at
    once: that would cost every such step a round trip (about a sixth of a chain step's time
    on Redis, ``bench/workflows.py`` C2); while it runs, its stored record keeps the
    placeholder."""
    record = run.record
    if record.args:
        record.args = [value, *record.args[1:]]


async def step_input(app: AsyncQueueTasks, message: Message) -> Any:
    """The input of the workflow step ``message`` (it has the ``INPUT`` header), read from
    its predecessors' stored records (see :func:`resolve`)."""
    headers = message.headers
    return await resolve(app, headers[INPUT], message.uuid, headers.get(WORKFLOW_HEADER))
