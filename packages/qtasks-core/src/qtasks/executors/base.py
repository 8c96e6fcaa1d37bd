"""``from qtasks.executors.base import BaseTaskExecutor`` (QTasks' path).

In QTasks a ``TaskMiddleware`` was built with the task's executor and read its attributes:
``task_func`` (the task, a ``TaskExecSchema``), ``task_broker`` (the task's record, a
``TaskPrioritySchema``), ``log``, ``plugins``, ``echo``, ``_args``, ``_kwargs``. qtasks builds
it with a :class:`BaseTaskExecutor` of the :class:`~qtasks.executor.TaskRun`: those attributes
(``task_func`` as :class:`~qtasks.compat.task_func.TaskFuncView`, ``task_broker`` the record,
with QTasks' ``name``), and every attribute of the run besides (``task``, ``record``,
``message``, ``app``...). It is not an executor qtasks can run: ``executor=`` of
``@app.task`` takes a qtasks executor (``execute(run)``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from qtasks.compat.task_func import TaskFuncView

if TYPE_CHECKING:
    from qtasks.executor import TaskRun
    from qtasks.record import TaskRecord


class BaseTaskExecutor:
    """A task's run as QTasks' executor showed it to middlewares (see the module docstring)."""

    def __init__(self, run: TaskRun) -> None:
        self.run = run
        self.task_func = TaskFuncView(run.task, run.app.config.default_priority)
        self.log = logging.getLogger(f"qtasks.task.{run.task.name}")
        self.plugins: dict[str, list[Any]] = {}
        self.echo: Any = None
        self._args = list(run.message.args)
        self._kwargs = dict(run.message.kwargs)

    @property
    def task_broker(self) -> TaskRecord:
        """The task's record (``task_broker.name``, ``.uuid``, ``.args``...)."""
        return self.run.record

    def __getattr__(self, name: str) -> Any:
        return getattr(self.run, name)

    def __repr__(self) -> str:
        return f"<BaseTaskExecutor of {self.run.task.name} {self.run.record.uuid}>"
