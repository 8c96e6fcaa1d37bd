"""Plugin registration and the one helper through which the core calls every hook.

(A package so that QTasks' import paths work beneath it: ``qtasks.plugins.states``,
``qtasks.plugins.depends`` and ``qtasks.plugins.base``; see :mod:`qtasks.compat`. QTasks'
plugin classes it held say what to write instead, see :mod:`qtasks.compat.names`.)

``hookimpl`` marks implementations. :class:`Hooks` wraps a pluggy ``PluginManager``: it checks
plugins at registration (unknown hook names, async ``firstresult``/wrapper implementations), and
calls hooks with the documented exception policy. A hook that no plugin implements costs one
set lookup: hot paths guard each call with ``if "qtasks_..." in hooks.active``, so not even the
call's arguments are built.
"""

from __future__ import annotations

import inspect
import logging
import operator
import reprlib
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, NoReturn, cast

import pluggy

from qtasks import hookspecs
from qtasks.cancels import is_error
from qtasks.errors import PluginError, TaskCodeError
from qtasks.masking import masked_error, masked_traceback
from qtasks.messages import Message
from qtasks.record import TaskRecord

hookimpl = pluggy.HookimplMarker("qtasks")
"""Marker for hook implementations: ``@hookimpl`` (``tryfirst``/``trylast`` supported)."""

log = logging.getLogger("qtasks.plugins")

_Picker = Callable[[dict[str, Any]], tuple[Any, ...]]
_Impl = tuple[str, Callable[..., Any], _Picker]
"""Plugin name, function, and what picks its arguments, in order, out of the call's keywords."""


def _picker(argnames: tuple[str, ...]) -> _Picker:
    """The positional arguments of an implementation taking ``argnames`` (pluggy passes
    exactly these, in this order), without building a keyword dict per call."""
    if len(argnames) > 1:
        return operator.itemgetter(*argnames)
    if argnames:
        (name,) = argnames
        return lambda kwargs: (kwargs[name],)
    return lambda kwargs: ()


class Hooks:
    """The app's plugin manager and hook caller."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("qtasks")
        self.pm.add_hookspecs(hookspecs)
        self._impls: dict[str, list[_Impl]] = {}
        self.active: frozenset[str] = frozenset()
        """Names of the hooks at least one plugin implements (wrappers included)."""

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register ``plugin``; raise :class:`PluginError` if it is broken.

        A plugin whose ``qtasks_unique`` attribute names a kind (a string) is refused when a
        plugin of that kind is registered already: two metrics plugins, one enabled in the
        configuration and one added in code, would count every task twice."""
        label = name or getattr(plugin, "name", None) or _label(plugin)
        if self.pm.is_registered(plugin):
            return str(self.pm.get_name(plugin))
        if self.pm.has_plugin(label):
            raise PluginError(label, "a plugin with this name is already registered")
        kind = getattr(plugin, "qtasks_unique", None)
        if isinstance(kind, str):
            for other_name, other in self.pm.list_name_plugin():
                if getattr(other, "qtasks_unique", None) == kind:
                    raise PluginError(
                        label,
                        f"one {kind} plugin per app, and {other_name!r} is one already "
                        "(an entry point enabled by the configuration, or an earlier "
                        "add_plugin); keep one of them",
                    )
        try:
            self.pm.register(plugin, name=label)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(label, str(exc)) from exc
        try:
            self._check(plugin, label)
        except PluginError:
            self.pm.unregister(plugin)
            raise
        self._refresh()
        return label

    def unregister(self, plugin: object) -> None:
        self.pm.unregister(plugin)
        self._refresh()

    def _check(self, plugin: object, label: str) -> None:
        for hook_name in dir(plugin):
            impl = getattr(plugin, hook_name, None)
            opts = getattr(impl, "qtasks_impl", None)
            if opts is None:
                if hook_name.startswith("qtasks_") and callable(impl) and self._is_hook(hook_name):
                    # pluggy registers marked methods only: this one would never be called.
                    raise PluginError(
                        label,
                        f"{hook_name} is named after a hook but not marked @hookimpl "
                        "(from qtasks import hookimpl), so it would never be called",
                    )
                continue
            spec_name = opts.get("specname") or hook_name
            caller = getattr(self.pm.hook, spec_name, None)
            if caller is None or caller.spec is None:
                raise PluginError(label, f"implements unknown hook {spec_name!r}")
            is_async = inspect.iscoroutinefunction(impl) or inspect.isasyncgenfunction(impl)
            wrapper = opts.get("wrapper") or opts.get("hookwrapper")
            if is_async and (caller.spec.opts.get("firstresult") or wrapper):
                raise PluginError(
                    label, f"{spec_name} must be a plain function (firstresult/wrapper hook)"
                )
            if wrapper and not caller.spec.opts.get("firstresult"):
                raise PluginError(
                    label, f"{spec_name}: wrappers are only supported on firstresult hooks"
                )

    def _is_hook(self, name: str) -> bool:
        caller = getattr(self.pm.hook, name, None)
        return isinstance(caller, pluggy.HookCaller) and caller.spec is not None

    def _refresh(self) -> None:
        self._impls = {}
        active = set()
        for hook_name in dir(self.pm.hook):
            caller = getattr(self.pm.hook, hook_name)
            if not isinstance(caller, pluggy.HookCaller):
                continue
            every = caller.get_hookimpls()
            if every:
                active.add(hook_name)
            impls = [i for i in every if not (i.wrapper or i.hookwrapper)]
            if impls:
                # pluggy calls the last registered (and tryfirst) first.
                self._impls[hook_name] = [
                    (i.plugin_name, i.function, _picker(tuple(i.argnames))) for i in reversed(impls)
                ]
        self.active = frozenset(active)

    def implemented(self, hook: str) -> bool:
        """Whether any plugin implements ``hook``."""
        return hook in self.active

    def notify(self, hook: str, **kwargs: Any) -> Awaitable[None]:
        """Call a notification hook: every implementation, errors logged and swallowed.

        Returns an awaitable. Plain-function implementations run right here, so when no
        implementation returns an awaitable the result is a ready one and no coroutine is
        made: an unused hook, or one with only sync implementations, stays nearly free."""
        impls = self._impls.get(hook)
        if not impls:
            return _DONE
        # No enumerate(): the index is looked for only when an implementation returned an
        # awaitable (a few percent of a notification's cost, on every task's path).
        for impl in impls:
            plugin, func, pick = impl
            try:
                result = func(*pick(kwargs))
            except BaseException as exc:
                _ignore(plugin, hook, exc)
                continue
            if result is not None and inspect.isawaitable(result):
                return self._notify_rest(hook, impls, _index(impls, impl), result, kwargs)
        return _DONE

    async def _notify_rest(
        self,
        hook: str,
        impls: list[_Impl],
        index: int,
        pending: Awaitable[Any],
        kwargs: dict[str, Any],
    ) -> None:
        """Await implementation ``index``'s result, then call the rest in order."""
        try:
            await pending
        except BaseException as exc:
            _ignore(impls[index][0], hook, exc)
        for plugin, func, pick in impls[index + 1 :]:
            try:
                result = func(*pick(kwargs))
                if inspect.isawaitable(result):
                    await result
            except BaseException as exc:
                _ignore(plugin, hook, exc)

    def notify_sync(self, hook: str, **kwargs: Any) -> list[Any]:
        """Call a notification hook from sync code; returns awaitables to run later."""
        pending: list[Any] = []
        for plugin, func, pick in self._impls.get(hook, ()):
            try:
                result = func(*pick(kwargs))
                if inspect.isawaitable(result):
                    pending.append(result)
            except Exception:
                log.exception("plugin %r failed in hook %s (ignored)", plugin, hook)
        return pending

    def transform(
        self, hook: str, field: str | tuple[str, ...], /, **kwargs: Any
    ) -> Awaitable[Any]:
        """Call a transform hook chaining ``kwargs[field]`` through every implementation.

        Awaiting it gives the final value. ``field`` may name several arguments (the hook then
        returns a tuple of their new values, and so does this). An implementation's exception
        (or a stray cancellation, see :mod:`qtasks.cancels`) is raised as
        :class:`PluginError` naming the plugin, except a
        :class:`~qtasks.errors.TaskCodeError`, whose cause is raised as it is. As in
        :meth:`notify`, plain-function implementations run right here and need no
        coroutine."""
        impls = self._impls.get(hook)
        if not impls:
            return _Ready(_value(kwargs, field))
        one = field if type(field) is str else None
        for impl in impls:  # no enumerate(), as in notify()
            plugin, func, pick = impl
            try:
                result = func(*pick(kwargs))
            except BaseException as exc:
                return _Failed(_blame(plugin, hook, exc))
            if result is None or (one is not None and result is kwargs[one]):
                continue  # unchanged: a value handed back as it came is no awaitable to check
            if inspect.isawaitable(result):
                return self._transform_rest(hook, impls, _index(impls, impl), result, field, kwargs)
            wrong = _assign(kwargs, field, result)
            if wrong is not None:
                return _Failed(PluginError(plugin, f"hook {hook} {wrong}"))
        return _Ready(kwargs[one] if one is not None else _value(kwargs, field))

    async def _transform_rest(
        self,
        hook: str,
        impls: list[_Impl],
        index: int,
        pending: Awaitable[Any],
        field: str | tuple[str, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Await implementation ``index``'s result, then chain the rest in order."""
        try:
            result = await pending
        except BaseException as exc:
            _Failed(_blame(impls[index][0], hook, exc)).throw()
        if result is not None:
            wrong = _assign(kwargs, field, result)
            if wrong is not None:
                raise PluginError(impls[index][0], f"hook {hook} {wrong}")
        for plugin, func, pick in impls[index + 1 :]:
            try:
                result = func(*pick(kwargs))
                if type(field) is str and result is kwargs[field]:
                    continue  # handed back as it came: unchanged, as in transform()
                if inspect.isawaitable(result):
                    result = await result
            except BaseException as exc:
                _Failed(_blame(plugin, hook, exc)).throw()
            if result is not None:
                wrong = _assign(kwargs, field, result)
                if wrong is not None:
                    raise PluginError(plugin, f"hook {hook} {wrong}")
        return _value(kwargs, field)

    def decide(self, hook: str, **kwargs: Any) -> Any:
        """Call a ``firstresult`` hook through pluggy (wrappers included)."""
        if hook not in self.active:
            return None
        try:
            return getattr(self.pm.hook, hook)(**kwargs)
        except Exception as exc:
            error = _hook_error(_culprit(self, hook), hook, exc)
        raise error  # out of the handler: the raw exception is not even its __context__


def _ignore(plugin: str, hook: str, exc: BaseException) -> None:
    """Log that ``plugin``'s implementation of the notification ``hook`` failed with ``exc``,
    and go on. What is not an error is raised again; a stray cancellation (the hook's own, not
    a stop, see :mod:`qtasks.cancels`) is one."""
    if not is_error(exc):
        raise exc
    log.error("plugin %r failed in hook %s (ignored): %s", plugin, hook, masked_error(exc))
    log.debug("plugin %r: hook %s raised\n%s", plugin, hook, masked_traceback(exc))


def _index(impls: list[_Impl], impl: _Impl) -> int:
    """The position of ``impl`` (that very tuple) in ``impls``."""
    return next(i for i, each in enumerate(impls) if each is impl)


def _value(kwargs: dict[str, Any], field: str | tuple[str, ...]) -> Any:
    if isinstance(field, str):
        return kwargs[field]
    return tuple(kwargs[name] for name in field)


_SHAPES: dict[str, tuple[type[Any], ...]] = {
    "args": (list, tuple),
    "kwargs": (dict,),
    "middlewares": (list, tuple),
    "report": (dict,),
    "message": (Message,),
    "record": (TaskRecord,),
}
"""What a transform hook must return for each of these values; the others (``result``,
``value``) may be anything."""


def _assign(kwargs: dict[str, Any], field: str | tuple[str, ...], result: Any) -> str | None:
    """Put a transform's ``result`` in ``kwargs``; what is wrong with it instead (the rest of
    the error message), leaving ``kwargs`` unchanged: a value of the wrong type or shape would
    fail later, in the core, blamed on the task or the caller rather than on the plugin."""
    names, values = ((field,), (result,)) if isinstance(field, str) else (field, result)
    if not isinstance(values, tuple | list) or len(values) != len(names):
        return f"returned {reprlib.repr(result)}, not a tuple ({', '.join(names)})"
    for name, value in zip(names, values, strict=True):
        shape = _SHAPES.get(name)
        if shape is not None and not isinstance(value, shape):
            expected = " or ".join(kind.__name__ for kind in shape)
            return f"returned {name} of type {type(value).__name__}, not {expected}"
    kwargs.update(zip(names, values, strict=True))
    return None


def _blame(plugin: str, hook: str, exc: BaseException) -> BaseException:
    """The error to raise for ``exc`` from ``plugin``'s implementation of ``hook``: the
    task's own exception itself when the plugin marked it so, else :func:`_hook_error`. What
    is not an error is raised again; a stray cancellation (the hook's own, not a stop, see
    :mod:`qtasks.cancels`) is one, so it fails the task with the plugin named, as in
    :func:`_ignore`, instead of being blamed on the task and retried."""
    if not is_error(exc):
        raise exc
    if isinstance(exc, TaskCodeError) and exc.__cause__ is not None:
        return exc.__cause__  # raised as it is, its own cause kept
    return _hook_error(plugin, hook, exc)


def _hook_error(plugin: str, hook: str, exc: BaseException) -> PluginError:
    """The :class:`PluginError` for ``plugin``'s implementation of ``hook`` raising ``exc``:
    its text masked (:func:`~qtasks.masking.masked_error`), as the errors of a plugin's import
    and constructor are, and not chained from ``exc``, whose text any traceback of the error
    (the task record's, a log's, Sentry's) would show as it is. The masked traceback of ``exc``
    is logged at DEBUG, for the plugin's author."""
    log.debug("plugin %r: hook %s raised\n%s", plugin, hook, masked_traceback(exc))
    error = PluginError(plugin, f"hook {hook} raised {masked_error(exc)}")
    error.__suppress_context__ = True  # raised while exc is handled: not shown as its context
    return error


class _Ready:
    """An awaitable that is already done (no coroutine object, no loop round trip)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, Any]:
        return self.value
        yield  # pragma: no cover - makes this a generator


class _Done:
    """The awaitable of a notification whose implementations all ran: awaiting it gives
    ``None`` at once, through an empty iterator (a generator made and ended per await costs
    a fifth of a notification)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return cast("Generator[Any, None, None]", iter(()))  # an iterator is what await needs


_DONE = _Done()


class _Failed:
    """An awaitable that raises ``error`` when awaited."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def throw(self) -> NoReturn:
        raise self.error

    def __await__(self) -> Generator[Any, None, Any]:
        self.throw()
        yield  # pragma: no cover - makes this a generator


def _label(plugin: object) -> str:
    cls = plugin if isinstance(plugin, type) else type(plugin)
    module = getattr(plugin, "__name__", None) if inspect.ismodule(plugin) else None
    return module or f"{cls.__module__}.{cls.__qualname__}"


def _culprit(hooks: Hooks, hook: str) -> str:
    names = [plugin for plugin, _, _ in hooks._impls.get(hook, ())]
    return ",".join(names) or "?"


# Re-exported: ``from qtasks.plugins import AsyncState, SyncState, Depends`` (QTasks' path;
# Depends on first use: qtasks.depends imports this module).
from qtasks.state import AsyncState as AsyncState  # noqa: E402
from qtasks.state import SyncState as SyncState  # noqa: E402

if TYPE_CHECKING:
    from qtasks.depends import Depends as Depends
else:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__, lazy={"Depends": "qtasks.depends"})
