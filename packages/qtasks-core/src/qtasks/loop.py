"""The event loops qtasks makes itself (``run_forever``, ``qtasks run``, the sync app's thread):
asyncio's, with timers that fire on time.

On Linux asyncio waits for I/O with ``epoll_wait``, whose timeout is a whole number of
milliseconds rounded up: a timer due in 3.2 ms is run after 4 ms, so every ``asyncio.sleep`` of
a task ends up to 1 ms late (0.5 ms on average) whenever the loop had nothing else to do. For a
worker full of short sleeps and timeouts that is several per cent of its time.
:class:`PreciseEpollSelector` times those waits with ``select()`` on the epoll descriptor,
which takes microseconds, then collects the events without waiting.

A loop is made this way only when the asyncio event-loop policy is the default one: an app that
installed another (uvloop's, say) gets that. Pass ``loop_factory`` to
:class:`~qtasks.starter.SignalStarter` to choose the loop outright.
"""

from __future__ import annotations

import asyncio
import select
import selectors
import warnings
from collections.abc import Callable
from typing import Any

_FD_SETSIZE = 1024
"""``select()`` cannot watch a descriptor at or above this number."""


if hasattr(selectors, "EpollSelector"):

    class PreciseEpollSelector(selectors.EpollSelector):
        """An epoll selector whose waits end on time rather than on the next millisecond."""

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            if timeout is not None and timeout > 0:
                epoll_fd = self.fileno()
                if epoll_fd < _FD_SETSIZE:
                    # Readable as soon as a registered descriptor has an event; returns early
                    # then, else at the timeout to the microsecond. Either way epoll_wait then
                    # collects what is there without waiting.
                    select.select((epoll_fd,), (), (), timeout)
                    timeout = 0
            return super().select(timeout)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop with :class:`PreciseEpollSelector` where epoll exists, else asyncio's
    default loop."""
    if not hasattr(selectors, "EpollSelector"):
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(PreciseEpollSelector())


def loop_options(
    backend: str, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
) -> dict[str, Any]:
    """``backend_options`` for ``anyio.run``: ``loop_factory`` when given; else
    :func:`new_event_loop` on asyncio with epoll, unless an event-loop policy other than
    asyncio's default is installed (its loops are used then)."""
    if backend != "asyncio":
        return {}
    if loop_factory is not None:
        return {"loop_factory": loop_factory}
    with warnings.catch_warnings():  # policies are deprecated from Python 3.14 on
        warnings.simplefilter("ignore", DeprecationWarning)
        default = type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy
    if default and hasattr(selectors, "EpollSelector"):
        return {"loop_factory": new_event_loop}
    return {}
