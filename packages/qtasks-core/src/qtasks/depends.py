"""Dependency injection: ``Depends(func, scope=...)`` and the built-in plugin that fills task
parameters with dependencies and :mod:`State <qtasks.state>` instances.

A scope is a lifetime, and it means sharing: within one scope a dependency function is called
once, every task in that scope gets the same value, and its teardown runs exactly once when the
scope ends.

========================  ==================================================================
``task`` (default)        one execution of one task; closed when the call ends (success,
                          error, cancel, timeout, lost lease, shutdown requeue; a sync
                          call given up on: when its thread returns)
``worker``                the worker; closed when the worker has stopped
``broker`` / ``storage``  that component; closed when it stops (after the worker)
/ ``global_config``
========================  ==================================================================
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, get_args, get_origin

import anyio

from qtasks.errors import (
    DependencyError,
    StateError,
    UnresolvedAnnotationError,
)
from qtasks.plugins import hookimpl
from qtasks.state import AsyncState, StateRegistry, SyncState, blocking_view, state_class
from qtasks.task import TaskDef, resolved_signature

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.executor import TaskRun

log = logging.getLogger("qtasks.depends")

Scope = Literal["task", "worker", "broker", "storage", "global_config"]
# By lifetime, shortest first: the worker stops before the components, which stop in reverse
# start order (broker, global_config, storage). A dependency may only use longer-lived ones.
_RANK = {"task": 0, "worker": 1, "broker": 2, "global_config": 3, "storage": 4}
INJECT_PLUGIN = "qtasks.inject"
_RUN_SCOPE = "qtasks.depends.task_scope"


@dataclass(frozen=True, eq=False, slots=True)
class Dependency:
    """A declared dependency (what :func:`Depends` returns)."""

    func: Callable[..., Any]
    scope: Scope = "task"
    __qtasks_injected__: ClassVar[bool] = True


def Depends(func: Callable[..., Any], *, scope: Scope = "task") -> Any:
    """Declare a parameter filled with ``func``'s value: ``db: Conn = Depends(connect)`` or
    ``db: Annotated[Conn, Depends(connect, scope="worker")]``.

    ``func`` may be a plain or coroutine function, a sync or async generator function (the code
    after its single ``yield`` is the teardown), or a factory returning a (async) context
    manager, which is entered. Its own parameters may be ``Depends`` or State (resolved
    recursively, each value cached in its scope); others need defaults. A value the caller
    passes explicitly (by keyword) is used instead and never replaced.
    """
    if not callable(func):
        raise DependencyError(f"Depends needs a callable, got {func!r}")
    if scope not in _RANK:
        raise DependencyError(f"unknown Depends scope {scope!r}; expected one of {list(_RANK)}")
    return Dependency(func, scope)


def dependency_of(parameter: inspect.Parameter) -> Dependency | None:
    """The :class:`Dependency` a parameter declares (default value or ``Annotated`` metadata)."""
    if isinstance(parameter.default, Dependency):
        return parameter.default
    annotation = parameter.annotation
    if get_origin(annotation) is Annotated:
        for meta in reversed(get_args(annotation)[1:]):
            if isinstance(meta, Dependency):
                return meta
    return None


class ScopeCache:
    """The values of one scope, and the exit stack that tears them down."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stack = AsyncExitStack()
        self.values: dict[Callable[..., Any], Any] = {}
        self.locks: dict[Callable[..., Any], anyio.Lock] = {}

    async def aclose(self, error: BaseException | None = None) -> None:
        """Tear the values down, the last made first; ``error`` (how the task ended) is
        thrown into generator dependencies at their ``yield`` and given to context managers'
        ``__exit__``, as ``with`` blocks would: a dependency that rolls back on error does."""
        self.values.clear()
        with anyio.CancelScope(shield=True):
            if error is None:
                await self.stack.aclose()
            else:
                await self.stack.__aexit__(type(error), error, error.__traceback__)


@dataclass(slots=True)
class _Plan:
    """How to fill one task's parameters."""

    items: list[tuple[str, Dependency | type[Any]]]
    positional: list[str]
    """Caller parameters that positional arguments fill (converted to keywords)."""
    keep_positional: bool


async def _enter(stack: AsyncExitStack, func: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    if inspect.isasyncgenfunction(func):
        return await stack.enter_async_context(asynccontextmanager(func)(**kwargs))
    if inspect.isgeneratorfunction(func):
        return stack.enter_context(contextmanager(func)(**kwargs))
    value = func(**kwargs)
    if inspect.isawaitable(value):
        value = await value
    if hasattr(value, "__aenter__") and hasattr(value, "__aexit__"):
        return await stack.enter_async_context(value)
    if hasattr(value, "__enter__") and hasattr(value, "__exit__"):
        return stack.enter_context(value)
    return value


async def _close_run_scope(cache: ScopeCache, run: TaskRun) -> None:
    """Tear a run's task-scoped values down once its code ended, told how it ended."""
    await cache.aclose(run.ended_by)


class InjectPlugin:
    """Built-in, one per app (no global state): injects ``Depends`` values and State
    instances into task calls (the executor's injection step, :meth:`arguments`) and, as a
    plugin, tears dependencies down when their scope ends."""

    name = INJECT_PLUGIN

    def __init__(self) -> None:
        self.states = StateRegistry()
        self._plans: dict[TaskDef[..., Any], _Plan] = {}
        self._scopes: dict[str, ScopeCache] = {}
        self._blocking_views: dict[type[Any], type[Any]] = {}

    # --- planning -------------------------------------------------------------------------

    def plan(self, task: TaskDef[..., Any]) -> _Plan:
        plan = self._plans.get(task)
        if plan is None:
            plan = self._plans[task] = self._make_plan(task)
        return plan

    def _make_plan(self, task: TaskDef[..., Any]) -> _Plan:
        params = list(task.signature.parameters.values())
        if task.options.echo:
            params = params[1:]
        items: list[tuple[str, Dependency | type[Any]]] = []
        for p in params:
            dep = dependency_of(p)
            state = state_class(p.annotation)
            if dep is not None:
                items.append((p.name, dep))
            elif state is not None:
                _check_colour(task, state)
                if not task.kind.is_async and issubclass(state, AsyncState):
                    state = self._blocking_views.get(state) or self._blocking_views.setdefault(
                        state, blocking_view(state)
                    )
                items.append((p.name, state))
        kinds = {p.kind for p in params}
        injected_positional = any(
            p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name in dict(items)
            for p in params
        )
        keep = bool(kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY})
        if keep and injected_positional:
            raise DependencyError(
                f"task {task.name!r} takes *args or positional-only parameters: make its "
                "injected parameters keyword-only"
            )
        positional = [
            p.name
            for p in task.caller_signature.parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        ]
        return _Plan(items, positional, keep or not injected_positional)

    def check(self, task: TaskDef[..., Any]) -> None:
        """At declaration (``@app.task``): raise :class:`DependencyError` (or
        :class:`StateError`) for what would fail the task's every run and is known already:
        a parameter of a dependency function that nothing fills, a dependency using a
        shorter-lived one, an unknown scope, a cycle, injected parameters that cannot be
        passed, a State of the wrong colour. A string annotation that does not resolve yet
        (a name defined further down the module) is left to the run, as before."""
        self._make_plan(task)  # not kept: annotations resolve again when the app starts
        params = list(task.signature.parameters.values())
        for p in params[1:] if task.options.echo else params:
            dep = dependency_of(p)
            if dep is not None:
                _check_dependency(dep, ())

    # --- resolution -----------------------------------------------------------------------

    def _scope(self, name: str, run: TaskRun) -> ScopeCache:
        if name == "task":
            made: ScopeCache | None = run.state.get(_RUN_SCOPE)
            if made is None:
                made = run.state[_RUN_SCOPE] = ScopeCache("task")
                run.on_close(partial(_close_run_scope, made, run))
            return made
        cache = self._scopes.get(name)
        if cache is None:
            cache = self._scopes[name] = ScopeCache(name)
        return cache

    def _state(self, cls: type[Any], app: AsyncQueueTasks) -> Any:
        return self.states.make(cls, app.global_config)

    async def resolve(
        self, dep: Dependency, run: TaskRun, path: tuple[Callable[..., Any], ...] = ()
    ) -> Any:
        """The value of ``dep`` in its scope, creating it (once) if needed."""
        if dep.func in path:
            chain = " -> ".join(getattr(f, "__qualname__", repr(f)) for f in (*path, dep.func))
            raise DependencyError(f"dependency cycle: {chain}")
        cache = self._scope(dep.scope, run)
        if dep.func in cache.values:
            return cache.values[dep.func]
        lock = cache.locks.setdefault(dep.func, anyio.Lock())
        async with lock:
            if dep.func in cache.values:
                return cache.values[dep.func]
            kwargs = await self._arguments(dep, run, (*path, dep.func))
            value = await _enter(cache.stack, dep.func, kwargs)
            cache.values[dep.func] = value
            return value

    async def _arguments(
        self, dep: Dependency, run: TaskRun, path: tuple[Callable[..., Any], ...]
    ) -> dict[str, Any]:
        try:
            signature = resolved_signature(dep.func)
        except (TypeError, ValueError):
            return {}
        kwargs: dict[str, Any] = {}
        for p in signature.parameters.values():
            if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                continue
            sub = dependency_of(p)
            state = state_class(p.annotation)
            if sub is not None:
                _check_use(dep, sub)
                kwargs[p.name] = await self.resolve(sub, run, path)
            elif state is not None:
                kwargs[p.name] = self._state(state, run.app)
            elif p.default is inspect.Parameter.empty:
                raise _unfilled(dep, p)
        return kwargs

    # --- the executor's injection step ----------------------------------------------------

    def arguments(
        self, args: list[Any], kwargs: dict[str, Any], run: TaskRun
    ) -> Awaitable[tuple[list[Any], dict[str, Any]]] | None:
        """The arguments of ``run`` with its ``Depends`` and State parameters filled in, or
        ``None`` when the task has none (most tasks: no coroutine is made). The executor
        calls it after the ``qtasks_executor_args`` transform. A failing dependency's
        exception, or the reason the task's parameters cannot be planned, is raised as it
        is: the task's own error (``retry_on_exc`` sees it)."""
        plan = self.plan(run.task)
        if not plan.items:
            return None
        return self._inject(plan, run.app, args, kwargs, run)

    async def _inject(
        self,
        plan: _Plan,
        app: AsyncQueueTasks,
        args: list[Any],
        kwargs: dict[str, Any],
        run: TaskRun,
    ) -> tuple[list[Any], dict[str, Any]]:
        kwargs = dict(kwargs)
        if not plan.keep_positional:
            # Injected parameters are passed by keyword, so caller positionals must be too.
            kwargs.update(zip(plan.positional, args, strict=False))
            args = []
        for name, spec in plan.items:
            if name in kwargs:
                continue  # passed explicitly by the caller: never overwritten
            if isinstance(spec, Dependency):
                kwargs[name] = await self.resolve(spec, run)
            else:
                kwargs[name] = self._state(spec, app)
        return list(args), kwargs

    @hookimpl
    async def qtasks_component_stopped(self, kind: str) -> None:
        # Shorter scopes still open end first: their values may use this one's. A worker
        # scope is open here when no worker run reported its stop (the inline test harness
        # runs tasks through ``process``).
        for name in sorted(self._scopes, key=_RANK.__getitem__):
            if _RANK[name] > _RANK.get(kind, 0):
                break
            cache = self._scopes.pop(name)
            await cache.aclose()

    @hookimpl
    async def qtasks_app_stopped(self) -> None:
        # Safety net for a custom worker that does not report its stop.
        for kind in list(self._scopes):
            await self.qtasks_component_stopped(kind)


def _check_use(dep: Dependency, sub: Dependency) -> None:
    """``dep`` takes ``sub``'s value: ``sub`` must live at least as long."""
    if _RANK[sub.scope] < _RANK[dep.scope]:
        raise DependencyError(
            f"{_name(dep.func)} (scope {dep.scope!r}) cannot use "
            f"{_name(sub.func)} (scope {sub.scope!r}): it would outlive it"
        )


def _unfilled(dep: Dependency, p: inspect.Parameter) -> DependencyError:
    """A parameter of ``dep``'s function without a default that nothing injects."""
    unresolved = (
        f" (its annotation {p.annotation!r} could not be resolved in the module of "
        f"{_name(dep.func)}; if it names a State or a Depends, {UnresolvedAnnotationError.FIX})"
        if isinstance(p.annotation, str)
        else ""
    )
    return DependencyError(
        f"parameter {p.name!r} of dependency {_name(dep.func)} has no default and "
        f"is neither Depends nor State{unresolved}"
    )


def _check_dependency(dep: Dependency, path: tuple[Callable[..., Any], ...]) -> None:
    """:meth:`InjectPlugin.check` for one dependency and, recursively, those it uses."""
    if dep.scope not in _RANK:  # a Dependency built directly, not through Depends()
        raise DependencyError(
            f"unknown Depends scope {dep.scope!r} of {_name(dep.func)}; expected one of "
            f"{list(_RANK)}"
        )
    if dep.func in path:
        chain = " -> ".join(_name(f) for f in (*path, dep.func))
        raise DependencyError(f"dependency cycle: {chain}")
    try:
        signature = resolved_signature(dep.func)
    except (TypeError, ValueError):  # no signature: called without arguments, as at run time
        return
    for p in signature.parameters.values():
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        sub = dependency_of(p)
        if sub is not None:
            _check_dependency(sub, (*path, dep.func))
            _check_use(dep, sub)
        elif (
            state_class(p.annotation) is None
            and p.default is inspect.Parameter.empty
            and not isinstance(p.annotation, str)  # may resolve by the run: checked then
        ):
            raise _unfilled(dep, p)


def _check_colour(task: TaskDef[..., Any], state: type[Any]) -> None:
    # An AsyncState in a sync task is served through a blocking view (blocking_view), as
    # QTasks users write it; only the other way round would block the event loop.
    if task.kind.is_async and issubclass(state, SyncState) and state.scope == "global_config":
        raise StateError(
            f"task {task.name!r} is async: a global_config SyncState ({state.__qualname__}) "
            "would block the event loop; use an AsyncState"
        )


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


__all__ = ["AsyncState", "Dependency", "Depends", "InjectPlugin", "Scope", "SyncState"]
