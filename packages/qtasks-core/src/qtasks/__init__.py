"""qtasks: a fast, reliable task queue built from replaceable components.

``QueueTasks`` is the sync app, ``AsyncQueueTasks`` the async one (also
``qtasks.asyncio.QueueTasks``). With no arguments every component is in-memory.
"""

from importlib.metadata import version as _version

try:
    from qtasks.app import AsyncQueueTasks
    from qtasks.config import QueueConfig
    from qtasks.depends import Depends
    from qtasks.errors import (
        InvalidTimeoutError,
        QTasksError,
        TaskCancelledError,
        TaskDeclarationError,
        TaskMaxTimeError,
        TaskTimeoutError,
        UnknownTaskError,
        WorkflowError,
    )
    from qtasks.executor import TaskRun
    from qtasks.memory import MemoryBroker, MemoryGlobalConfig, MemoryStorage
    from qtasks.plugins import hookimpl
    from qtasks.record import TaskRecord, TaskStatus
    from qtasks.routers import AsyncRouter, SyncRouter, shared_task
    from qtasks.state import AsyncState, SyncState
    from qtasks.steps import StepsRestarted
    from qtasks.sync import QueueTasks
    from qtasks.task import AsyncTask, Task, TaskDef
    from qtasks.workflows import Signature, Workflow, chain, chord, group
except Exception as exc:  # re-raised; named as the clash when the other `qtasks` is here
    from qtasks.clash import other_qtasks

    _clash = other_qtasks()
    if _clash is None:
        raise
    raise ImportError(f"qtasks-core cannot be imported: {_clash}") from exc

__version__ = _version("qtasks-core")

from qtasks.compat import modules as _qtasks17_modules

_qtasks17_modules.install()  # QTasks' component modules: refused with what to write instead

__all__ = [
    "AsyncQueueTasks",
    "AsyncRouter",
    "AsyncState",
    "AsyncTask",
    "Depends",
    "InvalidTimeoutError",
    "MemoryBroker",
    "MemoryGlobalConfig",
    "MemoryStorage",
    "QTasksError",
    "QueueConfig",
    "QueueTasks",
    "Signature",
    "StepsRestarted",
    "SyncRouter",
    "SyncState",
    "Task",
    "TaskCancelledError",
    "TaskDeclarationError",
    "TaskDef",
    "TaskMaxTimeError",
    "TaskRecord",
    "TaskRun",
    "TaskStatus",
    "TaskTimeoutError",
    "UnknownTaskError",
    "Workflow",
    "WorkflowError",
    "chain",
    "chord",
    "group",
    "hookimpl",
    "shared_task",
]
