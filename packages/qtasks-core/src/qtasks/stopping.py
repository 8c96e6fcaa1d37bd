"""The deadline of a worker's stop: every wait of the stop on a backend ends by it.

A stop gives running tasks ``shutdown_grace`` seconds, then :data:`STOP_MARGIN` more for what
is left to write (their hand-back, the results of the tasks that finished, the consumer's
release of what it holds); a second signal (:meth:`~qtasks.worker.QueueWorker.hurry`) moves the
deadline to :data:`STOP_MARGIN` from then. Without it one call to a stalled server (stopped,
or behind a network black hole) took its client's retries times its socket timeout: minutes.
What the deadline cuts short is left to the leases: the messages come back to another worker
once their lease ends (at-least-once), and the fenced writes keep a late holder from
overwriting a newer one.

Code the stop awaits enters :func:`shield` (shielded, as teardown must be, but bounded by the
deadline) or :func:`bounded` (not shielded); both are no-ops in effect while no stop is under
way, so a component may use them on any path. The deadline is found through a context
variable the serving worker sets, so the tasks it starts and the components it calls see it
without an argument.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar

import anyio

log = logging.getLogger("qtasks.worker")

STOP_MARGIN = 1.0
"""Seconds a stop waits on its backends past the grace (or past a second signal) before it
leaves what they did not answer to the leases."""


class StopClock:
    """The deadline of one worker's stop, and the waits it bounds (see the module docstring).
    Times are the event loop's (:func:`anyio.current_time`)."""

    __slots__ = ("_scopes", "deadline", "gave_up", "settler_ended")

    def __init__(self) -> None:
        self.deadline = math.inf
        self._scopes: set[anyio.CancelScope] = set()
        self.gave_up: Counter[str] = Counter()
        """What the deadline cut short, counted by what it was (for the stop's warning)."""
        self.settler_ended: Counter[str] = Counter()
        """What was left unwritten because the worker's settler had ended, cancelled with the
        loop's other tasks as the event loop ends (after an exception raised out of it), or
        with the worker's as it ends on an error, counted by what it was: nothing waited for
        it, no deadline was reached (for the stop's warning)."""

    def reset(self) -> None:
        """For the next run: no deadline, nothing given up."""
        self.deadline = math.inf
        self.gave_up.clear()
        self.settler_ended.clear()

    def start(self, grace: float) -> None:
        """The stop begins now: it ends by ``grace`` plus :data:`STOP_MARGIN` seconds."""
        self._move(_now() + grace + STOP_MARGIN)

    def hurry(self) -> None:
        """Cut the stop short: it ends by :data:`STOP_MARGIN` seconds from now."""
        self._move(_now() + STOP_MARGIN)

    def report(self) -> None:
        """Say what the deadline cut short, and what the end of the worker's settler left
        unwritten, if anything (once the stop is over)."""
        if self.gave_up:
            log.warning(
                "stopped without waiting longer for the backend (no answer by the stop's "
                "deadline); left to their leases, to run or settle again once it answers: %s",
                _counted(self.gave_up),
            )
            self.gave_up.clear()
        if self.settler_ended:
            log.warning(
                "stopped without writing to the backend: the worker's settler had ended, "
                "cancelled with the event loop's other tasks as the loop ends (after an "
                "exception raised out of it, say) or as the worker ends on an error, so "
                "nothing more could be written (no deadline was waited for); left to their "
                "leases, to run or settle again: %s",
                _counted(self.settler_ended),
            )
            self.settler_ended.clear()

    def _move(self, deadline: float) -> None:
        self.deadline = min(self.deadline, deadline)
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, self.deadline)

    @property
    def passed(self) -> bool:
        """Whether the deadline has passed."""
        return _now() >= self.deadline

    @contextmanager
    def bound(
        self, what: str | None = None, *, shield: bool = False, limit: float = math.inf
    ) -> Iterator[anyio.CancelScope]:
        """A cancel scope ending by the deadline (moved closer too) and within ``limit``
        seconds; ``shield``: cancelled by nothing else. Cut short by the deadline, it counts
        once under ``what`` (if given) in :attr:`gave_up`."""
        deadline = min(self.deadline, _now() + limit)
        with anyio.CancelScope(shield=shield, deadline=deadline) as scope:
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)
        if what is not None and scope.cancelled_caught and self.passed:
            self.gave_up[what] += 1


def _counted(what: Counter[str]) -> str:
    return ", ".join(f"{name} ({n})" for name, n in what.items())


def _now() -> float:
    """anyio's clock, the event loop's time; also in a plain callback of the loop (a second
    signal's :meth:`StopClock.hurry`, scheduled with ``call_soon_threadsafe``), where the
    lowest anyio qtasks supports cannot tell which async library runs: asyncio's loop time
    then, the clock anyio's asyncio backend keeps its deadlines on."""
    try:
        return anyio.current_time()
    except RuntimeError:  # sniffio's AsyncLibraryNotFoundError, outside any task
        return asyncio.get_running_loop().time()


_CLOCK: ContextVar[StopClock | None] = ContextVar("qtasks_stop_clock", default=None)


@asynccontextmanager
async def serving(clock: StopClock) -> AsyncIterator[None]:
    """Make ``clock`` the one :func:`shield` and :func:`bounded` use, in this task and the
    tasks it starts, while the block runs (the worker's serving; async, to be entered with
    its other contexts)."""
    token = _CLOCK.set(clock)
    try:
        yield
    finally:
        _CLOCK.reset(token)
        clock.report()


@contextmanager
def shield(what: str, limit: float = math.inf) -> Iterator[None]:
    """A shielded scope for teardown that waits on a backend: it ends within ``limit``
    seconds and, during a worker's stop, by the stop's deadline."""
    clock = _CLOCK.get()
    if clock is None:  # one scope: shielded, and ending at its own deadline
        with anyio.CancelScope(shield=True, deadline=_now() + limit):
            yield
        return
    with clock.bound(what, shield=True, limit=limit):
        yield


@contextmanager
def bounded(what: str) -> Iterator[None]:
    """A scope that ends by the stop's deadline (none while no stop is under way)."""
    clock = _CLOCK.get()
    if clock is None:
        yield
        return
    with clock.bound(what):
        yield
