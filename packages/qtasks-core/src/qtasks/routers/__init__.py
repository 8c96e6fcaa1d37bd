"""Tasks declared without an app: routers and ``shared_task``.

A big project splits its tasks across modules that must not import the app (it imports them).
A :class:`Router` collects task declarations; ``app.include_router(router)`` registers them on
the app. ``@shared_task`` declares a task every app adopts: when it is built, and again when it
starts (so a module of shared tasks imported after the app still counts).

Each declaration, once bound, enqueues through the app that registered it last:
``declared.add_task(...)`` blocks on a sync app and is a coroutine on an async one, exactly as
the :class:`~qtasks.task.TaskDef` the app made of it. Calling it runs the function here. An app
pinned with :func:`pin_app` (the app a test harness has under test) comes first while pinned.

Only declarations are kept process-wide (in :data:`shared_tasks`, like Celery's
``shared_task``); apps are never stored there, and each app makes its own ``TaskDef``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, cast, overload

from qtasks.errors import TaskDeclarationError
from qtasks.task import OPTIONS_WARNED, TaskDef, warn_declared_options

P = ParamSpec("P")
R = TypeVar("R")
log = logging.getLogger("qtasks.routers")

_IGNORED_OPTIONS = ("awaiting",)
"""QTasks options qtasks derives itself (``awaiting``: whether the function is async)."""


class _App(Protocol):
    tasks: dict[str, TaskDef[..., Any]]

    def task(self, name: Any = None, **options: Any) -> Any: ...


class TaskDeclaration(Generic[P, R]):
    """A task declared on a router or with ``@shared_task``; bound when an app includes it."""

    def __init__(self, func: Callable[P, R], name: str | None, options: dict[str, Any]) -> None:
        if not callable(func):
            raise TaskDeclarationError(f"a task needs a function, got {func!r}")
        self.func = func
        self.name: str = name or getattr(func, "__name__", None) or repr(func)
        self.options = {k: v for k, v in options.items() if k not in _IGNORED_OPTIONS}
        warn_declared_options(self.name, self.options)  # here, not at each app that binds it
        self._bound: weakref.ref[TaskDef[P, R]] | None = None
        self.__doc__ = func.__doc__
        self.__name__ = getattr(func, "__name__", self.name)
        self.__wrapped__ = func

    def __repr__(self) -> str:
        return f"<TaskDeclaration {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def bind(self, app: _App) -> TaskDef[P, R]:
        """Register this task on ``app`` (the sync or async app); return its ``TaskDef``. An app
        that already has a task of this name keeps it unless it came from this declaration.
        While another app that holds this task is pinned (:func:`pin_app`), it stays the one
        this declaration enqueues through, then and after the pin."""
        existing = app.tasks.get(self.name)
        if existing is not None and existing.func is not self.func:
            raise TaskDeclarationError(
                f"a task named {self.name!r} is already registered on this app"
            )
        if existing is not None:
            # Registered by the async app inside a sync app's facade: let the facade wrap it.
            del app.tasks[self.name]
        said = OPTIONS_WARNED.set(True)  # at the declaration already
        try:
            task: TaskDef[P, R] = app.task(self.name, **self.options)(self.func)
        finally:
            OPTIONS_WARNED.reset(said)
        pinned = self._pinned() if _pinned else None
        if pinned is None or pinned.app is task.app:
            self._bound = weakref.ref(task)
        return task

    def _pinned(self) -> TaskDef[P, R] | None:
        """This declaration's task on the app pinned last that holds it."""
        for ref in reversed(_pinned):
            app = ref()
            held = None if app is None else app.tasks.get(self.name)
            if held is not None and held.func is self.func:
                return cast("TaskDef[P, R]", held)
        return None

    @property
    def task(self) -> TaskDef[P, R]:
        """The ``TaskDef`` of the pinned app that holds this declaration (:func:`pin_app`),
        else of the app that bound it last."""
        task = self._pinned() if _pinned else None
        if task is None and self._bound is not None:
            task = self._bound()
        if task is None:
            raise TaskDeclarationError(
                f"task {self.name!r} is not registered on any app yet: "
                "app.include_router(router) (or build an app, for a shared_task)"
            )
        return task

    def add_task(self, *args: Any, **kwargs: Any) -> Any:
        """Enqueue through the app that bound this task (blocking on a sync app, a coroutine on
        an async one)."""
        return self.task.add_task(*args, **kwargs)

    def enqueue(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`TaskDef.enqueue <qtasks.task.TaskDef.enqueue>` of the bound task."""
        return self.task.enqueue(*args, **kwargs)


_pinned: list[weakref.ref[_App]] = []
"""Apps pinned with :func:`pin_app`, the last one first."""


def pin_app(app: _App) -> Callable[[], None]:
    """Make every declaration ``app`` holds (a router's or a shared task) enqueue through
    ``app``, whatever app built meanwhile binds it, until the returned function is called; the
    declarations then enqueue through the app they did before (the last one that bound them
    outside the pin). What a test harness does with the app under test: an app built by an
    earlier test, or by a fixture of this one, must not take the test's enqueues."""
    ref = weakref.ref(app)
    _pinned.append(ref)

    def unpin() -> None:
        if ref in _pinned:
            _pinned.remove(ref)

    return unpin


class Router:
    """Tasks declared in a module without the app: ``@router.task`` takes the options of
    ``@app.task``; ``app.include_router(router)`` registers them."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskDeclaration[..., Any]] = {}

    @overload
    def task(self, func: Callable[P, R], /) -> TaskDeclaration[P, R]: ...

    @overload
    def task(
        self, name: str | None = None, **options: Any
    ) -> Callable[[Callable[P, R]], TaskDeclaration[P, R]]: ...

    def task(self, name: Any = None, **options: Any) -> Any:
        """Declare a task: ``@router.task`` or ``@router.task("name", retry=3, ...)``."""
        if callable(name):
            return self._declare(name, None, {})
        if name is not None and not isinstance(name, str):
            raise TaskDeclarationError(f"task name must be a string, got {name!r}")

        def decorator(func: Callable[P, R]) -> TaskDeclaration[P, R]:
            return self._declare(func, name, options)

        return decorator

    def _declare(
        self, func: Callable[P, R], name: str | None, options: dict[str, Any]
    ) -> TaskDeclaration[P, R]:
        declared = TaskDeclaration(func, name, options)
        if declared.name in self.tasks:
            raise TaskDeclarationError(f"a task named {declared.name!r} is already declared")
        self.tasks[declared.name] = declared
        return declared

    def __iter__(self) -> Iterator[TaskDeclaration[..., Any]]:
        return iter(list(self.tasks.values()))

    def include_router(self, router: Router) -> None:
        """Declare ``router``'s tasks here too (nested routers)."""
        for declared in router:
            if declared.name in self.tasks and self.tasks[declared.name] is not declared:
                raise TaskDeclarationError(f"a task named {declared.name!r} is already declared")
            self.tasks[declared.name] = declared

    def bind(self, app: _App) -> None:
        """Register every task on ``app`` (what ``app.include_router`` does)."""
        for declared in self:
            declared.bind(app)


class AsyncRouter(Router):
    """QTasks' name for a router of an async app (any router works with either app)."""


class SyncRouter(Router):
    """QTasks' name for a router of a sync app (any router works with either app)."""


class SharedTasks(Router):
    """The ``@shared_task`` declarations of this process (declarations only, never apps)."""

    def adopt(self, app: _App) -> None:
        """Register on ``app`` every shared task it does not have yet. A name the app already
        uses for a task of its own keeps that task (logged)."""
        for declared in self:
            existing = app.tasks.get(declared.name)
            if existing is not None and existing.func is not declared.func:
                log.warning(
                    "shared task %r not adopted: the app has its own task of that name",
                    declared.name,
                )
                continue
            if existing is None or (type(existing) is TaskDef and _is_facade(app)):
                declared.bind(app)


def _is_facade(app: Any) -> bool:
    from qtasks.sync import QueueTasks

    return isinstance(app, QueueTasks)


shared_tasks = SharedTasks()
"""Every ``@shared_task`` declaration; apps adopt them when built and when started."""


@overload
def shared_task(func: Callable[P, R], /) -> TaskDeclaration[P, R]: ...


@overload
def shared_task(
    name: str | None = None, **options: Any
) -> Callable[[Callable[P, R]], TaskDeclaration[P, R]]: ...


def shared_task(name: Any = None, **options: Any) -> Any:
    """Declare a task without an app: ``@shared_task`` or ``@shared_task(retry=3, ...)`` (the
    options of ``@app.task``; QTasks' ``awaiting=`` is accepted and not needed). Every app
    adopts it when built and when started."""
    return shared_tasks.task(name, **options)


__all__ = [
    "AsyncRouter",
    "Router",
    "SharedTasks",
    "SyncRouter",
    "TaskDeclaration",
    "pin_app",
    "shared_task",
    "shared_tasks",
]
