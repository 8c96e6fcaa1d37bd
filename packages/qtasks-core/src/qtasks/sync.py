"""The sync app: a thin facade over :class:`~qtasks.app.AsyncQueueTasks` through an anyio
``BlockingPortal`` (an event loop in a background thread). No logic lives here.

Over ~500 lines: each method of the async app has its blocking form here, a few lines each,
and the portal's life (start, close, a forked child's fresh start) goes with them."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import os
import queue
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError
from contextlib import AbstractContextManager
from functools import partial
from os import PathLike
from types import ModuleType
from typing import Any, ParamSpec, Self, TypeVar, overload

import anyio
from anyio.from_thread import BlockingPortal

from qtasks.app import AsyncQueueTasks
from qtasks.compat.calls import UNSET, split_task_name
from qtasks.compat.config import warn_run_forever_options
from qtasks.components import Broker, DeadLetter, GlobalConfig, Starter, Storage
from qtasks.config import QueueConfig, follow_broker, load_config, with_command_flags
from qtasks.discovery import build_components
from qtasks.errors import ComponentError, ComponentNotStartedError
from qtasks.loop import loop_options
from qtasks.messages import Serializer
from qtasks.named_components import refuse_names
from qtasks.record import TaskRecord
from qtasks.routers import Router, shared_tasks
from qtasks.serving_log import log_when_unconfigured
from qtasks.starter import stop_on_signals
from qtasks.stopping import STOP_MARGIN
from qtasks.task import AsyncTask, SyncTaskDef, Task, TaskDef
from qtasks.threads import _running_loop, in_task_thread
from qtasks.worker import QueueWorker
from qtasks.workflows.canvas import Node, Signature
from qtasks.workflows.runtime import SyncWorkflow, Workflow

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
        broker_url: str | None = None,
    ) -> None:
        given = {"broker": broker, "storage": storage, "global_config": global_config}
        # Named as this class, not the async one.
        refuse_names(type(self).__name__, {**given, "worker": worker})
        self.aio = AsyncQueueTasks(
            name,
            broker=broker,
            storage=storage,
            global_config=global_config,
            worker=worker,
            config=config,
            serializer=serializer,
            broker_url=broker_url,
        )
        self._portal: BlockingPortal | None = None
        self._portal_stop: threading.Thread | None = None
        self._portal_loop: asyncio.AbstractEventLoop | None = None
        self._portal_ended: list[BaseException] = []
        """What ended the portal's loop, if something raised out of it (see :meth:`_ended`)."""
        self._serving: AbstractContextManager[Any] | None = None
        self._lock = threading.Lock()
        self._closing = False
        """:meth:`close` is stopping the portal: other calls are refused until it returns."""
        self._close_done = threading.Condition(self._lock)
        """Notified when :meth:`close` has stopped the portal (``_closing`` cleared)."""
        self._forever = 0
        """How many :meth:`run_forever` calls are serving (for :meth:`close`)."""
        self._forever_done = threading.Condition()
        shared_tasks.adopt(self)
        _apps.add(self)

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
        loaded = follow_broker(load_config(path, cli=with_command_flags(cli), overrides=overrides))
        app = cls(name, config=loaded.config, **build_components(loaded.config))
        app.aio.config_sources = loaded.sources
        return app

    def __getattr__(self, name: str) -> Any:
        # Plain attributes (name, config, tasks, broker, hooks...) come from the async app.
        # Its coroutine methods never do: each has a blocking method here, and handing one
        # back would give the caller an un-awaited coroutine.
        try:
            value = getattr(self.aio, name)
        except AttributeError as exc:
            if type(exc) is not AttributeError or exc.obj is not self.aio:
                raise  # an attribute's own error (a property's), kept as it says
            # Python's "no attribute", named for the app the caller holds, not the async one.
            celery = _CELERY_APP.get(name)
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}"
                + (f" ({name} is Celery's: {celery})" if celery else ""),
                name=name,
                obj=self,
            ) from None
        if _is_async_callable(value):
            instead = _ASYNC_ONLY.get(name)
            hint = f"use {instead}" if instead else f"call app.portal.call(app.aio.{name}, ...)"
            raise AttributeError(
                f"{type(self).__name__}.{name}: {type(self.aio).__name__}.{name} is async and "
                f"has no blocking form on the sync app; {hint}"
            )
        return value

    @property
    def portal(self) -> BlockingPortal:
        """The portal that runs the async app's loop (started on first use).

        Its thread is a daemon, and an ``atexit`` handler closes the app, so a script that
        forgets :meth:`close` still stops gracefully and exits. Raises
        :class:`~qtasks.errors.ComponentError` on that loop's own thread (in an ``async def``
        task), where a blocking call would wait for itself; and
        :class:`~qtasks.errors.ComponentNotStartedError` while :meth:`close` runs in another
        thread (a new portal then would be a second event loop, the app started again in the
        middle of its close)."""
        if threading.current_thread() is self._portal_stop:
            raise self._on_its_loop()
        with self._lock:
            if self._portal_ended:  # for good: its components may still be in that loop
                raise self._ended()
            if self._closing:
                raise ComponentNotStartedError(
                    f"app {self.aio.name!r} is closing (close() is under way in another "
                    "thread): this call is refused rather than start the app again in the "
                    "middle of its close; make it once close() has returned"
                )
            if self._portal is None:
                # Before the async app starts (and adopts them unwrapped): shared tasks
                # imported since __init__ get this app's blocking add_task.
                shared_tasks.adopt(self)
                self._portal, self._portal_stop, self._portal_loop = _start_portal(
                    self._portal_ended
                )
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
        rate_limit: str | None = None,
        rate_burst: int | None = None,
        concurrency_key: str | Callable[..., Any] | None = None,
        max_concurrency: int | None = None,
        expires: float | None = None,
        unique_key: Callable[..., Any] | None = None,
        unique_for: float | None = None,
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

    def include_router(self, router: Router) -> None:
        """Register every task declared on ``router``; their ``add_task`` blocks."""
        router.bind(self)

    def add_plugin(
        self,
        plugin: object,
        name: str | Sequence[str] | None = None,
        trigger_names: Sequence[str] | None = None,
        component: str | None = None,
    ) -> str:
        """Register a plugin object; see :meth:`AsyncQueueTasks.add_plugin` (QTasks plugins
        with ``trigger_names``/``component``, by keyword or positionally, included)."""
        return self.aio.add_plugin(plugin, name, trigger_names, component)

    def _bind(self, record: TaskRecord) -> Task:
        bound = Task(*record.values())
        bound._client = self
        return bound

    def add_task(
        self,
        task_name: str = UNSET,
        /,
        *args: Any,
        priority: int | None = None,
        timeout: float | None = None,
        delay: float | None = None,
        eta: float | None = None,
        expires: float | None = None,
        unique_key: str | None = None,
        unique_for: float | None = None,
        **kwargs: Any,
    ) -> Task:
        """Enqueue and return the record; with ``timeout``, block for the final one (the
        options are :meth:`AsyncQueueTasks.add_task`'s). QTasks' keyword form
        ``add_task(task_name="x", ...)`` (no positional) is accepted too."""
        if task_name is UNSET:
            task_name, args = split_task_name(task_name, args, kwargs)
        return self.enqueue(
            task_name,
            args,
            kwargs,
            priority=priority,
            timeout=timeout,
            delay=delay,
            eta=eta,
            expires=expires,
            unique_key=unique_key,
            unique_for=unique_for,
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
        expires: float | None = None,
        unique_key: str | None = None,
        unique_for: float | None = None,
    ) -> Task:
        """Enqueue with explicit ``args``/``kwargs`` (every keyword stays free for the task)."""
        call = partial(
            self.aio.enqueue,
            task_name,
            args,
            kwargs,
            priority=priority,
            timeout=timeout,
            delay=delay,
            eta=eta,
            expires=expires,
            unique_key=unique_key,
            unique_for=unique_for,
        )
        record: AsyncTask = self._call(call)
        return self._bind(record)

    def add_tasks(self, signatures: Iterable[Signature]) -> list[Task]:
        """Enqueue many tasks in one round trip per batch; see
        :meth:`AsyncQueueTasks.add_tasks`."""
        from qtasks.bulk import check_items

        check_items(signatures, "add_tasks")
        records = self._call(self.aio.add_tasks, list(signatures))
        return [self._bind(record) for record in records]

    def run_workflow(self, workflow: Node, *, on_error: Signature | None = None) -> SyncWorkflow:
        """Run a workflow; see :meth:`AsyncQueueTasks.run_workflow`."""
        state = self._call(partial(self.aio.run_workflow, workflow, on_error=on_error))
        return self._workflow(state)

    def get_workflow(self, id: str) -> SyncWorkflow | None:
        """The state of the workflow ``id``, or ``None``."""
        state = self._call(self.aio.get_workflow, id)
        return None if state is None else self._workflow(state)

    def wait_workflow(self, id: str, timeout: float | None = None) -> SyncWorkflow:
        """Block until the workflow ``id`` ended; return its state."""
        return self._workflow(self._call(self.aio.wait_workflow, id, timeout))

    def cancel_workflow(self, id: str, reason: str = "cancelled") -> SyncWorkflow | None:
        """Cancel the workflow ``id`` and its pending and running members."""
        state = self._call(self.aio.cancel_workflow, id, reason)
        return None if state is None else self._workflow(state)

    def get_workflow_records(self, id: str) -> dict[str, Task | None] | None:
        """Every member's record of the workflow ``id``; see
        :meth:`AsyncQueueTasks.get_workflow_records`."""
        records = self._call(self.aio.get_workflow_records, id)
        if records is None:
            return None
        return {u: None if r is None else self._bind(r) for u, r in records.items()}

    def _workflow(self, state: Workflow) -> SyncWorkflow:
        return SyncWorkflow(
            state.id,
            state.status,
            state.members,
            state.result,
            state.error,
            state.on_error,
            state.failed_member,
            self,
        )

    def get(self, uuid: str) -> Task | None:
        """The stored record of ``uuid``, or ``None``."""
        record = self._call(self.aio.get, uuid)
        return None if record is None else self._bind(record)

    def wait(self, uuid: str, timeout: float | None) -> Task:
        """Block until ``uuid`` is final and return its record (see :meth:`Task.wait_result`);
        :meth:`close` from another thread meanwhile raises
        :class:`~qtasks.errors.ComponentNotStartedError`."""
        return self._bind(self._call(self.aio.wait, uuid, timeout))

    def stream(self, uuid: str, timeout: float | None = None) -> Iterator[Any]:
        """Follow a generator task's steps from this thread (each step is pushed to it);
        :meth:`close` from another thread meanwhile raises
        :class:`~qtasks.errors.ComponentNotStartedError`."""
        steps: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

        async def pump() -> None:
            async for step in self.aio.stream(uuid, timeout):
                steps.put((True, step))

        loop = self._loop_elsewhere()
        future = (
            self.portal.start_task_soon(pump)
            if loop is None
            else asyncio.run_coroutine_threadsafe(pump(), loop)
        )
        # How the pump ended comes last: the stream's error, or a cancel by close() (the
        # portal's stop), told apart here rather than raised raw in this thread.
        future.add_done_callback(lambda done: steps.put((False, done)))
        try:
            while True:
                is_step, value = steps.get()
                if is_step:
                    yield value
                elif value.cancelled():
                    raise self._closed()
                else:
                    value.result()  # raises what the stream raised
                    return
        finally:
            future.cancel()

    def _call(self, fn: Callable[..., Awaitable[R]], *args: Any) -> R:
        """``fn(*args)`` run in the app's loop, this thread blocked until it ends; a call that
        :meth:`close` (the portal's stop, from another thread) cancels raises
        :class:`~qtasks.errors.ComponentNotStartedError`, not a bare ``CancelledError``."""
        try:
            loop = self._loop_elsewhere()
            if loop is not None:
                return self._call_in(loop, fn, *args)
            return self.portal.call(fn, *args)
        except CancelledError as exc:  # close(), or the loop's end, cancels a portal call
            raise self._closed() from exc

    def _call_in(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Awaitable[R]], *args: Any
    ) -> R:
        """``fn(*args)`` run in ``loop`` (see :meth:`_loop_elsewhere`), waited for in slices:
        a loop that ends without running it (the worker's process exiting) raises
        :class:`~qtasks.errors.ComponentNotStartedError` instead of blocking for ever."""
        call = _awaited(fn, *args)
        try:
            future = asyncio.run_coroutine_threadsafe(call, loop)
        except RuntimeError as exc:  # closed since it was found running
            call.close()
            raise self._closed() from exc
        while True:
            try:
                return future.result(timeout=_SIGNAL_SLICE)
            except TimeoutError:
                if future.done():
                    raise  # fn itself raised a TimeoutError (e.g. TaskTimeoutError)
                if not loop.is_running():
                    future.cancel()
                    if inspect.getcoroutinestate(call) == inspect.CORO_CREATED:
                        call.close()  # never started: the ended loop will not run it
                    raise self._closed() from None

    def _loop_elsewhere(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the async app was started in, when it runs and is not the portal's:
        a worker serving the async app in this process (``qtasks run``, ``app.aio.run_forever()``,
        ``async with app.aio:``). A blocking call goes there, rather than start the
        components again in the portal's loop (refused: they belong to that running loop).
        On that loop's own thread (an ``async def`` task) it would wait for itself: raised."""
        if self._portal_ended:  # its loop may still run its teardown: not a loop to use
            raise self._ended()
        loop = self.aio.started_loop()
        if loop is None or loop is self._portal_loop:
            return None
        if loop is _running_loop():
            raise self._on_its_loop()
        return loop

    def _on_its_loop(self) -> ComponentError:
        return ComponentError(
            f"app {self.aio.name!r}: a blocking call of the sync app was made on its own "
            "event loop (where async def tasks run, and the code inside `async with app.aio:`), "
            "where it would wait for itself; "
            "await the async form: `await app.aio.add_task(...)` (`.get`, `.wait`... alike), "
            "`await task.aio.add_task(...)` on a task, `await record.wait_result_async()`"
        )

    def _closed(self) -> ComponentNotStartedError:
        if self._portal_ended:
            return self._ended()
        return ComponentNotStartedError(
            f"app {self.aio.name!r} was closed while this call waited on it"
        )

    def _ended(self) -> ComponentNotStartedError:
        """The portal's loop ended on an exception raised out of it (a ``KeyboardInterrupt``
        from a loop callback, a plugin, a middleware: a task's own is its error), so nothing
        runs there: said on every call instead of anyio's "This portal is not running"."""
        return ComponentNotStartedError(
            f"app {self.aio.name!r}: its event loop ended: {self._portal_ended[0]!r} was "
            "raised on it outside any task's code (a plugin, a middleware, a loop callback); "
            "this app cannot serve any more: close() it and make a new one"
        )

    def cancel(self, uuid: str, reason: str = "cancelled") -> Task | None:
        """Cancel a task; see :meth:`AsyncQueueTasks.cancel`. Returns the record."""
        record = self._call(self.aio.cancel, uuid, reason)
        return None if record is None else self._bind(record)

    def start(self) -> None:
        """Start the components (not the worker); idempotent. Other calls start them anyway."""
        self._call(self.aio.start)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The broker's dead letters (oldest first), each with the reason it was given up."""
        return self._call(self.aio.dead_letters, limit)

    def requeue_dead_letters(self, ids: list[str] | None = None, *, force: bool = False) -> int:
        """Put dead letters back in the queue (all when ``ids`` is None) and reset their
        records to ``new``; see :meth:`AsyncQueueTasks.requeue_dead_letters`. Returns how many."""
        return self._call(partial(self.aio.requeue_dead_letters, ids, force=force))

    def config_get(self, namespace: str, key: str, default: Any = None) -> Any:
        """Read a cluster-wide value from the GlobalConfig (``default`` when missing)."""
        return self._call(self.aio.config_get, namespace, key, default)

    def config_set(self, namespace: str, key: str, value: Any) -> None:
        """Write a cluster-wide value to the GlobalConfig."""
        self._call(self.aio.config_set, namespace, key, value)

    def ping(self, server: bool = True) -> bool:
        """QTasks' health check; see :meth:`AsyncQueueTasks.ping`."""
        return self._call(self.aio.ping, server)

    def flush_all(self) -> dict[str, int]:
        """Delete everything the components hold; see :meth:`AsyncQueueTasks.flush_all`
        (refused while this app serves)."""
        if self._serving is not None or self._forever:
            raise ComponentError(
                f"app {self.aio.name!r} is serving tasks: stop it before flush_all"
            )
        return self._call(self.aio.flush_all)

    def inspect(self) -> dict[str, Any]:
        """What ``qtasks inspect`` shows (JSON-ready); see :meth:`AsyncQueueTasks.inspect`."""
        return self._call(self.aio.inspect)

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's portal (its thread is not in this process) and
        locks another thread may have held, so that the next call starts afresh here."""
        if self._portal is not None:
            _inherited.append((self._portal, self._portal_stop, self._serving))
        self._portal = self._portal_stop = self._serving = self._portal_loop = None
        self._portal_ended = []
        self._lock = threading.Lock()
        self._closing = False
        self._close_done = threading.Condition(self._lock)
        self._forever = 0
        self._forever_done = threading.Condition()

    def __enter__(self) -> QueueTasks:
        """Serve tasks in the background thread until ``__exit__``."""
        cm = self.portal.wrap_async_context_manager(self.aio)
        cm.__enter__()
        self._serving = cm
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._serving is not None:
            serving, self._serving = self._serving, None
            if not self._portal_ended:  # else nothing is left to stop
                serving.__exit__(None, None, None)

    def close(self) -> None:
        """Stop serving (ending a :meth:`run_forever` in another thread gracefully), stop
        every component and the portal's thread. Calls still in flight in the portal (a
        ``wait`` left behind by a Ctrl-C in its caller) are cancelled: a thread blocked in
        ``wait_result()`` or ``stream()`` gets :class:`~qtasks.errors.ComponentNotStartedError`.
        A portal whose loop ended on an exception (see :meth:`_ended`) is waited for, its
        worker's grace period cut short: its thread is over when this returns.

        While it stops the portal, calls from other threads raise
        :class:`~qtasks.errors.ComponentNotStartedError` (none starts a second event loop),
        and a second ``close()`` waits for this one. Once it has returned, the next call starts
        the app again in a new portal."""
        with self._forever_done:
            if self._forever:
                self.stop()
                # Its serving task must unwind itself (anyio scopes end in the task that
                # entered them); that takes at most the grace period.
                self._forever_done.wait_for(
                    lambda: not self._forever, self.aio.config.shutdown_grace + 30
                )
        self.__exit__()
        with self._lock:
            if self._closing:
                # Another thread's close: waited for, unless this thread is one it waits
                # for in turn (the loop's, a task's).
                if threading.current_thread() is self._portal_stop or in_task_thread():
                    return
                self._close_done.wait_for(lambda: not self._closing)
            portal, thread = self._portal, self._portal_stop
            if portal is None:
                return
            # The portal stays set (a call from another thread must not make a new one)
            # until it is stopped; meanwhile those calls are refused (see portal).
            self._closing = True
        try:
            if self._portal_ended:
                # Nothing to stop through it: the thread's own teardown (asyncio cancelling
                # the tasks left) ends what it can. Its worker's stop would give the tasks the
                # grace period, though none can run there any more: cut short (as a second
                # Ctrl-C does) and waited for, so the thread is over (and its exception
                # reported) when this returns, not seconds later in whatever code runs then.
                self.aio.stop(now=True)
                if thread is not None:
                    thread.join(timeout=STOP_MARGIN + 10)
                if thread is None or not thread.is_alive():
                    # Nothing served there consumed the request: not left to stop at once
                    # the next serving of the async app (app.aio) in a loop of its own.
                    self.aio._withdraw_stop()
            else:
                portal.call(self.aio.aclose)
                # Cancelled, not awaited: they would hold the thread (and the process) until
                # they ended on their own, on components just closed.
                portal.call(partial(portal.stop, cancel_remaining=True))
                if thread is not None:
                    thread.join(timeout=10)
        finally:
            with self._lock:
                self._portal = self._portal_loop = None
                self._closing = False
                self._close_done.notify_all()

    def run_forever(self, starter: Starter | None = None, **qtasks17: Any) -> None:
        """Block serving tasks until :meth:`stop` or SIGINT/SIGTERM, then stop gracefully.

        The worker runs in the app's background loop (the portal's), the one every other
        method uses, so ``add_task(..., timeout=...)`` from other threads meanwhile is served.
        It may run in any thread, e.g. ``threading.Thread(target=app.run_forever)``; signals
        are caught only when it runs on the main thread. With a ``starter``, that starter runs
        the async app in a loop of its own in this thread instead. In a process that set up
        no logging, it logs to stderr at ``config.log_level`` as ``qtasks run`` does."""
        if qtasks17:  # QTasks' num_workers=, reset_config=, loop=: accepted, warned
            warn_run_forever_options(qtasks17)
        log_when_unconfigured(self.aio)
        if starter is not None:
            # The components belong to one event loop: those started in the background
            # thread's loop by earlier calls are closed first, and start again in this one.
            self.close()
            self.aio.run_forever(starter)
            return
        with stop_on_signals(self.aio):
            with self._forever_done:
                self._forever += 1
            try:
                serving = self.portal.start_task_soon(self.aio.serve)
                # Waited for in slices: a signal meant for this (main) thread may be delivered
                # to another one, which does not interrupt a wait without a timeout here, so
                # SIGINT/SIGTERM would never reach their handlers.
                while True:
                    try:
                        serving.result(timeout=_SIGNAL_SLICE)
                        break
                    except TimeoutError:
                        if serving.done():
                            raise  # serve itself raised a TimeoutError (e.g. TaskTimeoutError)
            finally:
                with self._forever_done:
                    self._forever -= 1
                    self._forever_done.notify_all()

    def stop(self, *, now: bool = False) -> None:
        """Ask :meth:`run_forever` to end gracefully, as SIGTERM does (``now=True``: without
        the grace period, as a second signal does); see :meth:`AsyncQueueTasks.stop`. From any
        thread or a signal handler; it does not wait."""
        self.aio.stop(now=now)


def apps_in(module: ModuleType, app: AsyncQueueTasks | None = None) -> list[str]:
    """The names under which ``module`` holds a qtasks app, sync or async, in the order it
    set them; with ``app``, only those of that async app (it, or a sync app wrapping it). For
    an error that names a module's apps when the one looked for is not there (``qtasks -A``,
    the pytest plugin's ``qtasks_app``)."""
    return [
        name
        for name, value in vars(module).items()
        if isinstance(value, AsyncQueueTasks | QueueTasks)
        and app in (None, value.aio if isinstance(value, QueueTasks) else value)
    ]


_ASYNC_ONLY = {
    "aclose": "close()",
    "serve": "run_forever()",
    "wait_for_stop": "run_forever(), which returns when stopped",
}
"""Coroutine methods of the async app whose sync counterpart has another name."""

_CELERY_APP = {
    "AsyncResult": "app.get(uuid) reads a task's record, app.wait(uuid, timeout) waits for it",
    "send_task": "app.add_task(name, *args, **kwargs) enqueues a task by name",
    "control": "app.cancel(uuid) cancels a task; app.inspect() reports the workers",
}
"""Celery's app attributes, with what the sync app has instead."""


async def _awaited(fn: Callable[..., Awaitable[R]], *args: Any) -> R:
    """``await fn(*args)``, a coroutine for ``asyncio.run_coroutine_threadsafe``."""
    return await fn(*args)


def _is_async_callable(value: Any) -> bool:
    """Whether calling ``value`` gives a coroutine or an async iterator to be awaited (seen
    through the decorator that refuses a sync task's thread, :func:`qtasks.threads.loop_only`)."""
    value = inspect.unwrap(value)
    return inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value)


_SIGNAL_SLICE = 0.2
"""Seconds the main thread waits at a time while ``run_forever`` serves (see there)."""


def _start_portal(
    ended: list[BaseException],
) -> tuple[BlockingPortal, threading.Thread, asyncio.AbstractEventLoop]:
    """Run an event loop with a portal in a daemon thread; an exception raised out of the
    loop is put in ``ended`` at once, before the loop's teardown cancels the calls waiting in
    the portal (which can take the shutdown grace period), so they can name it."""
    ready = threading.Event()
    holder: list[tuple[BlockingPortal, asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        async with BlockingPortal() as portal:
            holder.append((portal, asyncio.get_running_loop()))
            ready.set()
            await portal.sleep_until_stopped()

    options = loop_options("asyncio")
    make: Callable[[], asyncio.AbstractEventLoop] = options.get(
        "loop_factory", asyncio.new_event_loop
    )

    def noted_loop() -> asyncio.AbstractEventLoop:
        loop = make()
        run_forever = loop.run_forever

        def run_noted() -> None:
            try:
                run_forever()
            except BaseException as exc:
                ended.append(exc)
                raise

        with contextlib.suppress(AttributeError):  # a loop type without instance attributes
            loop.run_forever = run_noted  # type: ignore[method-assign]  # noted, same call
        return loop

    thread = threading.Thread(
        target=anyio.run,
        args=(main,),
        kwargs={"backend_options": {**options, "loop_factory": noted_loop}},
        name="qtasks-portal",
        daemon=True,
    )
    thread.start()
    ready.wait()
    portal, loop = holder[0]
    return portal, thread, loop


_apps: weakref.WeakSet[QueueTasks] = weakref.WeakSet()
"""Every sync app, for :func:`_after_fork_in_child`."""

_inherited: list[object] = []
"""The parent's portals in a forked child: never finalized here, as their loop's epoll and
sockets are the parent's too."""


def _after_fork_in_child() -> None:
    for app in list(_apps):
        app._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_at_exit(ref: weakref.ref[QueueTasks]) -> None:
    app = ref()
    if app is not None:
        try:
            app.close()
        except Exception:  # pragma: no cover - interpreter shutdown, nothing left to report to
            pass
