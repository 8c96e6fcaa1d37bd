"""QTasks' events: ``@app.events.on.task_success()`` handlers, run on qtasks' hooks.

QTasks 1.7 declared nine events and fired six (and app-level handlers saw only two of them);
here every one fires, each at the hook in :data:`EVENTS`. A handler is a plain or ``async``
function called with the keywords QTasks passed (``worker``, ``task_func``, ``task_broker``,
``model``...) that it accepts, or all of them if it takes ``**kwargs``. Its exception is logged
and ignored, like any notification hook's. The decorator returns the function itself (QTasks
returned a schema object), so ``@app.events.on.task_running`` works with or without ``()``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qtasks.compat.task_func import task_func
from qtasks.plugins import hookimpl

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.record import TaskRecord

log = logging.getLogger("qtasks.compat.events")

EVENTS: dict[str, str] = {
    "starting": "qtasks_app_started",
    "stopping": "qtasks_app_stopped",
    "worker_running": "qtasks_component_started (kind worker)",
    "worker_stopping": "qtasks_component_stopped (kind worker)",
    "task_running": "qtasks_worker_execute_before",
    "task_success": "qtasks_task_succeeded",
    "task_error": "qtasks_task_failed",
    "task_cancel": "qtasks_task_cancelled",
    "task_stopping": "qtasks_worker_execute_after",
}
"""QTasks event -> the qtasks hook it fires at."""

Handler = Callable[..., Any]


class OnEvents:
    """``app.events.on``: one decorator per QTasks event name."""

    def __init__(self, events: Events) -> None:
        self._events = events

    def __getattr__(self, event: str) -> Callable[..., Any]:
        if event not in EVENTS:
            raise AttributeError(f"unknown event {event!r}; QTasks' events are {list(EVENTS)}")

        def on(func: Handler | None = None) -> Any:
            if func is not None:  # @app.events.on.task_running (no parentheses)
                return self._events.add(event, func)
            return lambda f: self._events.add(event, f)

        return on


class Events:
    """QTasks' ``app.events``: handlers per event, fired by a plugin on qtasks' hooks."""

    name = "qtasks.compat.events"

    def __init__(self, app: AsyncQueueTasks) -> None:
        self.app = app
        self.handlers: dict[str, list[Handler]] = {}
        self.on = OnEvents(self)
        app.hooks.register(self)

    def add(self, event: str, func: Handler) -> Handler:
        if not callable(func):
            raise TypeError(f"an event handler must be callable, got {func!r}")
        self.handlers.setdefault(event, []).append(func)
        return func

    async def fire(self, event: str, **kwargs: Any) -> None:
        """Call the handlers of ``event`` with the keywords each accepts."""
        for func in self.handlers.get(event, ()):
            try:
                result = func(**_accepted(func, kwargs))
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("event handler %r of %s failed (ignored)", func, event)

    def _task(self, record: TaskRecord) -> dict[str, Any]:
        return {
            "worker": self.app.worker,
            "task_func": task_func(self.app, record.task_name),
            "task_broker": record,
        }

    @hookimpl
    async def qtasks_app_started(self) -> None:
        await self.fire("starting", starter=None, worker=self.app.worker, broker=self.app.broker)

    @hookimpl
    async def qtasks_app_stopped(self) -> None:
        await self.fire("stopping", starter=None, worker=self.app.worker, broker=self.app.broker)

    @hookimpl
    async def qtasks_component_started(self, kind: str, component: Any) -> None:
        if kind == "worker":
            await self.fire("worker_running", worker=component, number=0)

    @hookimpl
    async def qtasks_component_stopped(self, kind: str, component: Any) -> None:
        if kind == "worker":
            await self.fire("worker_stopping", worker=component, number=0)

    @hookimpl
    async def qtasks_worker_execute_before(self, record: TaskRecord) -> None:
        await self.fire("task_running", **self._task(record))

    @hookimpl
    async def qtasks_worker_execute_after(self, record: TaskRecord) -> None:
        await self.fire("task_stopping", **self._task(record), model=record)

    @hookimpl
    async def qtasks_task_succeeded(self, record: TaskRecord) -> None:
        await self.fire("task_success", **self._task(record), model=record)

    @hookimpl
    async def qtasks_task_failed(self, record: TaskRecord, exc: BaseException) -> None:
        await self.fire("task_error", **self._task(record), model=record, exc=exc)

    @hookimpl
    async def qtasks_task_cancelled(self, record: TaskRecord, reason: str) -> None:
        await self.fire("task_cancel", **self._task(record), model=record, reason=reason)


def _accepted(func: Handler, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}
