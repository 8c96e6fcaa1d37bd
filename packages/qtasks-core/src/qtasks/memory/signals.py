"""Wake-ups and the start/stop bookkeeping shared by the in-memory components."""

from __future__ import annotations

from contextlib import AsyncExitStack

import anyio
import anyio.abc

from qtasks.errors import ComponentNotStartedError


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
