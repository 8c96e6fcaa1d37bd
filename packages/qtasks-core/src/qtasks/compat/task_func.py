"""``task_func`` as QTasks 1.7's plugins and event handlers got it: its ``TaskExecSchema``.

QTasks passed the registered task as a ``TaskExecSchema`` (``name``, ``func``, ``awaiting``,
``generating``, ``priority``, ``echo``, ``retry``... ``extra``); its own plugins read those
fields. qtasks passes a :class:`TaskFuncView` of the :class:`~qtasks.task.TaskDef`: those
fields, read-only, and every attribute of the ``TaskDef`` besides (``options``, ``kind``...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from qtasks.context import TaskOptionsView

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.task import TaskDef, TaskOptions


class TaskFuncView(TaskOptionsView):
    """A task as QTasks' ``TaskExecSchema`` showed it (see the module docstring)."""

    def __init__(self, task: TaskDef[..., Any], default_priority: int) -> None:
        self._task = task
        self._priority = default_priority

    @property
    def _task_options(self) -> TaskOptions:
        return self._task.options

    @property
    def _default_priority(self) -> int:
        return self._priority

    @property
    def name(self) -> str:
        return self._task.name

    @property
    def func(self) -> Any:
        return self._task.func

    @property
    def awaiting(self) -> bool:
        """Whether the function is async (a coroutine or async generator function)."""
        return self._task.kind.is_async

    @property
    def generating(self) -> Literal["async", "sync", False]:
        """``"async"`` or ``"sync"`` for a generator function, else ``False``."""
        kind = self._task.kind.value
        return "async" if kind == "async_gen" else "sync" if kind == "sync_gen" else False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def __repr__(self) -> str:
        return f"<TaskFuncView of {self._task!r}>"


def task_func(app: AsyncQueueTasks, name: str) -> TaskFuncView | None:
    """The ``task_func`` of the task ``name`` of ``app`` (``None``: not registered)."""
    task = app.tasks.get(name)
    return None if task is None else TaskFuncView(task, app.config.default_priority)
