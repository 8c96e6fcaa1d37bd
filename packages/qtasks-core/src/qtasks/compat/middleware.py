"""QTasks' task middlewares: ``TaskMiddleware`` subclasses in ``middlewares_before``/``_after``.

QTasks built one per call with the task executor and awaited it before (or after) the task;
what it returned was ignored. qtasks middlewares wrap the call (``async def mw(run, call_next)``),
so a QTasks class is wrapped into one: built with a
:class:`~qtasks.executors.base.BaseTaskExecutor` of the :class:`~qtasks.executor.TaskRun` as
its ``task_executor`` (QTasks' attributes, ``task_func``, ``task_broker``..., and the run's),
called before ``call_next()`` (``middlewares_before``) or after it (``middlewares_after``,
only when the task returned). ``app.add_middleware(cls, position=)``
does the same for every task of the app (:func:`app_middleware`).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import TYPE_CHECKING, Any

from qtasks.errors import TaskDeclarationError

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
        from qtasks.executors.base import BaseTaskExecutor

        outcome = cls(BaseTaskExecutor(run))()
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


SHAPE = "async def mw(run, call_next) (or a QTasks TaskMiddleware class)"
"""What a middleware must be, for error messages."""


def app_middleware(middleware: Any, position: str | None) -> Middleware:
    """What ``app.add_middleware(middleware, position)`` registers; raises
    :class:`~qtasks.errors.TaskDeclarationError` for what could only fail every task later."""
    if isinstance(middleware, type) and issubclass(middleware, TaskMiddleware):
        if position not in (None, "before", "after"):
            raise TaskDeclarationError(
                f"add_middleware: position must be 'before' or 'after', got {position!r}"
            )
        adapted: Middleware = adapt_middleware(middleware, after=position == "after")
        return adapted
    if position is not None and not isinstance(middleware, TaskMiddleware):
        raise TaskDeclarationError(
            f"add_middleware: position= is for QTasks TaskMiddleware classes; "
            f"{middleware!r} wraps the call: its code before `await call_next()` runs before "
            "the task, its code after it after the task"
        )
    check_middleware(middleware, f"add_middleware takes {SHAPE}")
    return middleware  # type: ignore[no-any-return]  # checked above as far as it can be


def check_middleware(middleware: Any, expected: str) -> None:
    """Raise :class:`~qtasks.errors.TaskDeclarationError` (``expected``, then what is wrong)
    unless ``middleware`` is a QTasks ``TaskMiddleware`` class or a callable taking
    ``(run, call_next)``: the same check for ``add_middleware`` and a task's
    ``middlewares_before``/``middlewares_after``, made where it is declared."""
    if isinstance(middleware, type) and issubclass(middleware, TaskMiddleware):
        return
    try:
        if middleware in _FIT:
            return  # checked already: a task's options copied for a retry keep their own
    except TypeError:
        pass  # unhashable: checked each time
    if isinstance(middleware, TaskMiddleware):
        raise TaskDeclarationError(
            f"{expected}; pass the class {type(middleware).__name__}, not an instance"
        )
    if not callable(middleware) or not _takes_run_and_call_next(middleware):
        raise TaskDeclarationError(f"{expected}, got {middleware!r}")
    with contextlib.suppress(TypeError):  # not weakly referable: checked each time
        _FIT.add(middleware)


_FIT: weakref.WeakSet[Any] = weakref.WeakSet()
"""Middlewares that passed :func:`check_middleware` (its signature check costs ~20 µs, and a
task's options are checked again when a failed run's retry copies them)."""


def _takes_run_and_call_next(func: Any) -> bool:
    try:
        inspect.signature(func).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): let it through
        return True
    return True
