"""Task middlewares: which ones wrap a task's call, in what order.

A middleware is ``async def mw(run, call_next) -> result`` (see
:data:`qtasks.executor.Middleware`). It wraps the task call like an onion: code before
``await call_next()`` runs before the task (and before inner middlewares), code after it sees
the result, ``try``/``except`` around it sees the exception, and returning without calling it
short-circuits the task (the returned value becomes the result).

The executor wraps a call in :func:`chain_of`: outermost first, the app's middlewares
(``app.add_middleware``), then the task's ``middlewares_before``, then ``middlewares_after``.
Plugins implementing the ``qtasks_executor_middlewares`` hook get that list and may return
another (e.g. with tracing around every task); the hook is called only when one does, so a
task without middlewares costs three empty-list checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.executor import Middleware
    from qtasks.task import TaskDef


def chain_of(app: AsyncQueueTasks, task: TaskDef[..., Any]) -> list[Middleware]:
    """The middlewares of ``app`` and ``task`` that wrap a call, outermost first."""
    options = task.options
    if not (app.middlewares or options.middlewares_before or options.middlewares_after):
        return []
    return [*app.middlewares, *options.middlewares_before, *options.middlewares_after]
