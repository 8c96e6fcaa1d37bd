"""The in-memory storage: records with fenced writes, woken waiters and live steps.

Over ~500 lines: one class that implements the storage protocol and every optional capability
the core's own tests run through (begin many, query, workflows, steps), as Redis does.
"""

from __future__ import annotations

import bisect
import heapq
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from typing import Any, Self

import anyio
import anyio.abc
import anyio.lowlevel

from qtasks.components import SCAN_BUDGET, GateMessage, RecordPage, RecordQuery
from qtasks.config import QueueConfig
from qtasks.errors import InvalidQueryError, TaskTimeoutError
from qtasks.memory.counts import LiveCounts
from qtasks.memory.records import Records, as_stored
from qtasks.memory.signals import _Lifecycle, _Signal
from qtasks.memory.workflows import MemoryWorkflows
from qtasks.record import TaskRecord, TaskStatus
from qtasks.steps import StepsRestarted

_Entry = tuple[int, float, str]
"""An index entry: (write sequence number, index time, uuid); valid while the record's
latest write has that sequence number."""
_SCAN = 10_000
"""Most index entries one :meth:`MemoryStorage.query` call looks at once it found a record
(until then it goes on for its scan budget, yielding every ``_SCAN`` entries)."""


def _seq(entry: _Entry) -> int:
    return entry[0]


def _time(entry: _Entry) -> float:
    return entry[1]


def _second(item: tuple[str, float]) -> float:
    return item[1]


class MemoryStorage(_Lifecycle):
    """Task records in a dict, with woken waiters and live generator steps.

    It is a :class:`~qtasks.components.StorageQuery`: a query first appends to a log one
    entry per record written since the last query, in the order of their last writes; lists
    by status and task name are brought up to date from the log; an entry is skipped once a
    later write of its record (or its expiry) made it stale, and the lists are rebuilt when
    most of their entries are stale, so listing a page costs a binary search and the page."""

    local = True
    """Calls complete without I/O (see :mod:`qtasks.components`)."""

    def __init__(self, *, clock: Callable[[], float] | None = None) -> None:
        """``clock`` returns the unix time that ``result_ttl`` is measured against (default
        :func:`time.time`), so tests can move time forward."""
        self._clock: Callable[[], float] = clock or time.time
        self._records = Records()
        self._steps: dict[str, list[Any]] = {}
        """Each task's stream: its steps, and a :class:`StepsRestarted` where a run started
        over."""
        self._step_runs: dict[str, tuple[int, str | None, int]] = {}
        """Per stream: how many steps, the fence of the last fenced one, how many runs."""
        self._attempts: dict[str, list[TaskRecord]] = {}
        self._signals: dict[str, _Signal] = {}
        self._watchers: dict[str, int] = {}
        self._expiry: list[tuple[float, str]] = []
        self._ttl: float | None = None
        self._cancel_followers: list[Callable[[str, str], None]] = []
        self._write_seq = 0
        self._last_time = 0.0
        self._seq_of: dict[str, int] = {}
        self._written: dict[str, float] = {}
        """Records written since the log was last brought up to date: when, by uuid."""
        self._all: list[_Entry] = []
        self._by_status: dict[TaskStatus, list[_Entry]] = {}
        self._live: dict[TaskStatus, LiveCounts] = {}
        """Which entries of each status list are current, for :meth:`count`."""
        self._at: dict[str, tuple[TaskStatus, int]] = {}
        """A record's current entry in the status lists: its status and position."""
        self._by_name: dict[str, list[_Entry]] = {}
        self._by_parent: dict[str, list[_Entry]] = {}
        self._indexed = 0
        self._workflows = MemoryWorkflows(self)
        self._generations: dict[str, int] = {}
        """Publish generations of the records :meth:`republish` raised (see
        :class:`~qtasks.components.WorkflowStore`), by uuid."""
        self._kept_until: dict[str, float] = {}
        """Workflow members' records, by uuid: kept until then (inf while the workflow runs,
        see :meth:`_hold`) whatever ``result_ttl`` says."""

    @classmethod
    def from_config(cls, config: QueueConfig) -> Self:
        return cls()

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        self._begin(stack)
        self._ttl = config.result_ttl

    def _expire(self) -> None:
        now = self._clock()
        kept = self._kept_until
        while self._expiry and self._expiry[0][0] <= now:
            _, uuid = heapq.heappop(self._expiry)
            facts = self._records.facts(uuid)
            if (
                facts is not None
                and facts[0].final
                and facts[3] + (self._ttl or math.inf) <= now
                and kept.get(uuid, 0.0) <= now
            ):
                del self._records[uuid]
                kept.pop(uuid, None)
                self._written.pop(uuid, None)
                self._forget(uuid)
                self._steps.pop(uuid, None)
                self._step_runs.pop(uuid, None)
                self._attempts.pop(uuid, None)
                self._generations.pop(uuid, None)
                self._workflows.forget(uuid)

    def _hold(self, uuids: Iterable[str]) -> None:
        """The records of ``uuids``, members of a workflow just added, do not expire while it
        runs: a later step, or the workflow's result, reads them (see :meth:`_release`)."""
        for uuid in uuids:
            self._kept_until[uuid] = math.inf

    def _release(self, uuids: Iterable[str]) -> None:
        """The workflow of ``uuids`` ended: their final records expire ``result_ttl`` from
        now (or when the TTL of their own final save ends, whichever is later)."""
        kept = self._kept_until
        if self._ttl is None:
            for uuid in uuids:
                kept.pop(uuid, None)
            return
        until = self._clock() + self._ttl
        for uuid in uuids:
            kept[uuid] = until
            heapq.heappush(self._expiry, (until, uuid))

    def _watch(self, uuid: str) -> _Signal:
        self._watchers[uuid] = self._watchers.get(uuid, 0) + 1
        return self._signals.setdefault(uuid, _Signal())

    def _unwatch(self, uuid: str) -> None:
        left = self._watchers.pop(uuid, 1) - 1
        if left:
            self._watchers[uuid] = left
        else:
            self._signals.pop(uuid, None)

    def _fire(self, uuid: str) -> None:
        signal = self._signals.get(uuid)
        if signal is not None:
            signal.fire()

    async def add(self, record: TaskRecord, *, replace: bool = True) -> None:
        self._check()
        self._expire()
        if replace or record.uuid not in self._records:
            self._records[record.uuid] = stored = record.copy()
            self._index(stored)
            # A replaced record's attempts and steps are not this one's.
            self._attempts.pop(record.uuid, None)
            self._steps.pop(record.uuid, None)
            self._step_runs.pop(record.uuid, None)

    async def get(self, uuid: str) -> TaskRecord | None:
        self._check()
        self._expire()
        return self._records.copy_of(uuid)

    async def begin(self, record: TaskRecord, *, generation: int = 0) -> TaskRecord:
        self._check()
        stored = self._records.get(record.uuid)
        if stored is None:
            stored = record.copy()
            stored.updated_at = self._clock()
            self._records[record.uuid] = stored
            self._index(stored)
            return stored.copy()
        if stored.status.final or self._generations.get(record.uuid, 0) > generation:
            return stored.copy()  # final, or a stale copy (see WorkflowStore.republish)
        self._log_attempt(stored, record.token)
        moved = stored.status is not record.status
        stored.status = record.status
        stored.attempt = record.attempt
        stored.token = record.token
        stored.worker = record.worker
        stored.updated_at = self._clock()
        if stored.status is TaskStatus.PROCESS:  # this run began now, not the one retried
            stored.started_at = stored.updated_at
        if moved:
            self._index(stored)
        return stored.copy()

    def _log_attempt(self, stored: TaskRecord, token: str | None) -> None:
        """Keep ``stored`` when a new delivery begins over an attempt (see
        :class:`qtasks.components.AttemptLog`)."""
        if stored.token != token and (
            stored.status is TaskStatus.PROCESS or stored.status is TaskStatus.RETRY
        ):
            self._attempts.setdefault(stored.uuid, []).append(stored.copy())

    async def attempts(self, uuid: str) -> list[TaskRecord]:
        """See :class:`qtasks.components.AttemptLog`."""
        self._check()
        self._expire()
        return [record.copy() for record in self._attempts.get(uuid, ())]

    async def begin_many(self, records: Sequence[TaskRecord]) -> list[TaskRecord]:
        """See :class:`qtasks.components.BeginMany`."""
        return [await self.begin(record) for record in records]

    def begin_claimed(
        self, uuid: str, token: str, worker: str, attempt: int | None
    ) -> TaskRecord | None:
        """The stored record of ``uuid`` begun for the delivery holding ``token`` (status
        ``process``, ``attempt + 1`` when given), as :class:`MemoryBroker` claims it; final
        records are left as they are; ``None`` when there is none."""
        self._check()
        stored = self._records.get(uuid)
        if stored is None:
            return None
        if not stored.status.final:
            self._log_attempt(stored, token)
            moved = stored.status is not TaskStatus.PROCESS
            stored.status = TaskStatus.PROCESS
            stored.token = token
            stored.worker = worker
            if attempt is not None:
                stored.attempt = attempt + 1
            stored.updated_at = self._clock()
            stored.started_at = stored.updated_at  # this run began now
            if moved:
                self._index(stored)
        return stored.copy()

    def dead_claimed(self, uuid: str, reason: str) -> TaskRecord | None:
        """The record of ``uuid``, dead-lettered by a claim with ``reason``, says so (status
        ``error``, token ``dead-letter``; ``started_at`` when its last run began, if that run
        was lost in ``process``), waiters woken; returned (a copy) when so ended. A final
        record is left as it is."""
        stored = self._records.get(uuid)
        if stored is None or stored.status.final:
            return None
        ended = stored.copy()
        if stored.status is TaskStatus.PROCESS:  # its last run began, and was lost
            ended.started_at = stored.updated_at
        ended.status, ended.token = TaskStatus.ERROR, "dead-letter"
        ended.error = f"dead-lettered: {reason}"
        ended.returning = None
        ended.updated_at = self._clock()
        self._put(ended)  # packed: ``ended`` is the caller's
        return ended

    async def save(self, record: TaskRecord, *, fence: str | None = None) -> bool:
        self._check()
        stored = self._records.get(record.uuid)
        if stored is not None:
            if fence is not None and stored.token not in (None, fence):
                return False
            if stored.status.final and stored.status is not record.status:
                return False  # final is final: a cancel made while the task ran stays
        self._put(record if record.status.final else record.copy())  # a final one is packed
        return True

    def _put(self, record: TaskRecord) -> None:
        """Store ``record`` (owned from now on while in flight; a final one is packed, see
        :class:`~qtasks.memory.records.Records`); a final one expires after the TTL and wakes
        its waiters."""
        self._records[record.uuid] = record
        self._index(record)
        if record.status.final:
            if self._ttl is not None:
                heapq.heappush(self._expiry, (record.updated_at + self._ttl, record.uuid))
            self._fire(record.uuid)

    async def cancel(self, uuid: str, reason: str) -> TaskRecord | None:
        done = await self.cancel_from(uuid, reason)
        return None if done is None else done[0]

    async def cancel_from(self, uuid: str, reason: str) -> tuple[TaskRecord, TaskStatus] | None:
        """See :class:`qtasks.components.CancelFrom`."""
        self._check()
        stored = self._records.get(uuid)
        if stored is None:
            return None
        prior = stored.status
        if not prior.final:
            running = stored.status is TaskStatus.PROCESS
            stored.status = TaskStatus.CANCEL
            stored.cancel_reason = reason
            stored.updated_at = self._clock()
            self._put(
                stored
            )  # final now: packed (``stored`` is the caller's), expires with the TTL
            if running:
                for follower in list(self._cancel_followers):
                    follower(uuid, reason)
            return stored, prior
        return stored.copy(), prior

    async def add_many(self, records: Sequence[TaskRecord]) -> None:
        """See :class:`qtasks.components.BulkAdd`."""
        for record in records:
            await self.add(record)

    async def add_workflow(
        self,
        workflow: TaskRecord,
        members: Sequence[TaskRecord],
        gates: dict[str, tuple[int, list[GateMessage]]],
        feeds: dict[str, str],
    ) -> None:
        """See :class:`qtasks.components.WorkflowStore`."""
        self._check()
        await self._workflows.add(workflow, members, gates, feeds)

    async def member_done(self, record: TaskRecord) -> list[GateMessage]:
        """See :class:`qtasks.components.WorkflowStore`."""
        self._check()
        return await self._workflows.member_done(record)

    async def republish(self, uuids: Sequence[str]) -> list[int]:
        """See :class:`qtasks.components.WorkflowStore`: no await between the check of a
        record and the raise of its generation."""
        self._check()
        out = []
        for uuid in uuids:
            stored = self._records.get(uuid)
            if stored is None or stored.status is not TaskStatus.NEW:
                out.append(0)
                continue
            out.append(self._generations.get(uuid, 0) + 1)
            self._generations[uuid] = out[-1]
        return out

    async def cancel_workflow(self, workflow: str, reason: str) -> TaskRecord | None:
        """See :class:`qtasks.components.WorkflowStore`."""
        self._check()
        return await self._workflows.cancel(workflow, reason)

    async def failed_member(self, workflow: str) -> str | None:
        """See :class:`qtasks.components.WorkflowStore`."""
        self._check()
        return self._workflows.failed_member(workflow)

    async def workflows(self, limit: int = 20) -> list[TaskRecord]:
        """See :class:`qtasks.components.WorkflowStore`."""
        self._check()
        return await self._workflows.newest(limit)

    async def get_many(self, uuids: Sequence[str]) -> list[TaskRecord | None]:
        """See :class:`qtasks.components.WorkflowStore`."""
        self._check()
        self._expire()
        copy_of = self._records.copy_of
        return [copy_of(uuid) for uuid in uuids]

    async def cancelled(self, uuids: Sequence[str]) -> dict[str, str]:
        """See :class:`qtasks.components.CancelCheck`."""
        self._check()
        out: dict[str, str] = {}
        for uuid in uuids:
            stored = self._records.get(uuid)
            if stored is not None and stored.status is TaskStatus.CANCEL:
                out[uuid] = stored.cancel_reason or "cancelled"
        return out

    async def follow_cancels(
        self,
        on_cancel: Callable[[str, str], None],
        *,
        on_live: Callable[[bool], None] | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """See :class:`qtasks.components.CancelFeed`: every app sharing this storage hears
        the cancels of the others at once (it is always live)."""
        self._check()
        self._cancel_followers.append(on_cancel)
        try:
            if on_live is not None:
                on_live(True)
            task_status.started()
            await anyio.sleep_forever()
        finally:
            self._cancel_followers.remove(on_cancel)

    async def wait(self, uuid: str, timeout: float | None) -> TaskRecord:
        self._check()
        deadline = None if timeout is None else time.monotonic() + timeout
        signal = self._watch(uuid)
        try:
            while True:
                record = self._records.final(uuid)
                if record is not None:
                    return record
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TaskTimeoutError(uuid, timeout)
                await signal.wait(left)
        finally:
            self._unwatch(uuid)

    async def add_step(self, uuid: str, value: Any, *, fence: str | None = None) -> int | None:
        """See :meth:`qtasks.components.Storage.add_step`."""
        self._check()
        record = self._records.get(uuid)
        if record is None or record.status.final:
            return None  # no record (nothing would ever drop the steps), or the task is over
        if fence is not None and record.token not in (None, fence):
            return None  # a newer delivery owns the task
        stream = self._steps.setdefault(uuid, [])
        count, last, runs = self._step_runs.get(uuid, (0, None, 1))
        if fence is not None:
            if count and last != fence:
                runs += 1
                stream.append(StepsRestarted(runs))
            last = fence
        stream.append(as_stored(value))
        count += 1
        self._step_runs[uuid] = (count, last, runs)
        record.steps = count
        self._fire(uuid)
        return count - 1

    async def steps(self, uuid: str, start: int = 0) -> AsyncIterator[Any]:
        self._check()
        index = start
        signal = self._watch(uuid)
        try:
            while True:
                steps = self._steps.get(uuid, [])
                while index < len(steps):
                    yield steps[index]
                    index += 1
                facts = self._records.facts(uuid)
                if facts is None or facts[0].final:
                    if index >= len(self._steps.get(uuid, [])):
                        return
                    continue
                await signal.wait(None)
        finally:
            self._unwatch(uuid)

    async def stats(self) -> dict[str, int]:
        self._check()
        self._expire()
        counts: dict[str, int] = {}
        for status in self._records.statuses():
            counts[status.value] = counts.get(status.value, 0) + 1
        return counts

    async def flush(self) -> int:
        """Drop every record and step; return how many records (for ``app.flush_all``)."""
        count = len(self._records)
        self._records.clear()
        self._workflows.clear()
        self._steps.clear()
        self._step_runs.clear()
        self._attempts.clear()
        self._generations.clear()
        self._kept_until.clear()
        self._expiry.clear()
        self._written.clear()
        self._rebuild()
        return count

    # --- StorageQuery ---------------------------------------------------------------------

    def _index(self, record: TaskRecord) -> None:
        """Note ``record``'s write (after every write that stores it or changes its status):
        the time of its last write, by uuid. The log gets one entry per record written since
        the last query, when a query needs it (:meth:`_log_writes`): a task's three writes
        between two dashboard refreshes make one entry, not three, and a write costs a clock
        read and a dict store."""
        self._written[record.uuid] = self._clock()

    def _log_writes(self) -> None:
        """Append an entry for each record written since the last call, in the order of their
        last writes. Index times never go backwards (a clock set back is clamped), so every
        list stays sorted."""
        written = self._written
        if not written:
            return
        self._written = {}
        records, seq_of, entries = self._records, self._seq_of, self._all
        seq, last = self._write_seq, self._last_time
        # Nearly sorted already (a write is noted at its time): a linear pass of the sort.
        for uuid, at in sorted(written.items(), key=_second):
            if uuid not in records:
                continue  # expired or flushed since
            last = max(last, at)
            seq += 1
            seq_of[uuid] = seq
            entries.append((seq, last, uuid))
        self._write_seq, self._last_time = seq, last
        if len(entries) > 2 * len(records) + 4096:
            self._rebuild()

    def _catch_up(self) -> None:
        """Add the log's entries since the last call to the lists by status and task name
        (those still current: a later write of the same record has its own entry)."""
        self._log_writes()
        records, seq_of = self._records, self._seq_of
        by_status, by_name = self._by_status, self._by_name
        entries = self._all
        if self._indexed == len(entries):
            return
        # A slice copies only the new entries (islice would step through the old ones).
        for entry in entries[self._indexed :]:
            facts = records.facts(entry[2])
            if facts is None or seq_of.get(entry[2]) != entry[0]:
                continue
            status, task_name, parent_uuid, _ = facts
            by_status.setdefault(status, []).append(entry)
            live = self._live.get(status)
            if live is None:
                live = self._live[status] = LiveCounts()
            self._forget(entry[2])  # its earlier entry is stale
            self._at[entry[2]] = (status, live.append())
            by_name.setdefault(task_name, []).append(entry)
            if parent_uuid is not None:
                self._by_parent.setdefault(parent_uuid, []).append(entry)
        self._indexed = len(self._all)

    def _rebuild(self) -> None:
        """Drop the stale entries (amortised: called when they are the majority)."""
        live = [
            entry
            for entry in self._all
            if entry[2] in self._records and self._seq_of.get(entry[2]) == entry[0]
        ]
        self._seq_of = {uuid: seq for seq, _, uuid in live}
        self._all = live
        self._by_status, self._by_name, self._by_parent = {}, {}, {}
        self._live, self._at = {}, {}
        self._indexed = 0

    def _forget(self, uuid: str) -> None:
        """The entry of ``uuid`` in the status lists is no longer current."""
        at = self._at.pop(uuid, None)
        if at is not None:
            self._live[at[0]].kill(at[1])

    async def query(self, query: RecordQuery) -> RecordPage:
        """See :class:`qtasks.components.StorageQuery`; the cursor is a write sequence
        number."""
        self._check()
        query = query.checked()
        self._expire()
        self._catch_up()
        if query.parent_uuid is not None:
            entries = self._by_parent.get(query.parent_uuid, [])
        elif query.task_name is not None:
            entries = self._by_name.get(query.task_name, [])
        elif query.status is not None:
            entries = self._by_status.get(query.status, [])
        else:
            entries = self._all
        end = len(entries)
        if query.cursor is not None:
            end = bisect.bisect_left(entries, _cursor_seq(query.cursor), key=_seq)
        if query.until is not None:
            end = min(end, bisect.bisect_left(entries, query.until, key=_time))
        since = -math.inf if query.since is None else query.since
        prefix = query.uuid_prefix or ""
        found: list[TaskRecord] = []
        if prefix and query.cursor is None:
            exact = self._exact(prefix, query, since)
            if exact is not None:
                found.append(exact)
        budget = SCAN_BUDGET if query.scan_budget is None else query.scan_budget
        deadline = time.monotonic() + budget
        position, scanned = end, 0
        while position > 0 and len(found) < query.limit:
            if scanned == _SCAN:
                if found or time.monotonic() >= deadline:
                    break
                await anyio.lowlevel.checkpoint()  # the lists only grow or are replaced
                scanned = 0
            position -= 1
            scanned += 1
            seq, at, uuid = entries[position]
            if at < since:
                return RecordPage(found)
            facts = self._records.facts(uuid)
            if (
                facts is None
                or self._seq_of.get(uuid) != seq
                or (query.status is not None and facts[0] is not query.status)
                or (query.task_name is not None and facts[1] != query.task_name)
                or (query.parent_uuid is not None and facts[2] != query.parent_uuid)
                or not uuid.startswith(prefix)
                or uuid == prefix  # looked up on the first page
            ):
                continue
            record = self._records.copy_of(uuid)
            assert record is not None
            found.append(record)
        if position == 0:
            return RecordPage(found)
        # Entries before ``position`` are left; a cursor names the seq they are below.
        below = entries[position][0] if position < end else entries[position - 1][0] + 1
        return RecordPage(found, f"m:{below}")

    def _exact(self, uuid: str, query: RecordQuery, since: float) -> TaskRecord | None:
        """The record ``uuid`` when it matches every filter of ``query`` (its index time
        found in ``_all`` by its write sequence number)."""
        facts = self._records.facts(uuid)
        seq = self._seq_of.get(uuid)
        if facts is None or seq is None:
            return None
        status, task_name, parent_uuid, _ = facts
        at = self._all[bisect.bisect_left(self._all, seq, key=_seq)][1]
        if (
            (query.status is not None and status is not query.status)
            or (query.task_name is not None and task_name != query.task_name)
            or (query.parent_uuid is not None and parent_uuid != query.parent_uuid)
            or at < since
            or (query.until is not None and at >= query.until)
        ):
            return None
        return self._records.copy_of(uuid)

    async def count(
        self, status: TaskStatus, since: float | None = None, until: float | None = None
    ) -> int:
        """See :class:`qtasks.components.StorageQuery`: two binary searches for the time
        range, then the live entries in it are counted in O(log n) (:class:`LiveCounts`)."""
        self._check()
        self._expire()
        self._catch_up()
        entries = self._by_status.get(status, [])
        end = len(entries) if until is None else bisect.bisect_left(entries, until, key=_time)
        start = 0 if since is None else bisect.bisect_left(entries, since, key=_time)
        live = self._live.get(status)
        return 0 if live is None else live.live(start, end)


_CURSOR_DIGITS = 20
"""Most digits of a cursor's sequence number (a write counter: under 2**64)."""


def _cursor_seq(cursor: str) -> int:
    kind, _, seq = cursor.partition(":")
    # isascii: str.isdigit() holds for "²" and "٣", which int() refuses or reads as digits.
    # The length: int() refuses more than 4,300 digits (ValueError), and no counter has 21.
    if kind != "m" or not (seq.isascii() and seq.isdigit() and len(seq) <= _CURSOR_DIGITS):
        raise InvalidQueryError(f"cursor {cursor!r} was not made by a MemoryStorage")
    return int(seq)
