"""The in-memory storage's workflow state (:class:`~qtasks.components.WorkflowStore`).

Nothing here awaits between reading and writing, so each call is atomic in its process, as a
Redis script is on its server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qtasks.components import GateMessage
from qtasks.record import TaskRecord, TaskStatus
from qtasks.workflows.plan import ERROR, FINAL, failure

if TYPE_CHECKING:
    from qtasks.memory.storage import MemoryStorage


@dataclass(slots=True)
class _Flow:
    counts: dict[str, int]
    messages: dict[str, list[GateMessage]]
    feeds: dict[str, str]
    members: list[str]
    done: set[str] = field(default_factory=set)
    opened_by: dict[str, str] = field(default_factory=dict)
    over: bool = False
    """Ended by one of its gates: kept (while its record is) for the member that opened a
    gate, which may ask again, as Redis keeps a workflow's keys until they expire."""


class MemoryWorkflows:
    """The gates and settled members of every workflow of one :class:`MemoryStorage`."""

    __slots__ = ("_flows", "_ids", "_storage")

    def __init__(self, storage: MemoryStorage) -> None:
        self._storage = storage
        self._flows: dict[str, _Flow] = {}
        self._ids: dict[str, None] = {}
        """Every workflow whose record is stored, oldest first."""

    def clear(self) -> None:
        self._flows.clear()
        self._ids.clear()

    async def add(
        self,
        workflow: TaskRecord,
        members: Sequence[TaskRecord],
        gates: dict[str, tuple[int, list[GateMessage]]],
        feeds: dict[str, str],
    ) -> None:
        storage = self._storage
        await storage.add(workflow)
        for member in members:
            await storage.add(member)
        self._flows[workflow.uuid] = _Flow(
            {name: count for name, (count, _) in gates.items()},
            {name: list(messages) for name, (_, messages) in gates.items()},
            dict(feeds),
            list(feeds),
        )
        self._ids[workflow.uuid] = None
        storage._hold(feeds)

    async def cancel(self, workflow: str, reason: str) -> TaskRecord | None:
        record = await self._storage.cancel(workflow, reason)
        if record is not None and record.status is TaskStatus.CANCEL:
            self._release(self._flows.pop(workflow, None))
        return record

    async def newest(self, limit: int) -> list[TaskRecord]:
        out: list[TaskRecord] = []
        gone: set[str] = set()
        for uuid in reversed(self._ids):
            if len(out) == limit:
                break
            record = await self._storage.get(uuid)
            if record is None:
                gone.add(uuid)
            else:
                out.append(record)
        for uuid in gone:
            self.forget(uuid)
        return out

    def failed_member(self, workflow: str) -> str | None:
        flow = self._flows.get(workflow)
        return None if flow is None else flow.opened_by.get(ERROR)

    def forget(self, uuid: str) -> None:
        """``uuid``'s record is gone (expired): so is its workflow state, if it is one."""
        if self._ids.pop(uuid, 0) is None:
            self._release(self._flows.pop(uuid, None))

    def _release(self, flow: _Flow | None) -> None:
        """``flow`` ended: its members' final records expire ``result_ttl`` from now (held
        until then, see :meth:`MemoryStorage._hold`)."""
        if flow is not None:
            self._storage._release(flow.members)

    async def member_done(self, record: TaskRecord) -> list[GateMessage]:
        flow = self._flows.get(record.workflow or "")
        if flow is None:
            return []
        uuid = record.uuid
        success = record.status is TaskStatus.SUCCESS
        gate = flow.feeds.get(uuid) if success else ERROR
        storage = self._storage
        if flow.over or uuid in flow.done:
            if flow.over and await storage.get(record.workflow or "") is None:
                self._flows.pop(record.workflow or "", None)  # its record expired: all gone
                return []
            opened = gate is not None and flow.opened_by.get(gate) == uuid
            return list(flow.messages[gate]) if opened and gate is not None else []
        flow.done.add(uuid)
        own = await storage.get(record.workflow or "")
        if own is None or own.status.final:
            # Ended otherwise (its record cancelled, or expired): nothing opens any more.
            self._release(self._flows.pop(record.workflow or "", None))
            return []
        if gate is None:
            return []
        if success:
            flow.counts[gate] -= 1
            if flow.counts[gate]:
                return []
            flow.opened_by[gate] = uuid
            if gate == FINAL:
                own.status = TaskStatus.SUCCESS
                own.updated_at = storage._clock()
                await storage.save(own)
                error_callback = own.kwargs.get("on_error")
                if error_callback:  # never needed now: not left new for ever
                    await storage.cancel(error_callback, f"workflow {own.uuid} succeeded")
                self._end(flow)
            return list(flow.messages[gate])
        error_callback = own.kwargs.get("on_error")
        if uuid == error_callback:
            return []  # the error callback failing opens nothing: it ran once
        flow.opened_by[ERROR] = uuid
        own.status, own.error = TaskStatus.ERROR, failure(record)
        own.updated_at = storage._clock()
        await storage.save(own)
        reason = f"workflow {own.uuid} failed: {own.error}"
        for member in flow.members:
            if member != uuid and member != error_callback:
                await storage.cancel(member, reason)
        self._end(flow)
        return list(flow.messages[ERROR])

    def _end(self, flow: _Flow) -> None:
        """``flow`` is over: its members' records get their TTL (:meth:`_release`) and only
        what its gates' openers may ask again is kept."""
        self._release(flow)
        openers = set(flow.opened_by.values())
        flow.over = True
        flow.messages = {gate: flow.messages[gate] for gate in flow.opened_by}
        flow.feeds = {uuid: gate for uuid, gate in flow.feeds.items() if uuid in openers}
        flow.counts, flow.members, flow.done = {}, [], set()
