"""A workflow compiled into what the storage keeps: member tasks, gates and who feeds which.

Every member gets its uuid, record and message when the workflow is run. The members that
start at once are published then; every other one waits in a *gate* (a counter and the
messages it publishes when it opens, see :class:`~qtasks.components.WorkflowStore`):

- ``chain(a, b)``: ``b`` waits in a gate of counter 1 that ``a`` feeds;
- ``chain(group(a1, a2), b)`` (a chord): ``b`` waits in a gate of counter 2 that both feed;
- the members whose result is the workflow's feed the gate ``"final"``; a failing member
  opens the gate ``"error"`` (which publishes the ``on_error`` callback, if any).

A step that takes its predecessors' result carries the header :data:`INPUT`: which records
to read its first argument from when it starts (a uuid, or a list of such for a group), and a
placeholder in its place in the message, so the message is checked like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from qtasks.components import GateMessage
from qtasks.errors import TaskArgumentsError, UnknownTaskError, WorkflowError
from qtasks.messages import Envelope, Message, new_uuid
from qtasks.record import TaskRecord, TaskStatus
from qtasks.workflows.canvas import (
    RETRY_HEADER,
    Chain,
    Chord,
    Group,
    Node,
    Signature,
    as_node,
    as_signature,
)

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

INPUT = "qtasks.input"
"""Message header: where a step's first argument is read from (see the module docstring)."""
GENERATION = "qtasks.generation"
"""Message header: the publish generation of a workflow step's message published a second
time (see :meth:`~qtasks.components.WorkflowStore.republish`); absent (0) on a first
publish."""
WORKFLOW_HEADER = "workflow"
"""Message header: the workflow a member belongs to."""
WORKFLOW_TASK = "qtasks.workflow"
"""``task_name`` of a workflow's own record (its uuid is the workflow id)."""
FINAL, ERROR = "final", "error"

Spec = str | list[Any]
"""Where a result is read from: a member's uuid, or a list of specs (a group's results). In a
step's ``INPUT`` header, a list may also hold ``{"members": [start, stop, step]}``: the uuids
of the workflow's ``members[start:stop:step]`` (its record's ``members``), so that a chord of
100,000 members does not carry 100,000 uuids in its callback's message (see
:func:`compact`)."""
RANGE = "members"
MIN_RUN = 64
"""Fewer members in a row than this are named one by one in an ``INPUT`` header."""


def compact(spec: Spec, index: dict[str, int]) -> Spec:
    """``spec`` with every run of at least :data:`MIN_RUN` uuids evenly spaced in the
    workflow's members (``index``: uuid -> position) written as ``{"members": [start, stop,
    step]}``: the members of a group of signatures follow each other (step 1), the last steps
    of a group of chains of the same length are as far apart as those chains are long."""
    if isinstance(spec, str):
        return spec
    out: list[Any] = []
    run: list[int] = []
    uuids: list[str] = []

    def flush() -> None:
        if len(run) >= MIN_RUN:
            step = run[1] - run[0]
            out.append({RANGE: [run[0], run[-1] + 1, step]})
        else:
            out.extend(uuids)
        run.clear()
        uuids.clear()

    for item in spec:
        if isinstance(item, str):
            at = index[item]
            if (len(run) >= 2 and at - run[-1] != run[1] - run[0]) or (
                len(run) == 1 and at <= run[0]
            ):
                flush()
            run.append(at)
            uuids.append(item)
            continue
        flush()
        out.append(compact(item, index))
    flush()
    return out


@dataclass(slots=True)
class _Member:
    uuid: str
    sig: Signature
    input: Spec | None
    gate: str | None
    """The gate whose opening publishes this member; ``None``: published at once."""


@dataclass(slots=True)
class Plan:
    """A compiled workflow, ready for :meth:`~qtasks.components.WorkflowStore.add_workflow`."""

    id: str
    record: TaskRecord
    members: list[TaskRecord]
    """The records of the members that wait in a gate."""
    start: list[tuple[TaskRecord, Envelope]]
    """The members published at once, with their messages."""
    gates: dict[str, tuple[int, list[GateMessage]]]
    feeds: dict[str, str]
    result: Spec


@dataclass(slots=True)
class _Compiler:
    members: list[_Member] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    feeds: dict[str, str] = field(default_factory=dict)
    _open: set[int] = field(default_factory=set)

    def node(self, node: Node, gate: str | None, input: Spec | None) -> tuple[Spec, list[str]]:
        """Compile ``node``, started by ``gate`` with ``input``; return its result's spec and
        the uuids of the members that end it."""
        if id(node) in self._open:
            raise WorkflowError(f"the workflow contains itself (a cycle through {node!r:.80})")
        self._open.add(id(node))
        try:
            return self._node(node, gate, input)
        finally:
            self._open.discard(id(node))

    def _node(self, node: Node, gate: str | None, input: Spec | None) -> tuple[Spec, list[str]]:
        if isinstance(node, Signature):
            uuid = new_uuid()
            self.members.append(_Member(uuid, node, None if node.immutable else input, gate))
            return uuid, [uuid]
        if isinstance(node, Group):
            if not node.tasks:
                raise WorkflowError("a group needs at least one member")
            specs: list[Spec] = []
            ends: list[str] = []
            for child in node.tasks:
                spec, child_ends = self.node(child, gate, input)
                specs.append(spec)
                ends += child_ends
            return specs, ends
        steps: list[Node]
        if isinstance(node, Chord):
            steps = [node.header, node.callback]
        elif isinstance(node, Chain):
            steps = list(node.tasks)
        else:
            raise WorkflowError(f"not a workflow: {node!r:.80}")
        if not steps:
            raise WorkflowError("a chain needs at least one step")
        step_input: Spec | None = input
        ends = []
        for i, step in enumerate(steps):
            if i:
                gate = f"g{len(self.counts)}"
                self.counts[gate] = len(ends)
                for uuid in ends:
                    self.feeds[uuid] = gate
            step_input, ends = self.node(step, gate, step_input)
        assert step_input is not None
        return step_input, ends


async def compile_plan(app: AsyncQueueTasks, node: Node, on_error: Signature | None) -> Plan:
    """Compile ``node`` for ``app``: every member's task must be registered and its
    arguments must fit (a step with an input gets it first); raises
    :class:`~qtasks.errors.WorkflowError` or the argument error otherwise. Each member's
    message passes through ``qtasks_task_enqueue`` here, where it is built, as
    ``add_task``'s does (a member that waits in a gate included: its message is stored now
    and published by a worker later)."""
    if on_error is not None:
        on_error = as_signature(on_error, "on_error")
    workflow = new_uuid()
    compiler = _Compiler()
    result, ends = compiler.node(as_node(node), None, None)
    compiler.counts[FINAL] = len(ends)
    for uuid in ends:
        compiler.feeds[uuid] = FINAL
    gates: dict[str, tuple[int, list[GateMessage]]] = {
        name: (count, []) for name, count in compiler.counts.items()
    }
    gates[ERROR] = (1, [])
    members = list(compiler.members)
    if on_error is not None:
        error_sig = on_error
        if not on_error.immutable:
            error_sig = replace(on_error, args=(workflow, *on_error.args))
        members.append(_Member(new_uuid(), error_sig, None, ERROR))
    now = app.clock()
    records: list[TaskRecord] = []
    start: list[tuple[TaskRecord, Envelope]] = []
    rewrite = "qtasks_task_enqueue" in app.hooks.active
    index = {m.uuid: i for i, m in enumerate(compiler.members)}
    compacted: dict[int, Spec] = {}  # by the input's id: a group's members share theirs
    for position, member in enumerate(members):
        if member.input is not None and not isinstance(member.input, str):
            key = id(member.input)
            if key not in compacted:
                compacted[key] = compact(member.input, index)
            member.input = compacted[key]
        try:
            record, message = _call(app, workflow, member, now)
        except TaskArgumentsError as exc:  # which of the workflow's calls does not fit
            exc.args = (f"{_describe(member, position, len(compiler.members))}: {exc}",)
            raise
        if rewrite:
            record, message = await _rewritten(app, record, message)
        task = app.tasks.get(message.task_name)
        spec = None if task is None else task.flow
        if spec is not None and spec.max_concurrency is not None and member.input is None:
            # Checked now, after the hook, as add_task does; a step with an input gets its key
            # at the worker, of the input.
            message.headers["ckey"] = spec.concurrency_key(message.args, message.kwargs)
        if member.gate is None:
            delay = member.sig.delay_seconds
            start.append((record, app.codec.encode(message, now + delay if delay else None)))
        else:
            records.append(record)
            body = app.codec.encode(message).body
            gates[member.gate][1].append(
                GateMessage(member.uuid, body, message.priority, member.sig.delay_seconds or 0.0)
            )
    own = TaskRecord(
        uuid=workflow,
        task_name=WORKFLOW_TASK,
        kwargs={
            "members": [m.uuid for m in compiler.members],
            "result": result,
            "on_error": members[-1].uuid if on_error is not None else None,
        },
        created_at=now,
        updated_at=now,
        workflow=workflow,
    )
    return Plan(workflow, own, records, start, gates, compiler.feeds, result)


async def _rewritten(
    app: AsyncQueueTasks, record: TaskRecord, message: Message
) -> tuple[TaskRecord, Message]:
    """``message`` through ``qtasks_task_enqueue``, and ``record`` made to match it. The
    workflow's own headers are kept; the uuid must be (the gates name members by it)."""
    own = {k: v for k, v in message.headers.items() if k in (WORKFLOW_HEADER, INPUT)}
    message = await app.hooks.transform("qtasks_task_enqueue", "message", app=app, message=message)
    if message.uuid != record.uuid:
        raise WorkflowError(
            f"a qtasks_task_enqueue hook changed the uuid of workflow member {record.uuid}: "
            "a workflow member keeps its uuid"
        )
    message.headers.update(own)
    record.task_name, record.priority = message.task_name, message.priority
    record.args, record.kwargs = message.args, message.kwargs
    return record, message


def failure(record: TaskRecord) -> str:
    """The workflow error naming the member ``record`` that ended it (failed or cancelled)."""
    why = record.error if record.status is TaskStatus.ERROR else record.cancel_reason
    return f"member {record.uuid} ({record.task_name}) {record.status.value}: {why}"


def _describe(member: _Member, position: int, declared: int) -> str:
    """``member`` for an error: where it is in the workflow (members counted in the order they
    were declared, from 0) and how it is called."""
    sig = member.sig
    args = sig.args
    if position >= declared:  # the error callback
        where, fed = "on_error", ""
        if not sig.immutable:  # called with the workflow id first, which it was given here
            args, fed = args[1:], "; the workflow id comes first"
    else:
        where = f"workflow member {position}"
        fed = "; the previous step's result comes first" if member.input is not None else ""
    shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in sig.kwargs.items())])
    return f"{where} {sig.task_name}.s({shown:.80}){fed}"


def _call(
    app: AsyncQueueTasks, workflow: str, member: _Member, now: float
) -> tuple[TaskRecord, Message]:
    sig = member.sig
    task = app.tasks.get(sig.task_name)
    if task is None:
        raise UnknownTaskError(sig.task_name, app.tasks)
    args = [None, *sig.args] if member.input is not None else list(sig.args)
    kwargs = dict(sig.kwargs)
    task.check_arguments(args, kwargs)
    priority = sig.priority
    if priority is None:
        priority = task.options.priority
    if priority is None:
        priority = app.config.default_priority
    headers: dict[str, Any] = {WORKFLOW_HEADER: workflow}
    if member.input is not None:
        headers[INPUT] = member.input
    if sig.retry is not None:
        headers[RETRY_HEADER] = sig.retry
    message = Message(member.uuid, sig.task_name, args, kwargs, priority, now, 0, headers)
    record = TaskRecord(
        uuid=member.uuid,
        task_name=sig.task_name,
        priority=priority,
        args=args,
        kwargs=kwargs,
        created_at=now,
        updated_at=now,
        workflow=workflow,
    )
    return record, message
