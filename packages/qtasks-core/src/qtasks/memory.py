"""In-memory Broker, Storage and GlobalConfig: a real backend for one process.

They implement the full contract of :mod:`qtasks.components` (priorities, delays, leases,
redelivery, dead letters, fenced writes, woken waiters) and pass the same contract suites as the
Redis and RabbitMQ backends. All state lives in the event loop that started them: use them from
that loop (the sync app does so through its portal).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Self

import anyio
import anyio.abc

from qtasks.components import BrokerStats, DeadLetter, Delivery, Storage
from qtasks.config import QueueConfig
from qtasks.errors import ComponentNotStartedError, TaskTimeoutError
from qtasks.messages import Envelope
from qtasks.record import TaskRecord, TaskStatus


class EventFactory:
    """Makes ``anyio.Event`` objects for hot paths: ``anyio.Event()`` looks up the running
    async library on every call (about as long as the rest of a wake-up); this looks it up
    once, on the first event, and then builds the backend's event class directly."""

    __slots__ = ("_cls",)

    def __init__(self) -> None:
        self._cls: type[anyio.Event] | None = None

    def __call__(self) -> anyio.Event:
        cls = self._cls
        if cls is None:
            event = anyio.Event()
            self._cls = type(event)
            return event
        return cls()


class _Signal:
    """A re-armable wake-up: waiters sleep until :meth:`fire` or a deadline.

    The event is only created when somebody waits, so firing with no waiter costs nothing.
    """

    __slots__ = ("_event", "_new_event")

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self._new_event = EventFactory()

    def fire(self) -> None:
        event = self._event
        if event is not None:
            self._event = None
            event.set()

    async def wait(self, timeout: float | None) -> None:
        if self._event is None:
            self._event = self._new_event()
        event = self._event
        if timeout is None:
            await event.wait()
            return
        with anyio.move_on_after(max(timeout, 0)):
            await event.wait()


class _Lifecycle:
    """Reference-counted start/stop, per the contract: several apps may share a component."""

    _starts = 0

    def _begin(self, stack: AsyncExitStack) -> bool:
        """Count a start; ``True`` for the first one (which must set the component up)."""
        self._starts += 1
        stack.callback(self._end)
        return self._starts == 1

    def _end(self) -> None:
        self._starts -= 1

    def _check(self) -> None:
        if self._starts <= 0:
            raise ComponentNotStartedError(
                f"{type(self).__name__} used before start() or after its stop"
            )


@dataclass(slots=True)
class _Entry:
    id: str
    body: bytes
    priority: int
    attempt: int = 0
    token: str = ""
    lease_until: float = 0.0


class MemoryDelivery:
    """A delivery from :class:`MemoryBroker`."""

    __slots__ = ("_attempt", "_broker", "_entry", "_token")

    def __init__(self, broker: MemoryBroker, entry: _Entry) -> None:
        self._broker = broker
        self._entry = entry
        self._token = entry.token
        self._attempt = entry.attempt

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

    async def ack(self) -> bool:
        return self._broker._settle(self._token) is not None

    async def nack(self, reason: str) -> bool:
        entry = self._broker._settle(self._token)
        if entry is None:
            return False
        self._broker._dead(entry, reason)
        return True

    async def requeue(self, *, delay: float | None = None, body: bytes | None = None) -> bool:
        entry = self._broker._settle(self._token)
        if entry is None:
            return False
        entry.attempt = 0
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
        """``clock`` returns the unix time that delays are measured against (default
        :func:`time.time`); tests pass a controllable one and call :meth:`wake` after moving it.
        Leases always run on the real monotonic clock."""
        self._clock: Callable[[], float] = clock or time.time
        self._lease_opt = lease
        self._max_opt = max_deliveries
        self._lease = lease if lease is not None else 30.0
        self._max_deliveries = max_deliveries if max_deliveries is not None else 5
        self._ready: list[tuple[int, int, _Entry]] = []
        self._delayed: list[tuple[float, int, _Entry]] = []
        self._leases: list[tuple[float, str]] = []
        self._inflight: dict[str, _Entry] = {}
        self._known: dict[str, _Entry] = {}
        self._dead_letters: dict[str, DeadLetter] = {}
        self._seq = itertools.count()
        self._tokens = itertools.count(1)
        self._token_prefix = uuid_mod.uuid4().hex[:12] + "-"
        self._signal: _Signal | None = None

    @classmethod
    def from_config(cls, config: QueueConfig) -> Self:
        return cls()

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        self._begin(stack)
        self._lease = self._lease_opt if self._lease_opt is not None else config.lease
        self._max_deliveries = self._max_opt if self._max_opt is not None else config.max_deliveries
        if self._signal is None:
            self._signal = _Signal()

    def _wake(self) -> None:
        if self._signal is not None:
            self._signal.fire()

    def wake(self) -> None:
        """Make waiting consumers re-check what is due now (after an injected clock moved)."""
        self._wake()

    def _schedule(self, entry: _Entry, eta: float | None) -> None:
        self._known[entry.id] = entry
        if eta is not None and eta > self._clock():
            heapq.heappush(self._delayed, (eta, next(self._seq), entry))
        else:
            heapq.heappush(self._ready, (entry.priority, next(self._seq), entry))
        self._wake()

    def _settle(self, token: str) -> _Entry | None:
        entry = self._inflight.pop(token, None)
        if entry is not None:
            self._known.pop(entry.id, None)
            entry.token = ""
        return entry

    def _dead(self, entry: _Entry, reason: str) -> None:
        self._known.pop(entry.id, None)
        self._dead_letters[entry.id] = DeadLetter(
            id=entry.id,
            body=entry.body,
            reason=reason,
            priority=entry.priority,
            deliveries=entry.attempt,
            dead_at=self._clock(),
        )

    def _promote(self) -> float | None:
        """Move due delayed messages and expired leases to ready; return the next deadline."""
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, entry = heapq.heappop(self._delayed)
            if self._known.get(entry.id) is entry:
                heapq.heappush(self._ready, (entry.priority, next(self._seq), entry))
        mono = time.monotonic()
        while self._leases and self._leases[0][0] <= mono:
            _, token = heapq.heappop(self._leases)
            held = self._inflight.get(token)
            if held is not None and held.lease_until <= mono:
                del self._inflight[token]
                held.token = ""
                heapq.heappush(self._ready, (held.priority, next(self._seq), held))
        waits = []
        if self._delayed:
            waits.append(self._delayed[0][0] - now)
        if self._leases:
            waits.append(self._leases[0][0] - mono)
        return min(waits) if waits else None

    def _take(self) -> _Entry | None:
        while self._ready:
            _, _, entry = heapq.heappop(self._ready)
            if self._known.get(entry.id) is not entry or entry.token:
                continue  # cancelled, or a stale heap entry
            entry.attempt += 1
            if entry.attempt > self._max_deliveries:
                self._dead(
                    entry,
                    f"delivery limit reached: delivered {entry.attempt - 1} times "
                    f"without being settled (max_deliveries={self._max_deliveries})",
                )
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

    @asynccontextmanager
    async def consume(self, *, prefetch: int) -> AsyncIterator[AsyncIterator[MemoryDelivery]]:
        self._check()
        mine: set[str] = set()

        async def deliveries() -> AsyncIterator[MemoryDelivery]:
            signal = self._signal
            assert signal is not None
            while True:
                next_due = self._promote()
                entry = self._take()
                if entry is None:
                    await signal.wait(next_due)
                    continue
                mine.add(entry.token)
                yield MemoryDelivery(self, entry)

        try:
            yield deliveries()
        finally:
            for token in mine:
                entry = self._inflight.pop(token, None)
                if entry is not None:
                    entry.token = ""
                    heapq.heappush(self._ready, (entry.priority, next(self._seq), entry))
            if mine:
                self._wake()

    # --- SharedServer: the in-memory broker and storage share one "server", the process ----

    def shares_server_with(self, storage: Storage) -> bool:
        """Every :class:`MemoryStorage` lives in this process, as this broker does."""
        return isinstance(storage, MemoryStorage)

    async def publish_new(self, envelope: Envelope, storage: Storage, record: TaskRecord) -> None:
        """See :class:`qtasks.components.SharedServer`: add, then publish."""
        await storage.add(record)
        await self.publish(envelope)

    async def ack_final(self, delivery: Delivery, storage: Storage, record: TaskRecord) -> bool:
        """See :class:`qtasks.components.SharedServer`: save fenced by the delivery's token;
        ack when saved, or when refused only because the task already ended."""
        self._check()
        if await storage.save(record, fence=delivery.token):
            await delivery.ack()
            return True
        stored = await storage.get(record.uuid)
        if stored is not None and stored.status.final and stored.token in (None, delivery.token):
            await delivery.ack()
        return False

    async def ack_finals(
        self, storage: Storage, finals: Sequence[tuple[Delivery, TaskRecord]]
    ) -> list[bool]:
        """See :class:`qtasks.components.SharedServer`."""
        return [await self.ack_final(delivery, storage, record) for delivery, record in finals]

    async def extend_many(self, deliveries: Sequence[Delivery]) -> list[bool]:
        """See :class:`qtasks.components.LeaseBatch`."""
        self._check()
        return [await delivery.extend() for delivery in deliveries]

    async def cancel(self, id: str) -> bool:
        self._check()
        entry = self._known.get(id)
        if entry is None or entry.token:
            return False
        del self._known[id]
        return True

    async def stats(self) -> BrokerStats:
        self._check()
        self._promote()
        by_priority: dict[int, int] = {}
        for _, _, entry in self._ready:
            if self._known.get(entry.id) is entry and not entry.token:
                by_priority[entry.priority] = by_priority.get(entry.priority, 0) + 1
        delayed = sum(1 for _, _, e in self._delayed if self._known.get(e.id) is e)
        return BrokerStats(by_priority, delayed, len(self._inflight), len(self._dead_letters))

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        self._check()
        return sorted(self._dead_letters.values(), key=lambda d: d.dead_at)[:limit]

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
        return count

    async def requeue_dead_letters(self, ids: list[str] | None = None) -> int:
        self._check()
        chosen = list(self._dead_letters) if ids is None else ids
        count = 0
        for id in chosen:
            letter = self._dead_letters.pop(id, None)
            if letter is not None:
                self._schedule(_Entry(letter.id, letter.body, letter.priority), None)
                count += 1
        return count


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


class MemoryGlobalConfig(_Lifecycle):
    """Namespaced keys with TTLs and heartbeats, in process memory."""

    local = True

    def __init__(self) -> None:
        self._data: dict[str, dict[str, tuple[Any, float | None]]] = {}
        self._lock = anyio.Lock()

    @classmethod
    def from_config(cls, config: QueueConfig) -> Self:
        return cls()

    async def flush(self) -> int:
        """Drop every namespace; return how many keys (for ``app.flush_all``)."""
        async with self._lock:
            count = sum(len(values) for values in self._data.values())
            self._data.clear()
        return count

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        self._begin(stack)

    def _ns(self, namespace: str) -> dict[str, tuple[Any, float | None]]:
        space = self._data.setdefault(namespace, {})
        now = time.monotonic()
        for key in [k for k, (_, exp) in space.items() if exp is not None and exp <= now]:
            del space[key]
        return space

    @staticmethod
    def _exp(ttl: float | None) -> float | None:
        return None if ttl is None else time.monotonic() + ttl

    async def get(self, namespace: str, key: str, default: Any = None) -> Any:
        self._check()
        item = self._ns(namespace).get(key)
        return default if item is None else item[0]

    async def set(self, namespace: str, key: str, value: Any, *, ttl: float | None = None) -> None:
        self._check()
        self._ns(namespace)[key] = (value, self._exp(ttl))

    async def set_if_absent(
        self, namespace: str, key: str, value: Any, *, ttl: float | None = None
    ) -> bool:
        self._check()
        space = self._ns(namespace)
        if key in space:
            return False
        space[key] = (value, self._exp(ttl))
        return True

    async def delete(self, namespace: str, key: str) -> bool:
        self._check()
        return self._ns(namespace).pop(key, None) is not None

    async def get_all(self, namespace: str) -> dict[str, Any]:
        self._check()
        return {k: v for k, (v, _) in self._ns(namespace).items()}

    async def clear(self, namespace: str) -> None:
        self._check()
        self._data.pop(namespace, None)

    async def increment(self, namespace: str, key: str, amount: float = 1) -> float:
        self._check()
        space = self._ns(namespace)
        value, exp = space.get(key, (0, None))
        new = value + amount
        space[key] = (new, exp)
        return float(new)

    async def heartbeat(self, worker_id: str, info: dict[str, Any], ttl: float) -> None:
        await self.set("workers", worker_id, dict(info), ttl=ttl)

    async def workers(self) -> dict[str, dict[str, Any]]:
        return await self.get_all("workers")
