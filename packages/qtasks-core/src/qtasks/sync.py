"""The sync app: a thin facade over :class:`~qtasks.app.AsyncQueueTasks` through an anyio
``BlockingPortal`` (an event loop in a background thread). No logic lives here."""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from functools import partial
from os import PathLike
from typing import Any, ParamSpec, Self, TypeVar, overload

import anyio
from anyio.from_thread import BlockingPortal

from qtasks.app import AsyncQueueTasks
from qtasks.components import Broker, GlobalConfig, Starter, Storage
from qtasks.config import QueueConfig, load_config
from qtasks.discovery import build_components
from qtasks.loop import loop_options
from qtasks.messages import Serializer
from qtasks.record import TaskRecord
from qtasks.task import AsyncTask, SyncTaskDef, Task, TaskDef
from qtasks.worker import QueueWorker

P = ParamSpec("P")
R = TypeVar("R")


class QueueTasks:
    """A qtasks app for sync code; same constructor and methods as the async app, blocking."""

    def __init__(
        self,
        name: str = "QueueTasks",
        *,
        broker: Broker | None = None,
        storage: Storage | None = None,
        global_config: GlobalConfig | None = None,
        worker: QueueWorker | None = None,
        config: QueueConfig | None = None,
        serializer: Serializer | None = None,
    ) -> None:
        self.aio = AsyncQueueTasks(
            name,
            broker=broker,
            storage=storage,
            global_config=global_config,
            worker=worker,
            config=config,
            serializer=serializer,
        )
        self._portal: BlockingPortal | None = None
        self._portal_stop: threading.Thread | None = None
        self._serving: AbstractContextManager[Any] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(
        cls,
        path: str | PathLike[str] | None = None,
        *,
        name: str = "QueueTasks",
        cli: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Self:
        """Build an app from configuration alone; see :meth:`AsyncQueueTasks.from_config`."""
        loaded = load_config(path, cli=cli, overrides=overrides)
        app = cls(name, config=loaded.config, **build_components(loaded.config))
        app.aio.config_sources = loaded.sources
        return app

    def __getattr__(self, name: str) -> Any:
        # Plain attributes (name, config, tasks, broker, hooks...) come from the async app.
        return getattr(self.aio, name)

    @property
    def portal(self) -> BlockingPortal:
        """The portal that runs the async app's loop (started on first use).

        Its thread is a daemon, and an ``atexit`` handler closes the app, so a script that
        forgets :meth:`close` still stops gracefully and exits."""
        with self._lock:
            if self._portal is None:
                self._portal, self._portal_stop = _start_portal()
                atexit.register(_close_at_exit, weakref.ref(self))
            return self._portal

    @overload
    def task(self, func: Callable[P, R], /) -> SyncTaskDef[P, R]: ...

    @overload
    def task(
        self,
        name: str | None = None,
        *,
        priority: int | None = None,
        echo: bool = False,
        max_time: float | None = None,
        retry: int | None = None,
        retry_on_exc: Sequence[type[BaseException]] | type[BaseException] | None = None,
        retry_backoff: float | Callable[[int], float] | None = None,
        decode: Callable[[Any], Any] | None = None,
        tags: Sequence[str] | None = None,
        description: str | None = None,
        generate_handler: Callable[[Any], Any] | None = None,
        executor: Any = None,
        middlewares_before: Sequence[Any] | None = None,
        middlewares_after: Sequence[Any] | None = None,
        **extra: Any,
    ) -> Callable[[Callable[P, R]], SyncTaskDef[P, R]]: ...

    def task(self, *args: Any, **kwargs: Any) -> Any:
        """Register a task; see :meth:`AsyncQueueTasks.task`. ``add_task`` on it blocks."""
        result = self.aio.task(*args, **kwargs)
        if isinstance(result, TaskDef):
            return self._wrap(result)
        return lambda func: self._wrap(result(func))

    def _wrap(self, inner: TaskDef[P, R]) -> SyncTaskDef[P, R]:
        wrapped = SyncTaskDef(self, inner)
        self.aio.tasks[inner.name] = wrapped
        return wrapped

    def add_plugin(self, plugin: object, name: str | None = None) -> str:
        return self.aio.add_plugin(plugin, name)

    def _bind(self, record: TaskRecord) -> Task:
        bound = Task(*record.values())
        bound._client = self
        return bound

    def add_task(
        self,
        task_name: str,
        *args: Any,
        priority: int | None = None,
        timeout: float | None = None,
        delay: float | None = None,
        eta: float | None = None,
        **kwargs: Any,
    ) -> Task:
        """Enqueue and return the record; with ``timeout``, block for the final one."""
        return self.enqueue(
            task_name, args, kwargs, priority=priority, timeout=timeout, delay=delay, eta=eta
        )

    def enqueue(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        priority: int | None = None,
        timeout: float | None = None,
        delay: float | None = None,
        eta: float | None = None,
    ) -> Task:
        call = partial(
            self.aio.enqueue,
            task_name,
            args,
            kwargs,
            priority=priority,
            timeout=timeout,
            delay=delay,
            eta=eta,
        )
        record: AsyncTask = self.portal.call(call)
        return self._bind(record)

    def get(self, uuid: str) -> Task | None:
        record = self.portal.call(self.aio.get, uuid)
        return None if record is None else self._bind(record)

    def wait(self, uuid: str, timeout: float | None) -> Task:
        return self._bind(self.portal.call(self.aio.wait, uuid, timeout))

    def stream(self, uuid: str, timeout: float | None = None) -> Iterator[Any]:
        """Follow a generator task's steps from this thread (each step is pushed to it)."""
        steps: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

        async def pump() -> None:
            try:
                async for step in self.aio.stream(uuid, timeout):
                    steps.put(("step", step))
            except BaseException as exc:
                steps.put(("error", exc))
                raise
            steps.put(("end", None))

        future = self.portal.start_task_soon(pump)
        try:
            while True:
                kind, value = steps.get()
                if kind == "step":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            future.cancel()

    def cancel(self, uuid: str, reason: str = "cancelled") -> Task | None:
        record = self.portal.call(self.aio.cancel, uuid, reason)
        return None if record is None else self._bind(record)

    def __enter__(self) -> QueueTasks:
        """Serve tasks in the background thread until ``__exit__``."""
        cm = self.portal.wrap_async_context_manager(self.aio)
        cm.__enter__()
        self._serving = cm
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._serving is not None:
            serving, self._serving = self._serving, None
            serving.__exit__(None, None, None)

    def close(self) -> None:
        """Stop serving, stop every component and the portal's thread."""
        self.__exit__()
        if self._portal is not None:
            portal, self._portal = self._portal, None
            portal.call(self.aio.aclose)
            portal.call(portal.stop)
            if self._portal_stop is not None:
                self._portal_stop.join(timeout=10)

    def run_forever(self, starter: Starter | None = None) -> None:
        """Block serving tasks until SIGINT/SIGTERM (runs the async app in this thread).

        The components belong to one event loop: if earlier calls started them in the
        background thread's loop, that one is closed first and they start again here."""
        self.close()
        self.aio.run_forever(starter)


def _start_portal() -> tuple[BlockingPortal, threading.Thread]:
    """Run an event loop with a portal in a daemon thread."""
    ready = threading.Event()
    holder: list[BlockingPortal] = []

    async def main() -> None:
        async with BlockingPortal() as portal:
            holder.append(portal)
            ready.set()
            await portal.sleep_until_stopped()

    thread = threading.Thread(
        target=anyio.run,
        args=(main,),
        kwargs={"backend_options": loop_options("asyncio")},
        name="qtasks-portal",
        daemon=True,
    )
    thread.start()
    ready.wait()
    return holder[0], thread


def _close_at_exit(ref: weakref.ref[QueueTasks]) -> None:
    app = ref()
    if app is not None:
        try:
            app.close()
        except Exception:  # pragma: no cover - interpreter shutdown, nothing left to report to
            pass
