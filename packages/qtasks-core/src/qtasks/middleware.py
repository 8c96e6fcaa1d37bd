"""Task middlewares, provided to the executor by a built-in plugin on the hooks.

A middleware is ``async def mw(run, call_next) -> result`` (see
:data:`qtasks.executor.Middleware`). It wraps the task call like an onion: code before
``await call_next()`` runs before the task (and before inner middlewares), code after it sees
the result, ``try``/``except`` around it sees the exception, and returning without calling it
short-circuits the task (the returned value becomes the result).

The executor asks the ``qtasks_executor_middlewares`` hook which middlewares wrap a call.
:class:`MiddlewarePlugin` answers with, outermost first, the app's middlewares
(``app.add_middleware``), then the task's ``middlewares_before``, then ``middlewares_after``.
Other plugins implement the same hook to add their own (e.g. tracing around every task).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtasks.plugins import hookimpl

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.executor import Middleware
    from qtasks.task import TaskDef


class MiddlewarePlugin:
    """Supplies ``app.middlewares`` and the task's own middlewares to the executor."""

    name = "qtasks.middlewares"

    @hookimpl(tryfirst=True)
    def qtasks_executor_middlewares(
        self, app: AsyncQueueTasks, task: TaskDef[..., Any], middlewares: list[Middleware]
    ) -> list[Middleware] | None:
        options = task.options
        if not (app.middlewares or options.middlewares_before or options.middlewares_after):
            return None  # nothing to add: the chain is left as it is
        return [
            *app.middlewares,
            *task.options.middlewares_before,
            *middlewares,
            *task.options.middlewares_after,
        ]
