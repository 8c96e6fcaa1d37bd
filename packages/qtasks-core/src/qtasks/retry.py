"""The built-in retry plugin: ``retry``, ``retry_on_exc`` and exponential backoff with jitter."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from qtasks.plugins import hookimpl

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.record import TaskRecord
    from qtasks.task import TaskDef


class RetryPlugin:
    """Decides ``qtasks_task_retry_delay`` from the task's options and the app's defaults.

    ``retry=N`` allows N more executions after the first failure. ``retry_on_exc`` limits
    retries to those exception classes (subclasses match; an exception group when every
    exception in it does, as ``except*`` would handle it all). The delay of retry *k* (1-based) is
    ``retry_backoff * 2**(k-1)`` capped at ``config.retry_backoff_max``, with "equal jitter"
    (half fixed, half random) so that failing tasks do not retry in lockstep; a callable
    ``retry_backoff(k)`` gives the delay itself.
    """

    name = "qtasks.retry"

    @hookimpl(trylast=True)
    def qtasks_task_retry_delay(
        self,
        app: AsyncQueueTasks,
        task: TaskDef[..., object],
        record: TaskRecord,
        exc: BaseException,
    ) -> float | None:
        options = task.options
        retries: int = options.retry if options.retry is not None else app.config.retry
        if record.attempt > retries:
            return None
        if options.retry_on_exc is not None and not _matches(exc, options.retry_on_exc):
            return None
        backoff = options.retry_backoff
        if callable(backoff):
            return max(float(backoff(record.attempt)), 0.0)
        base: float = app.config.retry_backoff if backoff is None else float(backoff)
        if base == 0:
            return 0.0
        delay: float = min(base * 2 ** (record.attempt - 1), app.config.retry_backoff_max)
        return delay / 2 + random.uniform(0, delay / 2)


def _matches(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether ``exc`` is one of ``kinds``, or an exception group (an anyio or asyncio task
    group's) of which every exception is: ``ConnectionError`` in a task group's child arrives
    as ``ExceptionGroup([ConnectionError])``, and is retried as the bare one would be."""
    if isinstance(exc, kinds):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(kinds)[1] is None
    return False
