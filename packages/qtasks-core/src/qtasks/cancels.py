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
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio

from qtasks.errors import StrayCancellationError

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

_SHIELDED: ContextVar[tuple[asyncio.Task[Any], int] | None] = ContextVar(
    "qtasks_shielded", default=None
)
"""The task that entered :func:`shielded` innermost and its ``cancelling()`` then."""


def is_stray(exc: BaseException) -> bool:
    """Whether ``exc``, caught in the current task, is a cancellation that no enclosing cancel
    scope (up to a shield) and, on asyncio, no pending ``Task.cancel`` of this task explains.

    Call it where the exception was caught, only on the exception path: it walks the cancel
    scopes. ``False`` outside an event loop (the caller re-raises). A cancel request of this
    task left pending makes it ``False`` too, even within a plain shield (code that swallowed
    a ``Task.cancel`` of its own task without ``uncancel()``), except the requests that were
    pending already when the innermost :func:`shielded` around it was entered."""
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
    if task is None:
        return True
    pending = task.cancelling()
    if pending == 0:
        return True
    shield = _SHIELDED.get()
    return shield is not None and shield[0] is task and pending <= shield[1]


@contextmanager
def shielded() -> Iterator[None]:
    """A shielded cancel scope for what must finish although the current task is being
    cancelled (the settle of a cancelled run: :meth:`qtasks.settle.Settlement.settle_shielded`,
    where a teardown's, a hook's or a component's own is that code's failure), inside which a
    ``CancelledError`` is stray
    (:func:`is_stray`) unless a cancel request came after it was entered.

    On asyncio, the cancelled scope being left has cancelled its host task with
    ``Task.cancel``, and withdraws that (``uncancel()``) only as it exits, after the shield:
    left to :func:`is_stray` alone, that pending request would make the own ``CancelledError``
    of a teardown or a hook in here pass for a stop. The count is compared, not withdrawn and
    made again: anyio's scope keeps its own tally of the cancels it made and withdraws them
    itself. No scope delivers a cancel into the shield, so only a ``Task.cancel`` from outside
    anyio (``asyncio.run`` ending, ``wait_for``) raises the count in here, and that is a stop.
    On trio there is no such request: cancel scopes are all there is, and within the shield
    the current deadline is the shield's, so :func:`is_stray` needs nothing from here."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # trio
        task = None
    token = _SHIELDED.set(None if task is None else (task, task.cancelling()))
    try:
        with anyio.CancelScope(shield=True):
            yield
    finally:
        _SHIELDED.reset(token)


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


def culprit(
    app: AsyncQueueTasks, exc: BaseException, delivery: object, doing: str, unknown: str
) -> str:
    """Who raised the stray cancellation ``exc`` (for :func:`stray_error`): the innermost
    frame of its traceback that is a method of the app's storage, broker or global config,
    or of ``delivery``, as ``"the storage (RedisStorage.save) <doing>"``; ``unknown`` when
    none is (a hook's, say). It walks the traceback: for the exception path only."""
    roles = {
        id(app.storage): "the storage",
        id(app.broker): "the broker",
        id(app.global_config): "the global config",
    }
    if delivery is not None:
        roles[id(delivery)] = "the broker's delivery"
    named = unknown
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        role = roles.get(id(owner))
        if role is not None:
            named = f"{role} ({type(owner).__name__}.{tb.tb_frame.f_code.co_name}) {doing}"
        tb = tb.tb_next
    return named
