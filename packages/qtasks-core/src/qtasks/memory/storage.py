"""The in-memory storage: records with fenced writes, woken waiters and live steps."""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any, Self

import anyio
import anyio.abc

from qtasks.config import QueueConfig
from qtasks.errors import TaskTimeoutError
from qtasks.memory.signals import _Lifecycle, _Signal
from qtasks.record import TaskRecord, TaskStatus


class MemoryStorage(_Lifecycle):
    """Task records in a dict, with woken waiters and live generator steps."""

    local = True
    """Calls complete without I/O (see :mod:`qtasks.components`)."""

    def __init__(self, *, clock: Callable[[], float] | None = None) -> None:
        """``clock`` returns the unix time that ``result_ttl`` is measured against (default
        :func:`time.time`), so tests can move time forward."""
        self._clock: Callable[[], float] = clock or time.time
        self._records: dict[str, TaskRecord] = {}
        self._steps: dict[str, list[Any]] = {}
        self._signals: dict[str, _Signal] = {}
        self._watchers: dict[str, int] = {}
        self._expiry: list[tuple[float, str]] = []
        self._ttl: float | None = None
        self._cancel_followers: list[Callable[[str, str], None]] = []

    @classmethod
    def from_config(cls, config: QueueConfig) -> Self:
        return cls()

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        self._begin(stack)
        self._ttl = config.result_ttl

    def _expire(self) -> None:
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, uuid = heapq.heappop(self._expiry)
            record = self._records.get(uuid)
            if (
                record is not None
                and record.status.final
                and record.updated_at + (self._ttl or math.inf) <= now
            ):
                del self._records[uuid]
                self._steps.pop(uuid, None)

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
            self._records[record.uuid] = record.copy()

    async def get(self, uuid: str) -> TaskRecord | None:
        self._check()
        self._expire()
        record = self._records.get(uuid)
        return record.copy() if record is not None else None

    async def begin(self, record: TaskRecord) -> TaskRecord:
        self._check()
        stored = self._records.get(record.uuid)
        if stored is None:
            stored = record.copy()
            stored.updated_at = self._clock()
            self._records[record.uuid] = stored
            return stored.copy()
        if stored.status.final:
            return stored.copy()
        stored.status = record.status
        stored.attempt = record.attempt
        stored.token = record.token
        stored.worker = record.worker
        stored.updated_at = self._clock()
        return stored.copy()

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
            stored.status = TaskStatus.PROCESS
            stored.token = token
            stored.worker = worker
            if attempt is not None:
                stored.attempt = attempt + 1
            stored.updated_at = self._clock()
        return stored.copy()

    async def save(self, record: TaskRecord, *, fence: str | None = None) -> bool:
        self._check()
        stored = self._records.get(record.uuid)
        if stored is not None:
            if fence is not None and stored.token not in (None, fence):
                return False
            if stored.status.final and stored.status is not record.status:
                return False  # final is final: a cancel made while the task ran stays
        self._records[record.uuid] = record.copy()
        if record.status.final:
            if self._ttl is not None:
                heapq.heappush(self._expiry, (record.updated_at + self._ttl, record.uuid))
            self._fire(record.uuid)
        return True

    async def cancel(self, uuid: str, reason: str) -> TaskRecord | None:
        self._check()
        stored = self._records.get(uuid)
        if stored is None:
            return None
        if not stored.status.final:
            running = stored.status is TaskStatus.PROCESS
            stored.status = TaskStatus.CANCEL
            stored.cancel_reason = reason
            stored.updated_at = self._clock()
            self._fire(uuid)
            if running:
                for follower in list(self._cancel_followers):
                    follower(uuid, reason)
        return stored.copy()

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
                record = self._records.get(uuid)
                if record is not None and record.status.final:
                    return record.copy()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TaskTimeoutError(uuid, timeout)
                await signal.wait(left)
        finally:
            self._unwatch(uuid)

    async def add_step(self, uuid: str, value: Any) -> int:
        self._check()
        steps = self._steps.setdefault(uuid, [])
        steps.append(value)
        record = self._records.get(uuid)
        if record is not None:
            record.steps = len(steps)
        self._fire(uuid)
        return len(steps) - 1

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
                record = self._records.get(uuid)
                if record is None or record.status.final:
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
        for record in self._records.values():
            counts[record.status.value] = counts.get(record.status.value, 0) + 1
        return counts

    async def flush(self) -> int:
        """Drop every record and step; return how many records (for ``app.flush_all``)."""
        count = len(self._records)
        self._records.clear()
        self._steps.clear()
        self._expiry.clear()
        return count
