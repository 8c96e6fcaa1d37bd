"""The begin step's round trips: :class:`BeginBatch` begins the records of tasks that start
together in one call (:class:`~qtasks.components.BeginMany`).

A task that starts alone is begun at once, with :meth:`Storage.begin`, as without batching;
tasks that start while that call is in flight wait for it and go together in the next call,
made by the first of them. No task waits for a timer or a serving task, so a lone task pays
nothing, and a burst of queued work (a worker starting on a full queue, or busy runners
taking the tasks that waited in its prefetch) pays one round trip per batch.
"""

from __future__ import annotations

from typing import cast

import anyio

from qtasks.components import BeginMany, Storage, provides
from qtasks.errors import SerializationError
from qtasks.memory.signals import EventFactory
from qtasks.record import TaskRecord

BEGIN_BATCH = 256
"""Most records begun in one call."""


class _Waiter:
    """A task waiting for its record to be begun in the shared call of a :class:`BeginBatch`."""

    __slots__ = ("batch", "error", "event", "record", "result")

    def __init__(self, record: TaskRecord, event: anyio.Event) -> None:
        self.record = record
        self.event = event
        self.result: TaskRecord | None = None
        self.error: BaseException | None = None
        self.batch: list[_Waiter] | None = None
        """Set on the first waiter of a batch: it makes the call for all of them."""


class BeginBatch:
    """Begins task records for a worker, many per round trip when they start together."""

    __slots__ = ("_busy", "_many", "_new_event", "_queue", "storage")

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._new_event = EventFactory()  # a waiter's event: anyio.Event() costs ~4 us
        self._many = cast(BeginMany, storage) if provides(storage, BeginMany) else None
        self._busy = False
        self._queue: list[_Waiter] = []

    async def begin(self, claim: TaskRecord) -> TaskRecord:
        """:meth:`Storage.begin` of ``claim`` (publish generation 0), shared with the tasks
        starting meanwhile."""
        if self._many is None:
            return await self.storage.begin(claim)
        if not self._busy:
            self._busy = True
            try:
                return await self.storage.begin(claim)
            finally:
                self._pass_on()
        waiter = _Waiter(claim, self._new_event())
        self._queue.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if not waiter.event.is_set():
                self._queue.remove(waiter)
                raise
            if waiter.batch is not None:  # chosen to lead: the others must not be stranded
                await self._lead(waiter.batch)
            raise
        if waiter.batch is not None:
            await self._lead(waiter.batch)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.result is not None
        return waiter.result

    def _pass_on(self) -> None:
        """The call in flight ended: the tasks that queued meanwhile go in the next one."""
        if not self._queue:
            self._busy = False
            return
        batch = self._queue[:BEGIN_BATCH]
        del self._queue[:BEGIN_BATCH]
        batch[0].batch = batch
        batch[0].event.set()

    async def _lead(self, batch: list[_Waiter]) -> None:
        assert self._many is not None
        try:
            with anyio.CancelScope(shield=True):
                try:
                    results = await self._many.begin_many([w.record for w in batch])
                except SerializationError:
                    # One record cannot be read: begin each alone, so only its task fails.
                    for w in batch:
                        await self._one(w)
                except Exception as exc:
                    for w in batch:
                        w.error = exc
                else:
                    for w, result in zip(batch, results, strict=True):
                        w.result = result
        finally:
            for w in batch:
                w.event.set()
            self._pass_on()

    async def _one(self, waiter: _Waiter) -> None:
        try:
            waiter.result = await self.storage.begin(waiter.record)
        except Exception as exc:
            waiter.error = exc
