"""Stray cancellations: a ``CancelledError`` that nothing around the current task asked for.

Code the worker runs (a task, a middleware, a hook, a component's client library) can raise
one of its own: it awaited a future or task it had cancelled, or a library let an inner
cancellation escape. The worker's own teardown (its stop, the grace's end, the serving scope
cancelled) and a cancel of the task (``app.cancel``) reach the code through a cancelled
cancel scope, or on asyncio through ``Task.cancel`` (which anyio's scopes use as well), so a
cancellation with neither behind it is the code's own failure, not an order to stop.
"""

from __future__ import annotations

import asyncio
import math

import anyio

from qtasks.errors import StrayCancellationError


def is_stray(exc: BaseException) -> bool:
    """Whether ``exc``, caught in the current task, is a cancellation that no enclosing cancel
    scope (up to a shield) and, on asyncio, no pending ``Task.cancel`` of this task explains.

    Call it where the exception was caught, only on the exception path: it walks the cancel
    scopes. ``False`` outside an event loop (the caller re-raises). A cancel request of this
    task left pending makes it ``False`` too, even within a shield: code that swallowed a
    ``Task.cancel`` of its own task without ``uncancel()``, or the shielded settle of a
    cancelled run (the runner's scope uncancels the task only as it exits)."""
    if not isinstance(exc, anyio.get_cancelled_exc_class()):
        return False
    try:
        if anyio.current_effective_deadline() == -math.inf:
            return False  # a cancelled scope around this code: the cancellation is for it
    except RuntimeError:  # no event loop
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # trio: its cancel scopes are all there is
        return True
    return task is None or task.cancelling() == 0


def is_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the code that raised it, to handle as such: an
    ``Exception``, or a stray cancellation (:func:`is_stray`)."""
    return isinstance(exc, Exception) or is_stray(exc)


def stray_error(culprit: str, exc: BaseException) -> StrayCancellationError:
    """The error that stands for the stray cancellation ``exc`` of ``culprit`` (chained from
    it, so a record's traceback shows where it came from)."""
    error = StrayCancellationError(culprit)
    error.__cause__ = exc
    return error
