"""Plugins written for QTasks 1.7, run on qtasks' hooks.

A QTasks plugin subclasses :class:`BasePlugin` and implements ``trigger(name, **kwargs)`` (sync
or async), returning ``None`` or a dict of replaced values; it is registered with
``app.add_plugin(plugin, trigger_names=[...], component=...)``. qtasks wraps it in an adapter
whose hook implementations call ``trigger`` with QTasks' trigger name and keywords, at the moment
:data:`TRIGGERS` maps it to (the table in :mod:`qtasks.hookspecs` says the same).

What differs from QTasks, on purpose:

* A returned dict replaces only the keys it has (QTasks reset ``args``/``kw`` that a plugin did
  not return). Results are honoured where the qtasks hook transforms (:data:`TRANSFORMS`);
  elsewhere qtasks only notifies and a returned dict is ignored with a warning logged once per
  plugin and trigger (the reasons are in docs/coming-from-qtasks.md).
* ``component=None`` reaches the app's ``qtasks_*`` triggers and ``starter_*``;
  ``component="worker"`` the ``worker_*`` and ``task_executor_*`` ones; ``"broker"``,
  ``"storage"``, ``"global_config"`` theirs. No ``trigger_names``: every trigger of the component
  (QTasks' ``"Globals"``).
* ``plugin.start()`` runs when the app has started, ``plugin.stop()`` when it has stopped, once
  each; ``plugin_cache`` is the plugin's own dict and is never shared between plugins.
* Keyword values are qtasks objects: ``task_broker``/``model`` are the task's record (with
  QTasks' ``name`` for its ``task_name``), ``task_func`` a view of its
  :class:`~qtasks.task.TaskDef` with QTasks' fields (:mod:`qtasks.compat.task_func`),
  ``task_executor`` ``None``; ``args_info`` is QTasks' list of :class:`ArgMeta` (see
  :func:`args_info`).

Over ~500 lines: QTasks 1.7's whole plugin surface, each of its triggers mapped onto one
hook, in one table-like module.
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, get_args, get_origin

from qtasks.compat.task_func import task_func
from qtasks.errors import PluginError, TaskCancelledError
from qtasks.plugins import hookimpl

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.executor import CallNext, Middleware, TaskRun
    from qtasks.messages import Message
    from qtasks.plugins import Hooks
    from qtasks.record import TaskRecord
    from qtasks.task import TaskDef

log = logging.getLogger("qtasks.compat.plugins")

COMPONENTS = ("worker", "broker", "storage", "global_config")

TRIGGERS: dict[str, tuple[str, str]] = {
    # trigger: (component, qtasks hook). "app": component=None; "any": every component.
    "qtasks_add_task_before_broker": ("app", "qtasks_task_enqueue"),
    "qtasks_add_task_after_broker": ("app", "qtasks_task_enqueued"),
    "qtasks_get": ("app", "qtasks_storage_got"),
    "qtasks_stop": ("app", "qtasks_app_stopping"),
    "qtasks_ping": ("app", "qtasks_app_pinged"),
    "qtasks_flush_all": ("app", "qtasks_app_flushed"),
    "starter_start": ("any", "qtasks_app_started"),
    "starter_stop": ("any", "qtasks_app_stopping"),
    "broker_listen_start": ("broker", "qtasks_broker_listening"),
    "broker_add_before": ("broker", "qtasks_storage_added"),
    "broker_add_after": ("broker", "qtasks_task_enqueued"),
    "broker_add_worker": ("broker", "qtasks_worker_task_received"),
    "broker_get": ("broker", "qtasks_storage_got"),
    "broker_update": ("broker", "qtasks_storage_saved"),
    "broker_start": ("broker", "qtasks_component_started"),
    "broker_stop": ("broker", "qtasks_component_stopped"),
    "broker_remove_finished_task": ("broker", "qtasks_broker_acked"),
    "broker_flush_all": ("broker", "qtasks_app_flushed"),
    "storage_add": ("storage", "qtasks_storage_added"),
    "storage_get": ("storage", "qtasks_storage_got"),
    "storage_update": ("storage", "qtasks_storage_saved"),
    "storage_add_process": ("storage", "qtasks_storage_saved"),
    "storage_remove_finished_task": ("storage", "qtasks_broker_acked"),
    "storage_start": ("storage", "qtasks_component_started"),
    "storage_stop": ("storage", "qtasks_component_stopped"),
    "storage_flush_all": ("storage", "qtasks_app_flushed"),
    "global_config_set": ("global_config", "qtasks_global_config_write"),
    "global_config_get": ("global_config", "qtasks_global_config_got"),
    "global_config_start": ("global_config", "qtasks_component_started"),
    "global_config_stop": ("global_config", "qtasks_component_stopped"),
    "global_config_set_status": ("global_config", "qtasks_global_config_status"),
    "worker_add": ("worker", "qtasks_worker_task_received"),
    "worker_start": ("worker", "qtasks_component_started"),
    "worker_stop": ("worker", "qtasks_component_stopped"),
    "worker_execute_before": ("worker", "qtasks_worker_execute_before"),
    "worker_run_task_before": ("worker", "qtasks_worker_execute_before"),
    "worker_execute_after": ("worker", "qtasks_worker_execute_after"),
    "worker_task_error_retry": ("worker", "qtasks_worker_task_retry"),
    "worker_remove_finished_task": ("worker", "qtasks_broker_acked"),
    "task_executor_middlewares_execute": ("worker", "qtasks_executor_middlewares"),
    "task_executor_args_replace": ("worker", "qtasks_executor_args"),
    "task_executor_before_execute": ("worker", "qtasks_executor_execute_before"),
    "task_executor_run_task": ("worker", "qtasks_executor_result"),
    "task_executor_run_task_gen": ("worker", "qtasks_executor_result"),
    "task_executor_after_execute": ("worker", "qtasks_executor_execute_after"),
    "task_executor_after_execute_result_replace": ("worker", "qtasks_executor_result"),
    "task_executor_decode": ("worker", "qtasks_executor_result"),
    "task_executor_run_task_trigger_error": ("worker", "qtasks_executor_middlewares"),
    "task_executor_task_close": ("worker", "qtasks_executor_closed"),
}
"""Every QTasks trigger the adapter serves, with its component and the qtasks hook."""

UNMAPPED: dict[str, str] = {
    "broker_running_older_tasks": "no start-up recovery runs: expired leases are redelivered "
    "by the broker (qtasks_broker_message_received, attempt > 1)",
    "storage_running_older_tasks": "as broker_running_older_tasks",
    "storage_delete_finished_tasks": "finished records expire by TTL inside the storage; no "
    "process deletes them",
    "storage_get_all": "qtasks has no call that reads every record (records are read by uuid; "
    "qtasks inspect shows counts)",
    "global_config_get_all": "no app call reads a whole namespace through plugins; "
    "qtasks_global_config_got sees each value app.config_get reads",
    "global_config_get_match": "as global_config_get_all",
    "stats_inspect": "qtasks_inspect (a plain hookimpl) adds keys to the report",
}
"""QTasks triggers with no qtasks moment, and why. Registering one is refused."""

TRANSFORMS: dict[str, tuple[str, ...]] = {
    "qtasks_add_task_before_broker": ("task_name", "priority", "args", "kw"),
    "qtasks_get": ("task",),
    "broker_get": ("task",),
    "storage_get": ("result",),
    "global_config_get": ("get",),
    "global_config_set": ("value",),
    "task_executor_args_replace": ("args", "kw"),
    "task_executor_run_task": ("result",),
    "task_executor_run_task_gen": ("results",),
    "task_executor_after_execute_result_replace": ("result",),
    "task_executor_decode": ("result",),
    "task_executor_run_task_trigger_error": ("result",),
}
"""Triggers whose returned keys qtasks applies (others only notify)."""


class BasePlugin(ABC):
    """Base of a QTasks-style plugin: implement :meth:`trigger` (sync or ``async``); a
    subclass without it cannot be instantiated (``TypeError`` naming the method)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.plugin_cache: dict[str, Any] = {}

    @abstractmethod
    def trigger(self, name: str, **kwargs: Any) -> Any:
        """Called at trigger ``name`` with its keywords; return ``None`` or a dict of values to
        replace (honoured on the triggers in :data:`TRANSFORMS`)."""

    def start(self, *args: Any, **kwargs: Any) -> Any:
        """Called once the app has started (may be ``async``)."""
        return None

    def stop(self, *args: Any, **kwargs: Any) -> Any:
        """Called once the app has stopped (may be ``async``)."""
        return None


def is_qtasks_plugin(plugin: object) -> bool:
    """Whether ``plugin`` is written for QTasks (a ``trigger`` method, no qtasks hooks)."""
    if isinstance(plugin, BasePlugin):
        return True
    if inspect.isclass(plugin) or inspect.ismodule(plugin):
        return False
    if not callable(getattr(plugin, "trigger", None)):
        return False
    return not any(
        getattr(getattr(plugin, name, None), "qtasks_impl", None) is not None
        for name in dir(plugin)
        if name.startswith("qtasks_")
    )


def _label(plugin: Any) -> str:
    """The name a QTasks plugin goes by in errors and in its adapter's name."""
    return str(getattr(plugin, "name", None) or type(plugin).__qualname__)


def _subscribed(
    plugin: str, trigger_names: Sequence[str] | None, component: str | None
) -> frozenset[str]:
    scope = component or "app"
    if scope != "app" and scope not in COMPONENTS:
        raise PluginError(
            plugin, f"component must be None or one of {COMPONENTS}, got {component!r}"
        )
    if trigger_names is None or "Globals" in trigger_names:
        return frozenset(t for t, (c, _) in TRIGGERS.items() if c in (scope, "any"))
    chosen = set()
    for name in trigger_names:
        if name in UNMAPPED:
            raise PluginError(plugin, f"trigger {name!r} has no qtasks moment: {UNMAPPED[name]}")
        if name not in TRIGGERS:
            raise PluginError(plugin, f"unknown QTasks trigger {name!r}")
        if TRIGGERS[name][0] not in (scope, "any"):
            raise PluginError(
                plugin,
                f"trigger {name!r} belongs to component {TRIGGERS[name][0]!r}, not {scope!r} "
                f"(add_plugin(..., component={TRIGGERS[name][0]!r}))",
            )
        chosen.add(name)
    return frozenset(chosen)


class _Adapter:
    """Runs one QTasks plugin at the hooks of its subscribed triggers (see :func:`adapt`)."""

    def __init__(self, plugin: Any, triggers: frozenset[str], component: str | None) -> None:
        self.plugin = plugin
        self.triggers = triggers
        self.component = component
        self._warned: set[str] = set()
        self._started = False
        self.name = f"qtasks17:{_label(plugin)}:{component or 'app'}"

    async def fire(self, trigger: str, **kwargs: Any) -> dict[str, Any] | None:
        """Call the plugin at ``trigger``; the dict of replaced values it returned, if any.
        Its exception propagates (the calling hook's policy applies)."""
        if trigger not in self.triggers:
            return None
        result = self.plugin.trigger(trigger, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        if not result:
            return None
        if not isinstance(result, dict):
            raise PluginError(self.name, f"trigger {trigger!r} returned {result!r}, not a dict")
        if trigger not in TRANSFORMS:
            if trigger not in self._warned:
                self._warned.add(trigger)
                log.warning(
                    "QTasks plugin %s returned %s from %s: qtasks only notifies there, so "
                    "the values are ignored (see docs/coming-from-qtasks.md)",
                    self.name,
                    sorted(result),
                    trigger,
                )
            return None
        return {k: v for k, v in result.items() if k in TRANSFORMS[trigger]}

    # --- lifecycle ------------------------------------------------------------------------

    @hookimpl
    async def qtasks_app_started(self, app: AsyncQueueTasks) -> None:
        if not self._started:
            self._started = True
            await _maybe_await(self.plugin.start())
        await self.fire("starter_start", starter=None)

    @hookimpl
    async def qtasks_app_stopping(self, app: AsyncQueueTasks) -> None:
        await self.fire("qtasks_stop", qtasks=app, starter=None)
        await self.fire("starter_stop", starter=None)

    @hookimpl
    async def qtasks_app_stopped(self, app: AsyncQueueTasks) -> None:
        if self._started:
            self._started = False
            await _maybe_await(self.plugin.stop())

    @hookimpl
    async def qtasks_component_started(
        self, app: AsyncQueueTasks, kind: str, component: Any
    ) -> None:
        extra = {"worker": app.worker} if kind == "broker" else {}  # as QTasks passed it
        await self.fire(f"{kind}_start", **{kind: component}, **extra)

    @hookimpl
    async def qtasks_component_stopped(
        self, app: AsyncQueueTasks, kind: str, component: Any
    ) -> None:
        await self.fire(f"{kind}_stop", **{kind: component})

    @hookimpl
    async def qtasks_app_pinged(self, app: AsyncQueueTasks) -> None:
        await self.fire("qtasks_ping", qtasks=app, global_config=app.global_config)

    @hookimpl
    async def qtasks_app_flushed(self, app: AsyncQueueTasks) -> None:
        await self.fire("qtasks_flush_all", qtasks=app, broker=app.broker)
        await self.fire("broker_flush_all", broker=app.broker)
        await self.fire("storage_flush_all", storage=app.storage)

    # --- producer -------------------------------------------------------------------------

    @hookimpl
    async def qtasks_task_enqueue(self, app: AsyncQueueTasks, message: Message) -> Message | None:
        got = await self.fire(
            "qtasks_add_task_before_broker",
            qtasks=app,
            broker=app.broker,
            task_name=message.task_name,
            priority=message.priority,
            args=tuple(message.args),
            kw=dict(message.kwargs),
        )
        if not got:
            return None
        changes: dict[str, Any] = {}
        for key, field in (("task_name", "task_name"), ("priority", "priority")):
            if key in got:
                changes[field] = got[key]
        if "args" in got:
            changes["args"] = list(got["args"] or ())
        if "kw" in got:
            changes["kwargs"] = dict(got["kw"] or {})
        return replace(message, **changes)

    @hookimpl
    async def qtasks_task_enqueued(self, app: AsyncQueueTasks, record: TaskRecord) -> None:
        await self.fire(
            "qtasks_add_task_after_broker",
            qtasks=app,
            broker=app.broker,
            task_name=record.task_name,
            priority=record.priority,
            args=tuple(record.args),
            kwargs=dict(record.kwargs),
        )
        await self.fire("broker_add_after", broker=app.broker, storage=app.storage, model=record)

    @hookimpl
    async def qtasks_storage_added(self, app: AsyncQueueTasks, record: TaskRecord) -> None:
        await self.fire("broker_add_before", broker=app.broker, storage=app.storage, model=record)
        await self.fire("storage_add", storage=app.storage, uuid=record.uuid, task_status=record)

    @hookimpl
    async def qtasks_storage_got(
        self, app: AsyncQueueTasks, record: TaskRecord
    ) -> TaskRecord | None:
        replaced: TaskRecord | None = None
        for trigger, keyword, kwargs in (
            ("storage_get", "result", {"storage": app.storage}),
            ("broker_get", "task", {"broker": app.broker}),
            ("qtasks_get", "task", {"qtasks": app, "broker": app.broker}),
        ):
            got = await self.fire(trigger, **kwargs, **{keyword: replaced or record})
            if got and got.get(keyword) is not None:
                replaced = got[keyword]
        return replaced

    # --- global config --------------------------------------------------------------------

    @hookimpl
    async def qtasks_global_config_write(
        self, app: AsyncQueueTasks, namespace: str, key: str, value: Any
    ) -> Any:
        got = await self.fire(
            "global_config_set",
            global_config=app.global_config,
            name_=namespace,
            key=key,
            value=value,
        )
        return got.get("value") if got else None

    @hookimpl
    async def qtasks_global_config_got(self, app: AsyncQueueTasks, value: Any) -> Any:
        got = await self.fire("global_config_get", global_config=app.global_config, get=value)
        return got.get("get") if got else None

    @hookimpl
    async def qtasks_global_config_status(self, app: AsyncQueueTasks) -> None:
        await self.fire("global_config_set_status", global_config=app.global_config)

    # --- worker ---------------------------------------------------------------------------

    @hookimpl
    async def qtasks_broker_listening(self, app: AsyncQueueTasks, worker: Any) -> None:
        await self.fire("broker_listen_start", broker=app.broker, worker=worker)

    @hookimpl
    async def qtasks_worker_task_received(self, app: AsyncQueueTasks, message: Message) -> None:
        fields = {
            "task_name": message.task_name,
            "uuid": message.uuid,
            "priority": message.priority,
            "args": tuple(message.args),
            "kw": dict(message.kwargs),
            "created_at": message.created_at,
        }
        await self.fire("broker_add_worker", broker=app.broker, worker=app.worker, **fields)
        await self.fire("worker_add", worker=app.worker, **fields)

    @hookimpl
    async def qtasks_storage_saved(self, app: AsyncQueueTasks, record: TaskRecord) -> None:
        if record.status.value == "process":
            await self.fire("storage_add_process", storage=app.storage)
        kw = asdict(record)
        await self.fire("broker_update", broker=app.broker, kw=kw)
        await self.fire("storage_update", storage=app.storage, kw=kw)

    @hookimpl
    async def qtasks_worker_execute_before(self, app: AsyncQueueTasks, record: TaskRecord) -> None:
        task = task_func(app, record.task_name)
        await self.fire(
            "worker_execute_before",
            worker=app.worker,
            task_broker=record,
            task_func=task,
            model=record,
        )
        await self.fire(
            "worker_run_task_before", worker=app.worker, task_func=task, task_broker=record
        )

    @hookimpl
    async def qtasks_worker_execute_after(self, app: AsyncQueueTasks, record: TaskRecord) -> None:
        task = task_func(app, record.task_name)
        await self.fire("worker_execute_after", task_func=task, task_broker=record, model=record)

    @hookimpl
    async def qtasks_worker_task_retry(
        self, app: AsyncQueueTasks, record: TaskRecord, exc: BaseException
    ) -> None:
        task = task_func(app, record.task_name)
        await self.fire(
            "worker_task_error_retry",
            broker=app.broker,
            task_func=task,
            task_broker=record,
            trace=exc,
        )

    @hookimpl
    async def qtasks_broker_acked(self, app: AsyncQueueTasks, record: TaskRecord) -> None:
        task = task_func(app, record.task_name)
        await self.fire(
            "worker_remove_finished_task",
            worker=app.worker,
            broker=app.broker,
            task_func=task,
            task_broker=record,
            model=record,
        )
        await self.fire(
            "broker_remove_finished_task", broker=app.broker, storage=app.storage, model=record
        )
        await self.fire(
            "storage_remove_finished_task", storage=app.storage, task_broker=record, model=record
        )

    # --- executor -------------------------------------------------------------------------

    @hookimpl
    async def qtasks_executor_middlewares(
        self, app: AsyncQueueTasks, task: TaskDef[..., Any], middlewares: list[Middleware]
    ) -> list[Middleware] | None:
        opts = task.options
        await self.fire(
            "task_executor_middlewares_execute",
            task_executor=None,
            middlewares_before=list(opts.middlewares_before),
        )
        await self.fire(
            "task_executor_middlewares_execute",
            task_executor=None,
            middlewares_after=list(opts.middlewares_after),
        )
        if "task_executor_run_task_trigger_error" not in self.triggers:
            return None
        return [*middlewares, self._error_middleware]

    async def _error_middleware(self, run: TaskRun, call_next: CallNext) -> Any:
        """QTasks' ``task_executor_run_task_trigger_error``: a plugin may turn the task's
        exception into its result by returning ``{"result": ...}``."""
        try:
            return await call_next()
        except TaskCancelledError:
            raise
        except Exception as exc:
            got = await self.fire(
                "task_executor_run_task_trigger_error",
                task_executor=None,
                task_func=task_func(run.app, run.task.name),
                task_broker=run.record,
                e=exc,
            )
            if got and "result" in got:
                return got["result"]
            raise

    @hookimpl
    async def qtasks_executor_args(
        self, task: TaskDef[..., Any], args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]] | None:
        got = await self.fire(
            "task_executor_args_replace",
            task_executor=None,
            args=list(args),
            kw=dict(kwargs),
            args_info=args_info(task),
        )
        if not got:
            return None
        return list(got.get("args", args)), dict(got.get("kw", kwargs))

    @hookimpl
    async def qtasks_executor_execute_before(self) -> None:
        await self.fire("task_executor_before_execute", task_executor=None)

    @hookimpl
    async def qtasks_executor_result(
        self, app: AsyncQueueTasks, record: TaskRecord, result: Any
    ) -> Any:
        task = app.tasks.get(record.task_name)
        changed = False
        steps = ["task_executor_run_task"]
        if task is not None and task.kind.value.endswith("gen"):
            steps = ["task_executor_run_task_gen"]
        steps += ["task_executor_after_execute_result_replace", "task_executor_decode"]
        for trigger in steps:
            keyword = "results" if trigger.endswith("_gen") else "result"
            got = await self.fire(trigger, task_executor=None, **{keyword: result})
            if got and keyword in got:
                result, changed = got[keyword], True
        return result if changed else None

    @hookimpl
    async def qtasks_executor_execute_after(self) -> None:
        await self.fire("task_executor_after_execute", task_executor=None)

    @hookimpl
    async def qtasks_executor_closed(self, app: AsyncQueueTasks, record: TaskRecord) -> None:
        await self.fire(
            "task_executor_task_close",
            task_executor=None,
            task_func=task_func(app, record.task_name),
            task_broker=record,
        )


@dataclass
class ArgMeta:
    """One parameter of a task, as QTasks described it to ``task_executor_args_replace``."""

    name: str
    value: Any
    origin: Any
    raw_type: Any
    annotation: Any
    is_kwarg: bool
    index: int | None = None
    key: str | None = None


def args_info(task: TaskDef[..., Any]) -> list[ArgMeta]:
    """QTasks' ``args_info``: one :class:`ArgMeta` per parameter of the task function, built
    as QTasks built it. A parameter without a default is positional (``index`` counts
    those, ``value`` is ``None``); one with a default (or keyword-only) is a keyword (``key``,
    ``value`` its default). Unlike QTasks, an echo task's ``self`` is left out (it is not in
    ``args`` at this point, so ``index`` points into ``args``) and annotations are resolved
    (QTasks gave the strings of ``from __future__ import annotations``)."""
    params = list(task.signature.parameters.values())
    if task.options.echo:
        params = params[1:]
    infos: list[ArgMeta] = []
    index = 0
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = None if param.annotation is param.empty else param.annotation
        type_args = get_args(annotation)
        meta = ArgMeta(
            name=param.name,
            value=None,
            origin=get_origin(annotation),
            raw_type=type_args[0] if type_args else annotation,
            annotation=annotation,
            is_kwarg=True,
        )
        if param.default is param.empty and param.kind is not param.KEYWORD_ONLY:
            meta.is_kwarg, meta.index = False, index
            index += 1
        else:
            meta.key = param.name
            meta.value = None if param.default is param.empty else param.default
        infos.append(meta)
    return infos


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


_LIFECYCLE = ("qtasks_app_started", "qtasks_app_stopped")
"""Hooks every adapter implements: the plugin's ``start()`` and ``stop()``."""


def adapt_for(
    hooks: Hooks,
    plugin: object,
    name: str | Sequence[str] | None,
    trigger_names: Sequence[str] | None,
    component: str | None,
) -> tuple[object, str | None]:
    """What ``app.add_plugin`` registers, and under which name: ``plugin`` itself, or for a
    QTasks plugin (a ``trigger`` method, or ``trigger_names``/``component`` given) its adapter.
    ``name`` may be QTasks' ``trigger_names``: QTasks' positional ``add_plugin(plugin,
    trigger_names, component)`` lands here as ``(name, trigger_names)``, shifted back."""
    if name is not None and not isinstance(name, str):
        if isinstance(trigger_names, str):  # QTasks' third positional: the component
            if component is not None and component != trigger_names:
                raise PluginError(
                    _label(plugin),
                    f"component given twice: {trigger_names!r} (third positional, QTasks' "
                    f"add_plugin(plugin, trigger_names, component)) and component={component!r}",
                )
            name, trigger_names, component = None, name, trigger_names
        elif trigger_names is not None:
            raise PluginError(
                _label(plugin),
                f"trigger names given twice: {list(name)!r} (second positional, QTasks' "
                f"trigger_names) and trigger_names={list(trigger_names)!r}",
            )
        else:
            name, trigger_names = None, name
    if trigger_names is None and component is None and not is_qtasks_plugin(plugin):
        return plugin, name
    adapter = adapt(plugin, trigger_names, component)
    label = name or str(getattr(adapter, "name", ""))
    if hooks.pm.has_plugin(label):  # one plugin added for several components
        label = f"{label}#{len(hooks.pm.get_plugins())}"
    return adapter, label


def adapt(
    plugin: Any, trigger_names: Sequence[str] | None = None, component: str | None = None
) -> object:
    """A qtasks plugin object running the QTasks ``plugin`` on the hooks of its triggers.

    Only the hooks it needs are implemented, so an app without QTasks plugins keeps its fast
    paths. Raises :class:`~qtasks.errors.PluginError` for an unknown trigger, one of another
    component, or one with no qtasks moment (:data:`UNMAPPED`, with the reason)."""
    if not callable(getattr(plugin, "trigger", None)):
        raise PluginError(_label(plugin), "a QTasks plugin needs a trigger(name, **kwargs) method")
    triggers = _subscribed(_label(plugin), trigger_names, component)
    needed = {TRIGGERS[t][1] for t in triggers} | set(_LIFECYCLE)
    cls = type("QTasksPluginAdapter", (_Adapter,), {})
    # Hide the hooks it does not need: pluggy registers what it finds on the object.
    for name in dir(_Adapter):
        if name.startswith("qtasks_") and name not in needed:
            setattr(cls, name, None)
    return cls(plugin, triggers, component)
