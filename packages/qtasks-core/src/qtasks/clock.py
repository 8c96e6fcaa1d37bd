"""The app's clock: the time it reads and how it waits for a point in that time, one object
so that a test harness swaps all of it for its fake clock (and puts it back) in one assignment
(:attr:`~qtasks.app.AsyncQueueTasks.time_source`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import time as unix_time


@dataclass(frozen=True, slots=True)
class Clock:
    """Unix time as the app reads it, and its two waits for a point in it.

    ``time`` stamps new tasks (``created_at``, the due time of a ``delay``, ``expires``) and
    times the worker's flow decisions (expiry, rate limits, unique keys). It does not reach the
    components' own time: the in-memory ones take a ``clock=``, the Redis ones read the
    server's (a shared state is timed by one clock, not by each client's).

    ``sleep_until(at)`` returns once ``time`` reads ``at``, for the flow gate's short waits (a
    rate token at most 0.1 s away); a fake clock moves itself there instead of sleeping.
    ``None``: they sleep in real time (held back if the worker begins to stop).

    ``wait_until(at)`` returns once ``time`` reads at least ``at``, without moving it:
    ``ctx.sleep`` also ends there, when that comes before its length in real time, so that a
    test moving its fake clock past a sleeping task's end wakes the task. ``None``: only time
    moves the clock.
    """

    time: Callable[[], float] = unix_time
    sleep_until: Callable[[float], Awaitable[None]] | None = None
    wait_until: Callable[[float], Awaitable[None]] | None = None


SYSTEM_CLOCK = Clock()
"""The real clock every app starts with: :func:`time.time`, and real sleeps."""
