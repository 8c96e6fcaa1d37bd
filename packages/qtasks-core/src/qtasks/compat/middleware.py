"""QTasks' task middlewares: ``TaskMiddleware`` subclasses in ``middlewares_before``/``_after``.

QTasks built one per call with the task executor and awaited it before (or after) the task;
what it returned was ignored. qtasks middlewares wrap the call (``async def mw(run, call_next)``),
so a QTasks class is wrapped into one: built with the :class:`~qtasks.executor.TaskRun` as its
``task_executor``, called before ``call_next()`` (``middlewares_before``) or after it
(``middlewares_after``, only when the task returned).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qtasks.executor import CallNext, Middleware, TaskRun


class TaskMiddleware:
    """QTasks' base class: ``__init__(task_executor)`` and ``__call__()`` (may be ``async``)."""

    def __init__(self, task_executor: Any) -> None:
        self.task_executor = task_executor
        self.name = type(self).__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return None


def adapt_middleware(middleware: Any, after: bool) -> Any:
    """``middleware`` itself, or a qtasks middleware running a QTasks ``TaskMiddleware``
    class before (``after=False``) or after the call."""
    if not (isinstance(middleware, type) and issubclass(middleware, TaskMiddleware)):
        return middleware
    cls = middleware

    async def run_qtasks_middleware(run: TaskRun) -> None:
        outcome = cls(run)()
        if inspect.isawaitable(outcome):
            await outcome

    async def before(run: TaskRun, call_next: CallNext) -> Any:
        await run_qtasks_middleware(run)
        return await call_next()

    async def after_call(run: TaskRun, call_next: CallNext) -> Any:
        result = await call_next()
        await run_qtasks_middleware(run)
        return result

    wrapped: Middleware = after_call if after else before
    wrapped.__qualname__ = cls.__qualname__  # qtasks inspect shows the class name
    return wrapped
