"""``qtasks inspect``: what an app's components hold, as one JSON-ready report."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from qtasks.components import FlowControl, WorkflowStore, provides
from qtasks.masking import mask_url
from qtasks.task import TaskDef
from qtasks.workflows import runtime as workflows

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks


WORKFLOWS_SHOWN = 20
"""How many of the newest workflows ``qtasks inspect`` lists."""


def components_line(app: AsyncQueueTasks) -> str:
    """``broker RedisBroker at redis://host:6379/0, storage ..., global config ...``: each
    component's class and, when remote and configured, its URL (password masked), for the
    line a command logs when it serves (``qtasks run``, ``qtasks web``)."""
    shown = []
    for kind in ("broker", "storage", "global_config"):
        component = getattr(app, kind)
        url = None if getattr(component, "local", False) else getattr(app.config, f"{kind}_url")
        where = f" at {mask_url(url)}" if url else ""
        shown.append(f"{kind.replace('_', ' ')} {type(component).__name__}{where}")
    return ", ".join(shown)


async def inspect(app: AsyncQueueTasks) -> dict[str, Any]:
    """Registered tasks with their options, queue depth per priority, delayed, in-flight and
    dead-lettered counts (``broker.stats()``), workers alive (``global_config.workers()``),
    records by status (``storage.stats()``), the plugins, how enqueue reaches the backends,
    and with a :class:`~qtasks.components.FlowControl` global config the live flow-control
    figures (``flow``: rate tokens and slots, with what waits for them; ``flow_error``
    instead when they could not be read), with a
    :class:`~qtasks.components.WorkflowStore` storage the newest workflows (``workflows``:
    :func:`qtasks.workflows.runtime.summary` of each, at most :data:`WORKFLOWS_SHOWN`); then
    the ``qtasks_inspect`` hook may add keys. ``app`` is started."""
    stats = await app.broker.stats()
    report: dict[str, Any] = {
        "app": app.name,
        "components": {
            kind: type(getattr(app, kind)).__name__
            for kind in ("broker", "storage", "global_config", "worker")
        },
        "enqueue": app.enqueue_path,
        "tasks": {name: task_summary(task) for name, task in sorted(app.tasks.items())},
        "queue": {
            "ready_by_priority": {str(p): n for p, n in sorted(stats.ready_by_priority.items())},
            "delayed": stats.delayed,
            "in_flight": stats.in_flight,
            "dead_letters": stats.dead_letters,
        },
        "workers": await app.global_config.workers(),
        "records_by_status": dict(sorted((await app.storage.stats()).items())),
        "plugins": sorted(str(name) for name, _ in app.hooks.pm.list_name_plugin()),
    }
    gc = app.global_config
    if provides(gc, FlowControl):
        try:
            flow = await cast(FlowControl, gc).flow_state()
            report["flow"] = dict(sorted(flow.items()))
        except Exception as exc:  # the rest of the report still tells what it can
            report["flow_error"] = f"{type(exc).__name__}: {exc}"
    if provides(app.storage, WorkflowStore):
        report["workflows"] = await workflows.newest(app, WORKFLOWS_SHOWN)
    result: dict[str, Any] = await app.hooks.transform(
        "qtasks_inspect", "report", app=app, report=report
    )
    return result


def task_summary(task: TaskDef[..., Any]) -> dict[str, Any]:
    """A registered task's options, JSON-ready (callables shown by name)."""
    opts = task.options

    def label(value: Any) -> Any:
        if value is None or isinstance(value, int | float | str):
            return value
        return getattr(value, "__qualname__", None) or repr(value)

    summary: dict[str, Any] = {
        "kind": task.kind.value,
        "priority": opts.priority,
        "retry": opts.retry,
        "retry_on_exc": [label(e) for e in opts.retry_on_exc or ()],
        "retry_backoff": label(opts.retry_backoff),
        "max_time": opts.max_time,
        "echo": opts.echo,
        "tags": list(opts.tags),
        "description": opts.description or (task.__doc__ or "").strip().split("\n")[0] or None,
        "middlewares": [label(m) for m in (*opts.middlewares_before, *opts.middlewares_after)],
        "signature": str(task.caller_signature),
    }
    if task.flow is not None:
        spec = task.flow
        summary["flow"] = {
            "rate_limit": opts.rate_limit,
            "rate_burst": spec.burst if spec.rate is not None else None,
            "concurrency_key": label(spec.key),
            "max_concurrency": spec.max_concurrency,
            "expires": spec.expires,
            "unique_key": label(spec.unique_key),
            "unique_for": spec.unique_for,
        }
    if opts.extra:
        summary["extra"] = {k: label(v) for k, v in opts.extra.items()}
    return summary
