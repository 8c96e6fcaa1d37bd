"""The in-memory global config: namespaced keys with TTLs, heartbeats, and flow control for
the workers of one process (:class:`~qtasks.components.FlowControl`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Self

import anyio
import anyio.abc

from qtasks.components import SlotRenewal
from qtasks.config import QueueConfig
from qtasks.memory.signals import _Lifecycle

HOLD_GUESS = 0.1
"""Seconds a concurrency slot is taken to be held before any was released (the first
waiters' delay; the first release replaces it with what was measured)."""

HOLD_WEIGHT = 0.3
"""Weight of the latest hold time in the mean hold time of a concurrency key."""


@dataclass(slots=True)
class _Slots:
    """The slots of one concurrency key: lease ends and start times by holder, the next
    tries by waiter, and the mean time slots were held lately."""

    leases: dict[str, float] = field(default_factory=dict)
    since: dict[str, float] = field(default_factory=dict)
    waiting: dict[str, float] = field(default_factory=dict)
    hold: float | None = None
    limit: int = 0

    def prune(self, now: float) -> None:
        for holder in [h for h, end in self.leases.items() if end <= now]:
            del self.leases[holder]
            self.since.pop(holder, None)
        for holder in [h for h, at in self.waiting.items() if at <= now - 1.0]:
            del self.waiting[holder]


def slot_wait(hold: float, ahead: int, limit: int, earliest_end: float) -> float:
    """Seconds a waiter of a concurrency key waits before it tries again: one mean hold time
    per round of ``limit`` waiters ahead of it, never past the earliest lease end (shared by
    the in-memory and Redis implementations, whose script does the same sums)."""
    return max(min(hold * (ahead // limit + 1), earliest_end), 0.01)


class MemoryGlobalConfig(_Lifecycle):
    """Namespaced keys with TTLs and heartbeats, in process memory.

    ``clock`` (default :func:`time.monotonic`) measures the rate limits' token buckets and the
    holds of unique keys, e.g. a test's fake clock; key TTLs and the leases of concurrency
    slots always use the monotonic clock."""

    local = True

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock: Callable[[], float] = clock or time.monotonic
        self._data: dict[str, dict[str, tuple[Any, float | None]]] = {}
        self._lock = anyio.Lock()
        self._rates: dict[str, tuple[float, float, int]] = {}
        """GCRA state by key: theoretical arrival time, interval, burst."""
        self._slots: dict[str, _Slots] = {}
        self._unique: dict[str, tuple[str, float | None]] = {}

    @property
    def clock(self) -> Callable[[], float]:
        """The clock the rate limits and unique holds are measured on."""
        return self._clock

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

    async def delete_if_equal(self, namespace: str, key: str, value: Any) -> bool:
        """See :class:`~qtasks.components.CompareDelete`."""
        self._check()
        space = self._ns(namespace)
        item = space.get(key)
        if item is None or item[0] != value:
            return False
        del space[key]
        return True

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

    async def end_heartbeat(self, worker_id: str) -> None:
        """See :class:`~qtasks.components.HeartbeatEnd`."""
        await self.delete("workers", worker_id)

    # --- FlowControl ---------------------------------------------------------------------

    async def reserve_rate(
        self, key: str, interval: float, burst: int, max_wait: float | None
    ) -> float | None:
        self._check()
        now = self._clock()
        tat, old, _ = self._rates.get(key, (now, interval, 0))
        tat = max(tat, now)
        if old != interval:  # the rate changed (a redeploy): the backlog at the new rate
            tat = now + (tat - now) * interval / old
        wait = max(tat - (burst - 1) * interval - now, 0.0)
        if max_wait is not None and wait > max_wait:
            return None
        self._rates[key] = (tat + interval, interval, burst)
        return wait

    async def release_rate(self, key: str) -> bool:
        self._check()
        now = self._clock()
        state = self._rates.get(key)
        if state is None or state[0] <= now:
            return False
        tat, interval, burst = state
        self._rates[key] = (max(tat - interval, now), interval, burst)
        return True

    async def acquire_slot(
        self, key: str, limit: int, holder: str, lease: float, waiter: str | None = None
    ) -> float:
        self._check()
        now = time.monotonic()
        waiter = holder if waiter is None else waiter
        slots = self._slots.setdefault(key, _Slots())
        slots.limit = limit
        slots.prune(now)
        if holder in slots.leases or len(slots.leases) < limit:
            slots.leases[holder] = now + lease
            slots.since.setdefault(holder, now)
            slots.waiting.pop(waiter, None)
            return 0.0
        # Only the waiters due back before this one are ahead of it (every waiter, for a new
        # one): counting all of them gave every waiter deferred again the same delay, a herd.
        due = slots.waiting.get(waiter)
        if due is None:
            ahead = len(slots.waiting)
        else:
            ahead = sum(1 for w, at in slots.waiting.items() if at < due and w != waiter)
        hold = HOLD_GUESS if slots.hold is None else slots.hold
        wait = slot_wait(hold, ahead, limit, min(slots.leases.values()) - now)
        slots.waiting[waiter] = now + wait
        return wait

    async def release_slot(self, key: str, holder: str) -> None:
        await self.release_slot_waking(key, holder, wake=False)

    async def release_slot_waking(self, key: str, holder: str, *, wake: bool = True) -> str | None:
        """See :class:`~qtasks.components.SlotWake`."""
        self._check()
        slots = self._slots.get(key)
        if slots is None or slots.leases.pop(holder, None) is None:
            return None
        now = time.monotonic()
        since = slots.since.pop(holder, None)
        if since is not None:  # a slot taken back has none (see FlowControl.extend_slots)
            old = now - since if slots.hold is None else slots.hold
            slots.hold = (1 - HOLD_WEIGHT) * old + HOLD_WEIGHT * (now - since)
        if not wake:
            return None
        later = [(at, w) for w, at in slots.waiting.items() if at > now]
        if not later:
            return None
        waiter = min(later)[1]
        slots.waiting[waiter] = now
        return waiter

    async def extend_slots(
        self, slots: Sequence[tuple[str, str]], lease: float, limits: Sequence[int] | None = None
    ) -> list[SlotRenewal]:
        self._check()
        now = time.monotonic()
        out = []
        for i, (key, holder) in enumerate(slots):
            state = self._slots.get(key)
            if state is not None:
                state.prune(now)
            if state is not None and holder in state.leases:
                found = SlotRenewal.RENEWED
            elif limits is None:
                out.append(SlotRenewal.LOST)
                continue
            else:  # its run goes on: taken back, past the limit if need be (no start time)
                state = self._slots.setdefault(key, _Slots(limit=limits[i]))
                found = SlotRenewal.TAKEN_BACK
            state.leases[holder] = now + lease
            if limits is not None and len(state.leases) > limits[i]:
                found = SlotRenewal.OVER_LIMIT
            out.append(found)
        return out

    async def claim_unique(
        self, key: str, holder: str, ttl: float | None, replace: str | None = None
    ) -> str | None:
        self._check()
        now = self._clock()
        held = self._unique.get(key)
        if held is not None and held[1] is not None and held[1] <= now:
            held = None
        if held is None or held[0] == replace:
            self._unique[key] = (holder, None if ttl is None else now + ttl)
            return None
        return held[0]

    async def release_unique(self, key: str, holder: str) -> bool:
        self._check()
        held = self._unique.get(key)
        if held is None or held[0] != holder:
            return False
        del self._unique[key]
        return True

    async def flow_state(self) -> dict[str, dict[str, float]]:
        self._check()
        now = time.monotonic()
        out: dict[str, dict[str, float]] = {}
        clock_now = self._clock()
        for key, (tat, interval, burst) in self._rates.items():
            ahead = (max(tat, clock_now) - clock_now) / interval
            out[key] = {
                "tokens": round(min(max(burst - ahead, 0.0), burst), 2),
                "burst": burst,
                "per_second": 1 / interval,
                "waiting": max(math.ceil(ahead - burst - 1e-6), 0),
            }
        for key, slots in self._slots.items():
            slots.prune(now)
            out[key] = {
                "held": len(slots.leases),
                "limit": slots.limit,
                "waiting": len(slots.waiting),
            }
        return out
