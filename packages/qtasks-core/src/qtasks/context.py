"""The ``self`` handle an ``echo=True`` task receives, and its ``ctx``.

An async task (coroutine or async generator) gets an :class:`AsyncTaskHandle`, whose calls are
coroutines; a sync task (plain function or generator, run in a worker thread) gets a
:class:`SyncTaskHandle`, whose calls block that thread. Both reach the app that runs the task;
nothing is looked up globally.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn, overload

import anyio
import anyio.from_thread
import anyio.lowlevel

from qtasks.checks import check_delay, check_timeout
from qtasks.compat.calls import UNSET, split_task_name
from qtasks.errors import (
    InvalidTimeoutError,
    TaskCancelledError,
    TaskNotFoundError,
    TaskTimeoutError,
)
from qtasks.record import TaskRecord
from qtasks.task import AsyncTask, Task

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.config import QueueConfig
    from qtasks.executor import TaskRun
    from qtasks.task import TaskOptions

COMPONENTS = ("broker", "storage", "global_config", "worker")
_ENDED = "qtasks.context.ended"
_SHUTDOWN = "__shutdown__"  # the worker's reason for "hand the task back"


def run_ended(run: TaskRun) -> anyio.Event:
    """Set by the executor when the task's call ends (returns, raises, or is cancelled)."""
    event = run.state.get(_ENDED)
    if event is None:
        event = run.state[_ENDED] = anyio.Event()
    return event


class TaskContext:
    """What a running async task may know and do about itself."""

    def __init__(self, run: TaskRun) -> None:
        self._run = run
        self._ended = run_ended(run)
        self.task_uuid: str = run.record.uuid
        self.task_name: str = run.task.name
        self.attempt: int = run.record.attempt
        """1 for the first execution, 2 for the first retry..."""
        self.generate_handler = run.task.options.generate_handler
        self._metadata: AsyncTask | None = None

    @property
    def app(self) -> AsyncQueueTasks:
        """The app running this task."""
        return self._run.app

    @functools.cached_property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """``get_logger()``, made on first use and kept for this run."""
        return self.get_logger()

    def get_logger(self, name: str | None = None) -> logging.LoggerAdapter[logging.Logger]:
        """A logger (``qtasks.task.<task name>`` by default) whose records carry ``task_name``
        and ``task_uuid`` attributes, and ``qtasks_task`` (`` [<task name> <task uuid>]``),
        which the format of ``qtasks run`` prints after the logger's name. Made on each call,
        nothing for a task that does not log."""
        logger = logging.getLogger(name or f"qtasks.task.{self.task_name}")
        return logging.LoggerAdapter(
            logger,
            {
                "task_name": self.task_name,
                "task_uuid": self.task_uuid,
                "qtasks_task": f" [{self.task_name} {self.task_uuid}]",
            },
        )

    def get_config(self) -> QueueConfig:
        """The app's :class:`~qtasks.config.QueueConfig`."""
        return self._run.app.config

    def get_component(self, name: str) -> Any:
        """The app's ``broker``, ``storage``, ``global_config`` or ``worker``."""
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; expected one of {COMPONENTS}")
        return getattr(self._run.app, name)

    async def get_metadata(self, cache: bool = False) -> AsyncTask:
        """This task's stored record (status ``process`` while it runs). With ``cache=True``
        (QTasks' form) a record read earlier by this task is returned without a round trip."""
        if cache and self._metadata is not None:
            return self._metadata
        record = await self._run.app.get(self.task_uuid)
        assert record is not None, "a running task has a record"
        self._metadata = record
        return record

    async def get_task(self, uuid: str) -> AsyncTask | None:
        """Another task's stored record, or ``None``."""
        return await self._run.app.get(uuid)

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``. Ends early, raising cancellation, when the task is cancelled or the
        worker begins to stop (then the task is handed back to the queue at once instead of
        holding up the shutdown)."""
        if await self._wait(seconds) == "stop":
            self._hand_back()
            await anyio.lowlevel.checkpoint()  # delivers the cancellation just requested

    def cancel(self, reason: str = "") -> NoReturn:
        """End the task now; its record says ``cancel`` with ``reason``."""
        raise TaskCancelledError(reason)

    def plugin_error(self, **kwargs: Any) -> NoReturn:
        """QTasks' way to hand the task to plugins: raise
        :class:`~qtasks.exc.TaskPluginTriggerError` with ``kwargs``; a QTasks plugin on
        ``task_executor_run_task_trigger_error`` may turn it into the result (see
        :mod:`qtasks.compat.plugins`), else the task fails with it."""
        from qtasks.exc import TaskPluginTriggerError

        raise TaskPluginTriggerError(**kwargs)

    async def _wait(self, seconds: float) -> str | None:
        """Wait ``seconds`` (or until the app's clock reads their end, when something other
        than time moves it: the ``wait_until`` of the app's
        :attr:`~qtasks.app.AsyncQueueTasks.time_source`); return
        ``"stop"`` or ``"ended"`` if woken early by that."""
        app = self._run.app
        forever = isinstance(seconds, float) and seconds == math.inf  # inf: until woken
        if not forever:
            check_delay(seconds, "ctx.sleep", InvalidTimeoutError)
        stopping: anyio.Event | None = getattr(app.worker, "stopping", None)
        wait_until = None if forever else app.time_source.wait_until
        woke: str | None = None
        async with anyio.create_task_group() as tg:

            async def watch(event: anyio.Event, label: str) -> None:
                nonlocal woke
                await event.wait()
                woke = label
                tg.cancel_scope.cancel()

            if stopping is not None:
                tg.start_soon(watch, stopping, "stop")
            tg.start_soon(watch, self._ended, "ended")
            if wait_until is not None:

                async def clock_reaches(when: float) -> None:
                    await wait_until(when)
                    tg.cancel_scope.cancel()  # the sleep's end, on the app's clock

                tg.start_soon(clock_reaches, app.clock() + seconds)
            await anyio.sleep(seconds)
            tg.cancel_scope.cancel()
        return woke

    def _hand_back(self) -> None:
        run = self._run
        run.cancel(run.cancel_reason or _SHUTDOWN)


class TaskOptionsView:
    """The task's declared options on an echo task's ``self``, as QTasks exposes them
    (``self.priority``, ``self.tags``, ``self.extra``...)."""

    _run: TaskRun

    @property
    def _task_options(self) -> TaskOptions:
        return self._run.task.options

    @property
    def _default_priority(self) -> int:
        return self._run.app.config.default_priority

    @property
    def priority(self) -> int:
        """The task's priority (the app's ``default_priority`` when it declares none)."""
        declared = self._task_options.priority
        return self._default_priority if declared is None else declared

    @property
    def echo(self) -> bool:
        return self._task_options.echo

    @property
    def max_time(self) -> float | None:
        return self._task_options.max_time

    @property
    def retry(self) -> int | None:
        return self._task_options.retry

    @property
    def retry_on_exc(self) -> list[type[BaseException]] | None:
        exc = self._task_options.retry_on_exc
        return None if exc is None else list(exc)

    @property
    def decode(self) -> Any:
        return self._task_options.decode

    @property
    def tags(self) -> list[str]:
        return list(self._task_options.tags)

    @property
    def description(self) -> str | None:
        return self._task_options.description

    @property
    def generate_handler(self) -> Any:
        return self._task_options.generate_handler

    @property
    def executor(self) -> Any:
        return self._task_options.executor

    @property
    def middlewares_before(self) -> list[Any]:
        return list(self._task_options.middlewares_before)

    @property
    def middlewares_after(self) -> list[Any]:
        return list(self._task_options.middlewares_after)

    @property
    def middlewares(self) -> list[Any]:
        """``middlewares_before`` then ``middlewares_after`` (QTasks' docs show this name)."""
        return [*self.middlewares_before, *self.middlewares_after]

    @property
    def extra(self) -> dict[str, Any]:
        """Options the task was declared with that qtasks does not know (``test=True``)."""
        return dict(self._task_options.extra)


class AsyncTaskHandle(TaskOptionsView):
    """``self`` of an async echo task."""

    def __init__(self, run: TaskRun) -> None:
        self._run = run
        self.ctx = TaskContext(run)
        self.task_name = run.task.name

    @overload
    async def add_task(self, task_name: str, /, *args: Any, **kwargs: Any) -> AsyncTask: ...

    @overload  # QTasks' form: every positional an argument, the name by keyword
    async def add_task(self, *args: Any, task_name: str, **kwargs: Any) -> AsyncTask: ...

    # ignore[misc]: mypy misses that a keyword task_name goes into **kwargs (the name of a
    # positional-only parameter is free for keywords).
    async def add_task(self, task_name: str = UNSET, /, *args: Any, **kwargs: Any) -> AsyncTask:  # type: ignore[misc]
        """Enqueue a child task through the same app; the child records this task as parent.
        Takes the options of :meth:`AsyncQueueTasks.add_task <qtasks.app.AsyncQueueTasks.add_task>`
        (``priority``, ``timeout``, ``delay``, ``eta``). QTasks' form, every positional an
        argument and the name by keyword (``add_task(5, task_name="x")``), works too."""
        task_name, args = split_task_name(task_name, args, kwargs)
        return await self._run.app.add_task(
            task_name, *args, _parent_uuid=self._run.record.uuid, **kwargs
        )


class _ThreadClient:
    """Lets a :class:`~qtasks.task.Task` record handed to a sync task call back into the app
    from the task's worker thread (``wait_result``, ``refresh``, ``stream``)."""

    def __init__(self, app: AsyncQueueTasks) -> None:
        self._app = app

    def bind(self, record: TaskRecord) -> Task:
        data = {name: getattr(record, name) for name in TaskRecord.__dataclass_fields__}
        return Task(**data, _client=self)

    def get(self, uuid: str) -> Task | None:
        record = anyio.from_thread.run(self._app.get, uuid)
        return None if record is None else self.bind(record)

    def wait(self, uuid: str, timeout: float | None) -> Task:
        return self.bind(anyio.from_thread.run(self._app.wait, uuid, timeout))

    def stream(self, uuid: str, timeout: float | None = None) -> Iterator[Any]:
        """As :meth:`AsyncQueueTasks.stream`: ``timeout`` is for the whole stream."""
        timeout = check_timeout(timeout, "stream: timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        index = 0
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            found, value = anyio.from_thread.run(self._step, uuid, index, left, timeout)
            if not found:
                return
            yield value
            index += 1

    async def _step(
        self, uuid: str, index: int, left: float | None, timeout: float | None
    ) -> tuple[bool, Any]:
        if index == 0 and await self._app.storage.get(uuid) is None:
            raise TaskNotFoundError(uuid)
        steps = self._app.storage.steps(uuid, index)
        try:
            with anyio.move_on_after(left):
                try:
                    return True, await anext(steps)
                except StopAsyncIteration:
                    return False, None
            raise TaskTimeoutError(uuid, timeout)
        finally:
            aclose = getattr(steps, "aclose", None)
            if aclose is not None:
                await aclose()


class SyncContext:
    """The sync view of :class:`TaskContext`, for tasks running in worker threads."""

    def __init__(self, inner: TaskContext, client: _ThreadClient) -> None:
        self._inner = inner
        self._client = client
        self.task_uuid = inner.task_uuid
        self.task_name = inner.task_name
        self.attempt = inner.attempt
        self.generate_handler = inner.generate_handler
        self._metadata: Task | None = None
        self.get_logger = inner.get_logger
        self.get_config = inner.get_config
        self.get_component = inner.get_component
        self.cancel = inner.cancel
        self.plugin_error = inner.plugin_error

    @property
    def app(self) -> AsyncQueueTasks:
        return self._inner.app

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """``get_logger()``, made on first use and kept for this run."""
        return self._inner.logger

    def get_metadata(self, cache: bool = False) -> Task:
        """This task's stored record (with ``cache=True``, the one read earlier, if any)."""
        if cache and self._metadata is not None:
            return self._metadata
        record = self._client.get(self.task_uuid)
        assert record is not None, "a running task has a record"
        self._metadata = record
        return record

    def get_task(self, uuid: str) -> Task | None:
        """Another task's stored record, or ``None``."""
        return self._client.get(uuid)

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``; raises :class:`~qtasks.errors.TaskCancelledError` early when the
        task is cancelled (or times out) or the worker begins to stop. Unlike ``time.sleep``
        this wakes at once, so an abandoned worker thread does not linger."""
        try:
            woke = anyio.from_thread.run(self._inner._wait, seconds)
        except Exception:
            raise
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            # The task's cancel scope was cancelled while waiting (anyio delivers it into the
            # thread as the backend's cancellation exception): say it in qtasks terms.
            raise TaskCancelledError(self._inner._run.cancel_reason or "cancelled") from exc
        if woke == "stop":
            anyio.from_thread.run_sync(self._inner._hand_back)
            raise TaskCancelledError("worker stopping")
        if woke == "ended":
            raise TaskCancelledError(self._inner._run.cancel_reason or "cancelled")


class SyncTaskHandle(TaskOptionsView):
    """``self`` of a sync echo task (runs in a worker thread)."""

    def __init__(self, run: TaskRun) -> None:
        self._run = run
        self._async = AsyncTaskHandle(run)
        self._client = _ThreadClient(run.app)
        self.ctx = SyncContext(self._async.ctx, self._client)
        self.task_name = run.task.name

    @overload
    def add_task(self, task_name: str, /, *args: Any, **kwargs: Any) -> Task: ...

    @overload  # QTasks' form: every positional an argument, the name by keyword
    def add_task(self, *args: Any, task_name: str, **kwargs: Any) -> Task: ...

    # ignore[misc]: mypy misses that a keyword task_name goes into **kwargs (the name of a
    # positional-only parameter is free for keywords).
    def add_task(self, task_name: str = UNSET, /, *args: Any, **kwargs: Any) -> Task:  # type: ignore[misc]
        """Enqueue a child task through the same app (blocking this thread until it is
        stored); the child records this task as parent. QTasks' form
        ``add_task(5, task_name="x")`` works too."""
        task_name, args = split_task_name(task_name, args, kwargs)

        async def add() -> AsyncTask:
            return await self._async.add_task(task_name, *args, **kwargs)

        return self._client.bind(anyio.from_thread.run(add))


def make_handle(run: TaskRun) -> AsyncTaskHandle | SyncTaskHandle:
    """The handle matching the task's colour."""
    return AsyncTaskHandle(run) if run.task.kind.is_async else SyncTaskHandle(run)
