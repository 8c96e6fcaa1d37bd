"""The in-memory broker: priorities, delays, leases, redelivery and dead letters.

Over ~700 lines: one class that implements the broker protocol and every optional capability
the core's own tests run through (claim and begin, dead letters, stats, bulk), as Redis does.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import json
import logging
import re
import time
import uuid as uuid_mod
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Self, cast

import anyio

from qtasks.components import (
    BrokerStats,
    Buried,
    Counting,
    DeadLetter,
    Delivery,
    Ended,
    Storage,
    WorkflowStore,
    alone_from,
    provides,
)
from qtasks.config import QueueConfig, own_option
from qtasks.errors import ComponentError
from qtasks.memory.signals import _Lifecycle, _Signal
from qtasks.memory.storage import MemoryStorage
from qtasks.messages import Envelope
from qtasks.record import TaskRecord, TaskStatus

log = logging.getLogger("qtasks")

RETELL_CAP = 5.0
"""Longest pause, in seconds, before a dead letter's notice whose telling returned False
(its record not written) is told again."""


@dataclass(slots=True)
class _Entry:
    id: str
    body: bytes
    priority: int
    attempt: int = 0
    token: str = ""
    lease_until: float = 0.0
    due: float = 0.0
    """When it is delayed, until when (0: not delayed)."""


class _ReadyQueue:
    """The messages ready to be claimed: lowest priority first, in the order they became
    ready within a priority. A deque per priority and a heap of the priorities: a message
    costs O(1) where few priorities are in use (one heap of every message cost log n tuple
    comparisons, with a long queue, for each one)."""

    __slots__ = ("_by_priority", "_priorities")

    def __init__(self) -> None:
        self._by_priority: dict[int, deque[_Entry]] = {}
        self._priorities: list[int] = []

    def push(self, entry: _Entry) -> None:
        queue = self._by_priority.get(entry.priority)
        if queue is None:
            queue = self._by_priority[entry.priority] = deque()
            heapq.heappush(self._priorities, entry.priority)
        queue.append(entry)

    def pop(self) -> _Entry | None:
        """The next entry, or ``None`` when there is none."""
        priorities, by_priority = self._priorities, self._by_priority
        while priorities:
            queue = by_priority[priorities[0]]
            if queue:
                return queue.popleft()
            del by_priority[heapq.heappop(priorities)]
        return None

    def __iter__(self) -> Iterator[_Entry]:
        for queue in self._by_priority.values():
            yield from queue

    def clear(self) -> None:
        self._by_priority.clear()
        self._priorities.clear()


class MemoryDelivery:
    """A delivery from :class:`MemoryBroker`."""

    __slots__ = ("_attempt", "_broker", "_entry", "_token", "begun")

    def __init__(self, broker: MemoryBroker, entry: _Entry) -> None:
        self._broker = broker
        self._entry = entry
        self._token = entry.token
        self._attempt = entry.attempt
        self.begun: TaskRecord | None = None
        """The record as begun with the claim (:meth:`MemoryBroker.consume_begun`)."""

    @property
    def id(self) -> str:
        return self._entry.id

    @property
    def body(self) -> bytes:
        return self._entry.body

    @property
    def priority(self) -> int:
        return self._entry.priority

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def token(self) -> str:
        return self._token

    @property
    def held_until(self) -> float:
        """See :class:`~qtasks.components.LeaseDeadline`: the lease's end, 0 once it is not
        this delivery's."""
        entry = self._broker._inflight.get(self._token)
        return 0.0 if entry is None else entry.lease_until

    async def ack(self) -> bool:
        return self._broker._settle(self._token) is not None

    async def nack(self, reason: str) -> bool:
        entry = self._broker._settle(self._token)
        if entry is None:
            return False
        self._broker._dead(entry, reason)
        return True

    async def requeue(
        self, *, delay: float | None = None, body: bytes | None = None, count: Counting = "reset"
    ) -> bool:
        entry = self._broker._settle(self._token)
        if entry is None:
            return False
        if count == "reset":
            entry.attempt = 0
        elif count == "earlier":
            entry.attempt -= 1
        if body is not None:
            entry.body = body
        self._broker._schedule(entry, self._broker._clock() + delay if delay else None)
        return True

    async def extend(self) -> bool:
        broker = self._broker
        entry = broker._inflight.get(self._token)
        if entry is not None and entry.lease_until <= time.monotonic():
            # Expired: lost, even if no consumer looked yet (its loop may have been blocked).
            broker._promote()
            broker._wake()
            return False
        if entry is None:
            return False
        entry.lease_until = time.monotonic() + self._broker._lease
        heapq.heappush(self._broker._leases, (entry.lease_until, self._token))
        return True


_Begin = tuple[MemoryStorage, str, Callable[[], int], Callable[[Sequence[str]], None] | None]
"""What a claim that begins records needs: storage, worker, ``starts``, ``published``."""


class MemoryBroker(_Lifecycle):
    """A priority queue with delays, leases and a dead-letter list, in process memory."""

    local = True
    """Calls complete without I/O (see :mod:`qtasks.components`)."""

    def __init__(
        self,
        *,
        lease: float | None = None,
        max_deliveries: int | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``lease`` and ``max_deliveries`` win over the configuration's (see
        :class:`~qtasks.components.LeaseLength`, :class:`~qtasks.components.DeliveryLimit`),
        checked as those settings are (:class:`~qtasks.errors.ConfigError`). ``clock`` returns
        the unix time that delays are measured against (default :func:`time.time`); tests pass
        a controllable one and call :meth:`wake` after moving it. Leases always run on the real
        monotonic clock."""
        self._clock: Callable[[], float] = clock or time.time
        self._lease_opt = own_option("lease", lease, "MemoryBroker")
        self._max_opt = own_option("max_deliveries", max_deliveries, "MemoryBroker")
        self._lease = self._lease_opt if self._lease_opt is not None else 30.0
        self._max_deliveries = self._max_opt if self._max_opt is not None else 5
        self._ready = _ReadyQueue()
        self.consumers = 0
        """How many consumers take messages now (a worker serving: see
        :func:`qtasks.local_wait.explained`)."""
        self._delayed: list[tuple[float, int, _Entry]] = []
        self._leases: list[tuple[float, str]] = []
        self._inflight: dict[str, _Entry] = {}
        self._known: dict[str, _Entry] = {}
        self._dead_letters: OrderedDict[str, DeadLetter] = OrderedDict()
        """In the order they died, oldest first."""
        self._dead_ttl: float | None = None
        self._dead_unordered = False
        """Whether a dead letter died before one that died earlier (an injected clock set back)."""
        self._max_dead: int | None = None
        self._seq = itertools.count()
        self._tokens = itertools.count(1)
        self._token_prefix = uuid_mod.uuid4().hex[:12] + "-"
        self._signal: _Signal | None = None
        self._ever_consumed = False
        """Whether a consumer ever took from this broker (else its last stop warns about the
        messages left: see :meth:`_left_unserved`)."""
        self._watched: dict[str, anyio.Event] = {}
        """Token -> set when that delivery is settled: a suspect's consumer waits for it."""

    @classmethod
    def from_config(cls, config: QueueConfig) -> Self:
        return cls()

    @property
    def lease(self) -> float:
        """See :class:`~qtasks.components.LeaseLength`: ``lease=``, else ``config.lease``."""
        return self._lease

    @property
    def max_deliveries(self) -> int:
        """See :class:`~qtasks.components.DeliveryLimit`: ``max_deliveries=``, else
        ``config.max_deliveries``."""
        return self._max_deliveries

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        self._begin(stack)
        _in_use.add(self)
        self._lease = self._lease_opt if self._lease_opt is not None else config.lease
        self._max_deliveries = self._max_opt if self._max_opt is not None else config.max_deliveries
        self._dead_ttl = config.dead_letter_ttl
        self._max_dead = config.max_dead_letters
        if self._signal is None:
            self._signal = _Signal()

    def unserved(self) -> int:
        """How many messages this broker holds if no consumer ever took from it (else 0):
        what a process that enqueued without serving leaves behind (see :func:`_at_exit`)."""
        if self._ever_consumed:
            return 0
        return sum(1 for _ in self._ready) + len(self._delayed)

    def _wake(self) -> None:
        if self._signal is not None:
            self._signal.fire()

    def wake(self) -> None:
        """Make waiting consumers re-check what is due now (after an injected clock moved)."""
        self._wake()

    def due(self, id: str) -> float | None:
        """When the message ``id``, queued with a delay, becomes due (unix time on the
        broker's clock); ``None`` when no such message waits for its time. For the testing
        harness, which moves its clock there: a workflow step published by a worker with a
        ``delay`` has no ``eta`` in its record."""
        entry = self._known.get(id)
        if entry is None or entry.token or entry.due <= self._clock():
            return None
        return entry.due

    def holds(self, id: str) -> bool:
        """Whether a message ``id`` is queued, delayed or in flight (for the testing harness:
        a workflow step still waiting in its gate has none)."""
        return id in self._known

    def _schedule(self, entry: _Entry, eta: float | None) -> None:
        self._known[entry.id] = entry
        if eta is not None and eta > self._clock():
            entry.due = eta
            heapq.heappush(self._delayed, (eta, next(self._seq), entry))
        else:
            entry.due = 0.0
            self._ready.push(entry)
        self._wake()

    def _settle(self, token: str) -> _Entry | None:
        entry = self._inflight.pop(token, None)
        if entry is not None:
            self._known.pop(entry.id, None)
            entry.token = ""
            if self._watched:
                watched = self._watched.pop(token, None)
                if watched is not None:
                    watched.set()
        return entry

    async def _settled_or_lost(self, entry: _Entry, token: str) -> None:
        """Until the delivery ``token`` of ``entry`` is settled, or lost (its lease ran out
        unrenewed). Woken by the settle; the deadline is its lease's, read again after each
        renewal."""
        settled = self._watched[token] = anyio.Event()
        try:
            while self._inflight.get(token) is entry and not settled.is_set():
                left = entry.lease_until - time.monotonic()
                if left <= 0:
                    return
                with anyio.move_on_after(left):
                    await settled.wait()
        finally:
            self._watched.pop(token, None)

    def _dead(self, entry: _Entry, reason: str) -> None:
        self._known.pop(entry.id, None)
        letters = self._dead_letters
        letters.pop(entry.id, None)  # dead again: it is the newest now
        now = self._clock()
        if letters and next(reversed(letters.values())).dead_at > now:
            self._dead_unordered = True
        letters[entry.id] = DeadLetter(
            id=entry.id,
            body=entry.body,
            reason=reason,
            priority=entry.priority,
            deliveries=entry.attempt,
            dead_at=now,
        )
        self._prune_dead()

    def _prune_dead(self) -> None:
        """Drop the dead letters over ``max_dead_letters`` and those older than
        ``dead_letter_ttl``, oldest first."""
        letters = self._dead_letters
        if self._max_dead is not None:
            while len(letters) > self._max_dead:
                letters.popitem(last=False)
        if self._dead_ttl is not None:
            cutoff = self._clock() - self._dead_ttl
            while letters and next(iter(letters.values())).dead_at <= cutoff:
                letters.popitem(last=False)

    def _live_dead_letters(self) -> OrderedDict[str, DeadLetter]:
        """The dead letters, pruned first; one that died out of order (an injected clock set
        back) and expired is dropped too."""
        self._prune_dead()
        letters = self._dead_letters
        if self._dead_ttl is not None and self._dead_unordered:
            cutoff = self._clock() - self._dead_ttl
            for id in [id for id, letter in letters.items() if letter.dead_at <= cutoff]:
                del letters[id]
        return letters

    def _promote(self) -> float | None:
        """Move due delayed messages and expired leases to ready; return the next deadline."""
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, entry = heapq.heappop(self._delayed)
            if self._known.get(entry.id) is entry:
                self._ready.push(entry)
        mono = time.monotonic()
        while self._leases and self._leases[0][0] <= mono:
            _, token = heapq.heappop(self._leases)
            held = self._inflight.get(token)
            if held is not None and held.lease_until <= mono:
                del self._inflight[token]
                held.token = ""
                self._ready.push(held)
        waits = []
        if self._delayed:
            waits.append(self._delayed[0][0] - now)
        if self._leases:
            waits.append(self._leases[0][0] - mono)
        return min(waits) if waits else None

    def _take(
        self,
        storage: MemoryStorage | None = None,
        dead: list[TaskRecord] | None = None,
        buried: deque[tuple[str, str]] | None = None,
        ended: deque[TaskRecord] | None = None,
    ) -> _Entry | None:
        """The next due message, now held; past its delivery limit it is dead-lettered
        instead, and with ``storage`` (a claim that begins records) its record says so; the
        records so ended are added to ``ended`` (those of workflow members to ``dead`` too),
        and the id and reason of each dead letter to ``buried``."""
        while (entry := self._ready.pop()) is not None:
            if self._known.get(entry.id) is not entry or entry.token:
                continue  # cancelled, or a stale queue entry
            entry.attempt += 1
            if entry.attempt > self._max_deliveries:
                reason = (
                    f"delivery limit reached: delivered {entry.attempt - 1} times "
                    f"without being settled (max_deliveries={self._max_deliveries})"
                )
                self._dead(entry, reason)
                if buried is not None:
                    buried.append((entry.id, reason))
                if storage is not None:
                    record = storage.dead_claimed(entry.id, reason)
                    if record is not None:
                        if ended is not None:
                            ended.append(record.copy())
                        if record.workflow is not None and dead is not None:
                            dead.append(record)
                continue
            entry.token = f"{self._token_prefix}{next(self._tokens)}"
            entry.lease_until = time.monotonic() + self._lease
            self._inflight[entry.token] = entry
            heapq.heappush(self._leases, (entry.lease_until, entry.token))
            return entry
        return None

    async def publish(self, envelope: Envelope) -> None:
        self._check()
        entry = _Entry(envelope.id, envelope.body, envelope.priority)
        old = self._known.get(entry.id)
        if old is not None and old.token:
            # Same id republished while delivered: keep both semantics simple, the new one wins.
            self._inflight.pop(old.token, None)
        self._schedule(entry, envelope.eta)

    def consume(self, *, prefetch: int) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        return self._consume(None)

    def consume_noticing(
        self, *, prefetch: int, buried: Buried
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        """:meth:`consume`, awaiting ``buried(id, reason)`` for each message it dead-letters
        past ``max_deliveries`` (see :class:`qtasks.components.BuryNotice`)."""
        return self._consume(None, buried)

    def consume_begun(
        self,
        *,
        prefetch: int,
        storage: Storage,
        worker: str,
        starts: Callable[[], int],
        published: Callable[[Sequence[str]], None] | None = None,
        ended: Ended | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        """:meth:`consume`, beginning the record of each message taken while ``starts()``
        says it starts at once (see :class:`qtasks.components.BeginOnClaim`). A workflow
        member a claim dead-letters fails its workflow, whose error step it publishes
        (``published`` gets their ids); ``ended`` gets each record a claim ended."""
        if not isinstance(storage, MemoryStorage):
            raise ComponentError(f"{storage!r} does not share a server with {self!r}")
        return self._consume((storage, worker, starts, published), ended=ended)

    @asynccontextmanager
    async def _consume(
        self,
        begin: _Begin | None,
        notice: Buried | None = None,
        *,
        ended: Ended | None = None,
    ) -> AsyncIterator[AsyncIterator[Delivery]]:
        self._check()
        self._ever_consumed = True
        mine: set[str] = set()
        dead: list[TaskRecord] = []  # workflow members a claim dead-lettered
        buried: deque[tuple[str, str]] | None = None if notice is None else deque()
        told: deque[TaskRecord] | None = None if ended is None else deque()  # records ended
        unhanded = ""  # the token of the one taken and not yielded yet, if any
        retell_at = 0.0  # monotonic: when a notice whose telling returned False is told again
        failures = 0

        async def tell(*, last: bool = False) -> None:
            # Each taken off before it is told: told once, even if the consumer is cancelled
            # while telling it (its exit tells the rest). One for which ``notice`` returns
            # False (its record not written: the storage failed) is kept, first, and told
            # again at the first take or idle wake from ``retell_at`` on, backing off.
            nonlocal retell_at, failures
            if notice is not None and buried and (last or time.monotonic() >= retell_at):
                while buried:
                    id, reason = buried.popleft()
                    if await notice(id, reason) is False:
                        buried.appendleft((id, reason))
                        failures += 1
                        retell_at = time.monotonic() + min(RETELL_CAP, 0.1 * 2**failures)
                        break
                else:
                    failures = 0
            if ended is not None and told is not None:
                while told:
                    await ended(told.popleft())

        async def deliveries() -> AsyncIterator[MemoryDelivery]:
            nonlocal unhanded
            signal = self._signal
            assert signal is not None
            storage = None if begin is None else begin[0]
            while True:
                next_due = self._promote()
                entry = self._take(storage, dead, buried, told)
                if entry is not None:  # held from here: handed back at exit if not yielded
                    mine.add(entry.token)
                    unhanded = entry.token
                members = bool(dead)  # workflow members ended: their error steps published
                if dead:  # only with a storage: begin is set
                    assert begin is not None
                    await self._fail_members(begin[0], dead, begin[3])
                if buried or told:
                    await tell()
                if members and entry is None:
                    continue  # what it published may be due now: take again
                if entry is None:
                    if buried:  # a notice to tell again
                        due = max(retell_at - time.monotonic(), 0.0)
                        next_due = due if next_due is None else min(next_due, due)
                    await signal.wait(next_due)
                    continue
                delivery = MemoryDelivery(self, entry)
                if begin is not None:
                    storage, worker, starts, _ = begin
                    if starts() > 0:
                        delivery.begun = storage.begin_claimed(
                            entry.id, entry.token, worker, _body_attempt(entry.body)
                        )
                unhanded = ""
                yield delivery
                if delivery.attempt >= alone_from(self._max_deliveries):
                    # A suspect (on one of its last two allowed deliveries, the earlier ones
                    # lost with their holders): nothing more is taken until it is settled or
                    # lost, so that, should it kill the worker again, nothing taken beside it
                    # pays for it.
                    await self._settled_or_lost(entry, delivery.token)

        self.consumers += 1
        try:
            yield deliveries()
        finally:
            self.consumers -= 1
            if buried or told:
                with anyio.CancelScope(shield=True):
                    await tell(last=True)
            # A notice still untold is dropped, its record left new/process until its TTL:
            # it lived in this consumer only (its message is in the dead letters).
            for id, _ in buried or ():
                log.error(
                    "the record of dead-lettered message %s could not be ended (its notice "
                    "kept failing until the consumer closed)",
                    id,
                )
            for token in mine:
                entry = self._inflight.pop(token, None)
                if entry is not None:
                    entry.token = ""
                    if token == unhanded:  # never handed to the worker: not an attempt
                        entry.attempt -= 1
                    self._ready.push(entry)
            if mine:
                self._wake()

    async def _fail_members(
        self,
        storage: MemoryStorage,
        dead: list[TaskRecord],
        published: Callable[[Sequence[str]], None] | None,
    ) -> None:
        """Each workflow member in ``dead`` fails its workflow (as on Redis, in the claim's
        step): what its error gate opens is published."""
        ids: list[str] = []
        while dead:
            await self._continue(storage, dead.pop(), False, ids)
        if ids and published is not None:
            published(ids)

    # --- SharedServer: the in-memory broker and storage share one "server", the process ----

    def shares_server_with(self, storage: Storage) -> bool:
        """Every :class:`MemoryStorage` lives in this process, as this broker does."""
        return isinstance(storage, MemoryStorage)

    async def publish_new(self, envelope: Envelope, storage: Storage, record: TaskRecord) -> None:
        """See :class:`qtasks.components.SharedServer`: add, then publish."""
        await storage.add(record)
        await self.publish(envelope)

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        """See :class:`qtasks.components.BulkPublish`."""
        for envelope in envelopes:
            await self.publish(envelope)

    async def publish_new_many(
        self,
        storage: Storage,
        tasks: Sequence[tuple[TaskRecord, Envelope]],
        *,
        after: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """See :class:`qtasks.components.BulkPublishNew` (nothing to build before ``after``)."""
        if after is not None:
            await after()
        for record, envelope in tasks:
            await self.publish_new(envelope, storage, record)

    async def ack_final(
        self,
        delivery: Delivery,
        storage: Storage,
        record: TaskRecord,
        *,
        enqueued: list[str] | None = None,
    ) -> bool:
        """See :class:`qtasks.components.SharedServer`: save fenced by the delivery's token;
        ack when saved, or when refused only because the task already ended. A workflow
        member's workflow is continued between the save and the ack, with nothing awaited
        in between that could let another task interleave."""
        self._check()
        member = record.workflow is not None and provides(storage, WorkflowStore)
        was = await storage.get(record.uuid) if member else None
        if await storage.save(record, fence=delivery.token):
            if member:
                # Saved over a final record (a cancel made while it ran, whose workflow
                # app.cancel told already): a repeat, which publishes only what was not sent.
                again = was is not None and was.status.final
                await self._continue(storage, record, again, enqueued)
            await delivery.ack()
            return True
        stored = await storage.get(record.uuid)
        if stored is not None and stored.status.final and stored.token in (None, delivery.token):
            await delivery.ack()
        return False

    async def _continue(
        self,
        storage: Storage,
        record: TaskRecord,
        again: bool,
        enqueued: list[str] | None,
    ) -> None:
        """Count ``record``'s member in its workflow and publish what that opened; with
        ``again``, only the steps still ``new`` whose message is not here already (as Redis's
        settle script does)."""
        store = cast(WorkflowStore, storage)  # ack_final checked it
        now = self._clock()
        for m in await store.member_done(record):
            if again:
                step = await storage.get(m.id)
                if step is None or step.status is not TaskStatus.NEW or m.id in self._known:
                    continue
            await self.publish(Envelope(m.id, m.body, m.priority, now + m.delay))
            if enqueued is not None:
                enqueued.append(m.id)

    async def ack_finals(
        self,
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        *,
        enqueued: list[str] | None = None,
    ) -> list[bool]:
        """See :class:`qtasks.components.SharedServer`."""
        return [
            await self.ack_final(delivery, storage, record, enqueued=enqueued)
            for delivery, record in finals
        ]

    async def ack_finals_begin(
        self,
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        begins: Sequence[TaskRecord],
        *,
        enqueued: list[str] | None = None,
    ) -> tuple[list[bool], list[TaskRecord | None]]:
        """See :class:`qtasks.components.SettleBegin`: a claim whose delivery this broker no
        longer holds (its lease ran out and another delivery took the message) is not begun."""
        saved = await self.ack_finals(storage, finals, enqueued=enqueued)
        begun: list[TaskRecord | None] = []
        for claim in begins:
            entry = self._known.get(claim.uuid)
            if entry is not None and entry.token != claim.token:
                begun.append(await storage.get(claim.uuid))
            else:
                begun.append(await storage.begin(claim))
        return saved, begun

    async def extend_many(self, deliveries: Sequence[Delivery]) -> list[bool]:
        """See :class:`qtasks.components.LeaseBatch`."""
        self._check()
        return [await delivery.extend() for delivery in deliveries]

    def consume_stalled(self) -> float:
        """Always ``0.0``: the in-memory queue has no server to lose (see
        :class:`~qtasks.components.ConsumeHealth`)."""
        return 0.0

    async def cancel(self, id: str) -> bool:
        self._check()
        entry = self._known.get(id)
        if entry is None or entry.token:
            return False
        del self._known[id]
        return True

    async def bring_forward(self, id: str) -> bool:
        """See :class:`~qtasks.components.BringForward`."""
        self._check()
        entry = self._known.get(id)
        if entry is None or entry.token or entry.due <= self._clock():
            return False
        # A fresh entry: the one left in the delayed heap is stale from now on (not known).
        self._schedule(_Entry(entry.id, entry.body, entry.priority, entry.attempt), None)
        return True

    async def stats(self) -> BrokerStats:
        self._check()
        self._promote()
        by_priority: dict[int, int] = {}
        for entry in self._ready:
            if self._known.get(entry.id) is entry and not entry.token:
                by_priority[entry.priority] = by_priority.get(entry.priority, 0) + 1
        delayed = sum(1 for _, _, e in self._delayed if self._known.get(e.id) is e)
        dead = len(self._live_dead_letters())
        return BrokerStats(by_priority, delayed, len(self._inflight), dead)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        self._check()
        return sorted(self._live_dead_letters().values(), key=lambda d: d.dead_at)[:limit]

    async def flush(self) -> int:
        """Drop every message (ready, delayed, in flight) and dead letter; return how many.
        Only for ``app.flush_all``, which refuses while a worker serves."""
        self._check()
        count = len(self._known) + len(self._dead_letters)
        for pending in (self._ready, self._delayed, self._leases):
            pending.clear()
        self._inflight.clear()
        self._known.clear()
        self._dead_letters.clear()
        self._dead_unordered = False
        return count

    async def requeue_dead_letters(self, ids: list[str] | None = None) -> int:
        self._check()
        letters = self._live_dead_letters()
        chosen = list(letters) if ids is None else ids
        count = 0
        for id in chosen:
            letter = letters.pop(id, None)
            if letter is not None:
                self._schedule(_Entry(letter.id, letter.body, letter.priority), None)
                count += 1
        return count

    async def purge_dead_letters(self, ids: list[str] | None = None) -> int:
        """Delete dead letters for good (all when ``ids`` is None); return how many. See
        :mod:`qtasks.components` (an optional broker member)."""
        self._check()
        letters = self._live_dead_letters()
        chosen = list(letters) if ids is None else ids
        return sum(1 for id in chosen if letters.pop(id, None) is not None)


_ATTEMPT_KEY = b'"attempt":'
_ATTEMPT = re.compile(re.escape(_ATTEMPT_KEY) + rb"(\d+)[,}]")


def _body_attempt(body: bytes) -> int | None:
    """The ``attempt`` of a JSON message body, or ``None`` when the body is not one.

    A body the core's JSON codec wrote (compact, starting ``{"v":``, the key ``attempt`` in
    its top-level object) that holds the key once is read without parsing it: that one is
    the top-level field (inside a JSON string a quote is escaped, so the bytes
    ``"attempt":`` are only ever a key). Any other body is parsed: a tenth of the cost for
    the message of nearly every task claimed and begun at once."""
    if body.startswith(b'{"v":') and body.count(_ATTEMPT_KEY) == 1:
        match = _ATTEMPT.search(body)
        if match is not None:
            return int(match[1])
    try:
        attempt = json.loads(body).get("attempt")
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        return None  # not a message (too deep to parse, even): the worker rejects it
    return attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None


_in_use: weakref.WeakSet[MemoryBroker] = weakref.WeakSet()
"""The in-memory brokers started in this process (see :func:`_at_exit`)."""


@atexit.register
def _at_exit() -> None:
    """Warn, as the process exits, about the messages of an in-memory broker that no worker
    ever took: they die with the process. A script that enqueued without serving (no ``with
    app:``) and without waiting (``timeout=``) ended with its tasks never run, without a
    word. (At the exit, not when the broker stops: an app started again in another event
    loop serves what an earlier loop enqueued.)"""
    for broker in list(_in_use):
        waiting = broker.unserved()
        if waiting:
            log.warning(
                "the process exits with %d task message(s) in an in-memory broker that no "
                "worker ever served: they never ran, and in-memory messages live only in this "
                "process. Serve in this process (with app:, async with app:, "
                "app.run_forever()), or give the app a shared broker (Redis, RabbitMQ) and run "
                "a worker with qtasks run",
                waiting,
            )
