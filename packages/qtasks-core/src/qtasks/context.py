"""The ``self`` handle an ``echo=True`` task receives, and its ``ctx``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread

from qtasks.errors import TaskCancelledError

if TYPE_CHECKING:
    from qtasks.executor import TaskRun


class TaskContext:
    """What a running task may know and do about itself (async methods)."""

    def __init__(self, run: TaskRun) -> None:
        self._run = run
        self.task_uuid = run.record.uuid
        self.task_name = run.task.name
        self.attempt = run.record.attempt
        self.generate_handler = run.task.options.generate_handler

    def get_logger(self, name: str | None = None) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry ``task_name`` and ``task_uuid``."""
        logger = logging.getLogger(name or f"qtasks.task.{self.task_name}")
        return logging.LoggerAdapter(
            logger, {"task_name": self.task_name, "task_uuid": self.task_uuid}
        )

    def get_config(self) -> Any:
        return self._run.app.config

    def get_component(self, name: str) -> Any:
        """``broker``, ``storage``, ``global_config`` or ``worker`` of the app."""
        if name not in ("broker", "storage", "global_config", "worker"):
            raise ValueError(f"unknown component {name!r}")
        return getattr(self._run.app, name)

    async def get_metadata(self) -> Any:
        """This task's stored record."""
        return await self._run.app.get(self.task_uuid)

    async def get_task(self, uuid: str) -> Any:
        return await self._run.app.get(uuid)

    async def sleep(self, seconds: float) -> None:
        """Sleep; ends early (raising cancellation) if the task is cancelled or the worker
        stops."""
        await anyio.sleep(seconds)

    def cancel(self, reason: str = "") -> None:
        """End the task now; its record says ``cancel`` with ``reason``."""
        raise TaskCancelledError(reason)


class AsyncTaskHandle:
    """``self`` of an async echo task."""

    def __init__(self, run: TaskRun) -> None:
        self._run = run
        self.ctx = TaskContext(run)
        self.task_name = run.task.name

    async def add_task(self, task_name: str, *args: Any, **kwargs: Any) -> Any:
        """Enqueue a child task through the same app; the child records this task as parent."""
        return await self._run.app.add_task(
            task_name, *args, _parent_uuid=self._run.record.uuid, **kwargs
        )


class SyncContext:
    """The sync view of :class:`TaskContext`, for tasks running in worker threads."""

    def __init__(self, inner: TaskContext) -> None:
        self._inner = inner
        self.task_uuid = inner.task_uuid
        self.task_name = inner.task_name
        self.attempt = inner.attempt
        self.get_logger = inner.get_logger
        self.get_config = inner.get_config
        self.get_component = inner.get_component
        self.cancel = inner.cancel

    def get_metadata(self) -> Any:
        return anyio.from_thread.run(self._inner.get_metadata)

    def get_task(self, uuid: str) -> Any:
        return anyio.from_thread.run(self._inner.get_task, uuid)

    def sleep(self, seconds: float) -> None:
        anyio.from_thread.run(self._inner.sleep, seconds)


class SyncTaskHandle:
    """``self`` of a sync echo task (runs in a worker thread)."""

    def __init__(self, run: TaskRun) -> None:
        self._async = AsyncTaskHandle(run)
        self.ctx = SyncContext(self._async.ctx)
        self.task_name = run.task.name

    def add_task(self, task_name: str, *args: Any, **kwargs: Any) -> Any:
        return anyio.from_thread.run(lambda: self._async.add_task(task_name, *args, **kwargs))


def make_handle(run: TaskRun) -> AsyncTaskHandle | SyncTaskHandle:
    """The handle matching the task's colour."""
    return AsyncTaskHandle(run) if run.task.kind.is_async else SyncTaskHandle(run)
