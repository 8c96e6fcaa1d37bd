"""The async app: task registry, components, results and the serving lifecycle.

Over ~500 lines on purpose: it is the public API of the async app, every method a short
delegate to the step that does the work (:mod:`qtasks.enqueue`, :mod:`qtasks.worker`,
:mod:`qtasks.settle`, :mod:`qtasks.report`), plus the component lifecycle across event loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from operator import attrgetter
from os import PathLike
from typing import TYPE_CHECKING, Any, ParamSpec, Self, TypeVar, cast, overload

import anyio
from anyio.abc import TaskGroup

from qtasks import bulk, flow, local_wait, report
from qtasks import enqueue as enqueue_step
from qtasks.checks import check_delay, check_timeout
from qtasks.clock import SYSTEM_CLOCK, Clock
from qtasks.compat.calls import UNSET, split_task_name
from qtasks.compat.config import warn_run_forever_options
from qtasks.components import (
    Broker,
    CancelFrom,
    DeadLetter,
    FreshWait,
    GlobalConfig,
    SharedServer,
    Starter,
    Storage,
    forwards,
    plain_overridden,
    provides,
)
from qtasks.config import QueueConfig, follow_broker, load_config, with_command_flags
from qtasks.depends import InjectPlugin
from qtasks.discovery import build_components, components_named, load_plugins
from qtasks.errors import (
    AsyncCallInThreadError,
    ComponentError,
    ComponentNotStartedError,
    TaskArgumentsError,
    TaskDeclarationError,
    TaskNotFoundError,
    TaskTimeoutError,
)
from qtasks.executor import Middleware
from qtasks.memory import MemoryBroker, MemoryGlobalConfig, MemoryStorage
from qtasks.messages import Codec, Envelope, Serializer
from qtasks.models import typed_result
from qtasks.named_components import refuse_names
from qtasks.plugins import Hooks
from qtasks.record import TaskRecord, TaskStatus
from qtasks.retry import RetryPlugin
from qtasks.routers import Router, shared_tasks
from qtasks.serving_log import log_when_unconfigured
from qtasks.starter import SignalStarter
from qtasks.task import (
    OPTION_NAMES,
    AsyncTask,
    TaskDef,
    TaskOptions,
    as_tuple,
    warn_misspelt_options,
)
from qtasks.threads import _running_loop, in_task_thread, loop_only
from qtasks.worker import QueueWorker
from qtasks.workflows import runtime as workflows
from qtasks.workflows.canvas import Node, Signature, signature
from qtasks.workflows.plan import WORKFLOW_TASK

if TYPE_CHECKING:
    from qtasks.compat.events import Events

P = ParamSpec("P")
R = TypeVar("R")
log = logging.getLogger("qtasks")

_RESERVED = ("priority", "timeout", "delay", "eta")


def _sync_app() -> type:
    from qtasks.sync import QueueTasks

    return QueueTasks


_loop_only = loop_only(attrgetter("name"), "app", _sync_app)
"""Every public coroutine method of the app but ``add_task``, ``enqueue`` and ``add_tasks``
(plain defs that check the same inline, one frame fewer on the enqueue path) raises
:class:`~qtasks.errors.AsyncCallInThreadError` in a sync task's thread."""


_INHERITED: list[object] = []
"""What a forked child kept of its parent's event loops (see ``_leave_old_loop``)."""


async def _not_started(record: TaskRecord, envelope: Envelope) -> None:
    raise ComponentNotStartedError("enqueue before the app started")


async def _wait_not_started(uuid: str, timeout: float | None) -> TaskRecord:
    raise ComponentNotStartedError("wait before the app started")


def _on_asyncio() -> bool:
    """Whether this runs on an asyncio event loop (not trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _threadsafe(callback: Callable[[], object]) -> Callable[[], object]:
    """``callback`` made safe to call from any thread or a signal handler: it is scheduled to
    run soon in the current event loop (without waiting for it)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio: its token does the same
        import trio  # type: ignore[import-not-found]  # only there when the app runs on it

        return partial(trio.lowlevel.current_trio_token().run_sync_soon, callback)
    return partial(loop.call_soon_threadsafe, callback)


class AsyncQueueTasks:
    """A qtasks app for async code. With no arguments every component is in-memory.

    Use ``async with app:`` to serve tasks inside a running event loop (e.g. a FastAPI lifespan),
    ``app.run_forever()`` to serve until SIGINT/SIGTERM, or just ``await app.add_task(...)`` to
    produce (components start on first use; close them with ``await app.aclose()``, or let the
    event loop end: they are closed then, and started again in the next loop that uses the app,
    see :meth:`start`).
    """

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
        refuse_names(type(self).__name__, {**given, "worker": worker})
        if broker_url is not None:  # QTasks' form: the Redis components from one URL
            from qtasks.compat.url import components_from_url

            config, broker, storage, global_config = components_from_url(
                broker_url, config, broker, storage, global_config, name
            )
        self.name = name
        self.config = config or QueueConfig()
        self.config_sources: dict[str, str] = {}
        """Where each config value came from (filled by :meth:`from_config`, and for a
        ``config`` naming components, see :func:`~qtasks.discovery.components_named`)."""
        if config is not None:  # one naming components: built as from_config builds them
            named = components_named(
                config, {"broker": broker, "storage": storage, "global_config": global_config}
            )
            if named is not None:
                loaded, built = named
                self.config, self.config_sources = loaded.config, loaded.sources
                broker, storage, global_config = (
                    built["broker"],
                    built["storage"],
                    built["global_config"],
                )
        self.broker: Broker = broker or MemoryBroker()
        self._made_storage: Storage | None = None if storage is not None else MemoryStorage()
        self.storage: Storage = storage or self._made_storage or MemoryStorage()
        self.global_config: GlobalConfig = global_config or MemoryGlobalConfig()
        self.worker: QueueWorker = worker or QueueWorker()
        self.clock: Callable[[], float]
        """:attr:`time_source`'s ``time``, the unix time the app reads (set with it): a plain
        attribute, so that reading the time per task stays one lookup and one call."""
        self.time_source = SYSTEM_CLOCK
        self.codec = Codec(serializer, self.config.max_message_size)
        self.hooks = Hooks()
        self.hooks.register(RetryPlugin())
        self.injector = InjectPlugin()
        """Fills ``Depends`` and State parameters (the executor's injection step)."""
        self.hooks.register(self.injector)
        # Installed plugins (entry points) load with the app, so a broken one fails here.
        load_plugins(self.hooks, self.config)
        self.tasks: dict[str, TaskDef[..., Any]] = {}
        self.middlewares: list[Middleware] = []
        self.thread_limiter = anyio.CapacityLimiter(self.config.max_tasks_process)
        """Threads of sync task code at once. A thread that ``max_time`` or a cancel gave up
        on keeps its token until it returns (see :mod:`qtasks.threads`)."""
        self._no_thread_limit = anyio.CapacityLimiter(math.inf)
        """Given to anyio for those threads: their tokens of ``thread_limiter`` are held by
        qtasks itself, until the threads return."""
        self.shared_server: SharedServer | None = None
        """The broker, when it folds storage writes into its round trips (see
        :class:`~qtasks.components.SharedServer`); set at start."""
        self.enqueue_path = ""
        """How enqueue reaches the backends, chosen at start by :func:`qtasks.enqueue.choose`:
        ``"shared"``, ``"overlapped"`` or ``"sequential"``."""
        self._store_and_publish: enqueue_step.StoreAndPublish = _not_started
        self._wait_added: Callable[[str, float | None], Awaitable[TaskRecord]] = _wait_not_started
        """How ``add_task(timeout=...)`` waits: the storage's :class:`FreshWait` when it has
        it, else :meth:`Storage.wait` (chosen at start)."""
        self._stack: AsyncExitStack | None = None
        self._serving: AsyncExitStack | None = None
        self._task_group: TaskGroup | None = None
        self._start_lock: anyio.Lock | None = None
        self._configured = False
        """``qtasks_app_configured`` fired for the start under way or done: a start tried
        again after it failed (a worker waiting for its servers, see :mod:`qtasks.waiting`)
        does not fire it again; :meth:`aclose` clears it, so the next start does."""
        self.starting: str | None = None
        """The component :meth:`start` was starting when it failed (``"storage"``,
        ``"global_config"`` or ``"broker"``); ``None`` once they all started or before any
        did (a hook failed). For the warning of a worker waiting for its servers."""
        self._loop: asyncio.AbstractEventLoop | None = None
        """The asyncio loop the components were started in (``None`` under trio)."""
        self._pid = os.getpid()
        """The process that started them: a forked child has the parent's loop, not its own."""
        self._guard: asyncio.Task[None] | None = None
        self._closing = False
        self._pending_hooks: list[Any] = []
        # stop() may run in any thread or in a signal handler, so no lock: it sets the flag,
        # then calls the waker; wait_for_stop() publishes the waker, then reads the flag.
        # Either order of the two leaves the waiter woken.
        self._stop_requested = False
        self._wake_stop: Callable[[], object] | None = None
        # The same pattern for stop(now=True) and the worker serving meanwhile.
        self._stop_now = False
        self._wake_hurry: Callable[[], object] | None = None
        shared_tasks.adopt(self)

    # --- time -----------------------------------------------------------------------------

    @property
    def time_source(self) -> Clock:
        """The app's :class:`~qtasks.clock.Clock`: the unix time it reads and its waits for a
        point in it (:data:`~qtasks.clock.SYSTEM_CLOCK` in production). A test harness
        assigns its fake one, then the one it saved."""
        return self._time_source

    @time_source.setter
    def time_source(self, clock: Clock) -> None:
        self._time_source = clock
        self.clock = clock.time

    @property
    def sleep_until(self) -> Callable[[float], Awaitable[None]] | None:
        """:attr:`time_source`'s ``sleep_until``: the flow gate's short waits (``None``: real
        sleeps)."""
        return self._time_source.sleep_until

    @property
    def wait_clock(self) -> Callable[[float], Awaitable[None]] | None:
        """:attr:`time_source`'s ``wait_until``, where ``ctx.sleep`` also ends (``None``: only
        time moves the clock)."""
        return self._time_source.wait_until

    @classmethod
    def from_config(
        cls,
        path: str | PathLike[str] | None = None,
        *,
        name: str = "QueueTasks",
        cli: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Self:
        """Build an app from configuration alone.

        Reads ``path`` (default: ``$QTASKS_CONFIG``, else ``qtasks.toml`` or ``[tool.qtasks]``
        of ``pyproject.toml`` in the working directory), then ``QTASKS_*`` variables, then
        ``cli`` flags (over those of the command importing the app, see
        :func:`~qtasks.config.command_flags`), then ``overrides`` (keyword arguments win over
        everything). The broker,
        storage and global config are found by name among the installed entry points and built
        with ``from_config(config)``; a storage and global config left unset follow a remote
        broker (see :func:`~qtasks.config.follow_broker`). ``app.config_sources`` tells where
        each value came from.
        """
        loaded = follow_broker(load_config(path, cli=with_command_flags(cli), overrides=overrides))
        app = cls(name, config=loaded.config, **build_components(loaded.config))
        app.config_sources = loaded.sources
        return app

    # --- declaration ----------------------------------------------------------------------

    @overload
    def task(self, func: Callable[P, R], /) -> TaskDef[P, R]: ...

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
        middlewares_before: Sequence[Middleware] | None = None,
        middlewares_after: Sequence[Middleware] | None = None,
        rate_limit: str | None = None,
        rate_burst: int | None = None,
        concurrency_key: str | Callable[..., Any] | None = None,
        max_concurrency: int | None = None,
        expires: float | None = None,
        unique_key: Callable[..., Any] | None = None,
        unique_for: float | None = None,
        **extra: Any,
    ) -> Callable[[Callable[P, R]], TaskDef[P, R]]: ...

    def task(self, name: Any = None, **options: Any) -> Any:
        """Register a task: ``@app.task`` or ``@app.task("name", retry=3, ...)``.

        A duplicate name or an option of the wrong type raises
        :class:`~qtasks.errors.TaskDeclarationError` here, not when the task runs."""
        if callable(name):
            return self._register(name, None, {})
        if name is not None and not isinstance(name, str):
            raise TaskDeclarationError(f"task name must be a string, got {name!r}")

        def decorator(func: Callable[P, R]) -> TaskDef[P, R]:
            return self._register(func, name, options)

        return decorator

    def _register(
        self, func: Callable[P, R], name: str | None, options: dict[str, Any]
    ) -> TaskDef[P, R]:
        if not callable(func):
            raise TaskDeclarationError(f"@app.task needs a function, got {func!r}")
        task_name = name or getattr(func, "__name__", None) or repr(func)
        if task_name in self.tasks:
            raise TaskDeclarationError(f"a task named {task_name!r} is already registered")
        extra = {k: options.pop(k) for k in list(options) if k not in OPTION_NAMES}
        if extra:
            warn_misspelt_options(task_name, extra, OPTION_NAMES)
        for key in ("retry_on_exc", "tags", "middlewares_before", "middlewares_after"):
            if key in options:
                options[key] = as_tuple(options[key], key, task_name)
        if options.get("retry_on_exc") == ():
            options["retry_on_exc"] = None
        opts = TaskOptions(name=task_name, extra=extra, **options)
        task = TaskDef(self, func, opts)
        if task.injected:
            self.injector.check(task)  # Depends and State errors here, not at the first run
        self.tasks[task_name] = task
        self._pending_hooks.extend(
            self.hooks.notify_sync("qtasks_task_registered", app=self, task=task)
        )
        return task

    def include_router(self, router: Router) -> None:
        """Register every task declared on ``router`` (see :mod:`qtasks.routers`)."""
        router.bind(self)

    def add_plugin(
        self,
        plugin: object,
        name: str | Sequence[str] | None = None,
        trigger_names: Sequence[str] | None = None,
        component: str | None = None,
    ) -> str:
        """Register a plugin object (its ``@hookimpl`` methods); return its name.

        A plugin written for QTasks (a ``trigger(name, **kwargs)`` method, e.g. a
        ``qtasks.plugins.base.BasePlugin``) is run through :mod:`qtasks.compat.plugins`, with
        QTasks' ``trigger_names`` and ``component``; QTasks' positional form
        ``add_plugin(plugin, trigger_names, component)`` works too."""
        from qtasks.compat.plugins import adapt_for

        adapter, label = adapt_for(self.hooks, plugin, name, trigger_names, component)
        return self.hooks.register(adapter, label)

    @property
    def events(self) -> Events:
        """QTasks' event handlers: ``@app.events.on.task_success()`` (see
        :mod:`qtasks.compat.events`); created, and its plugin registered, on first use."""
        events: Events | None = self.__dict__.get("_events")
        if events is None:
            from qtasks.compat.events import Events

            events = self.__dict__["_events"] = Events(self)
        return events

    def add_middleware(self, middleware: Middleware, position: str | None = None) -> None:
        """Wrap every task's execution in ``middleware``, ``async def mw(run, call_next)``
        (outermost first). A QTasks ``TaskMiddleware`` class runs before every task
        (``position="before"``, QTasks' default) or after it (``"after"``). Anything else
        raises :class:`~qtasks.errors.TaskDeclarationError` here, not when tasks run."""
        from qtasks.compat.middleware import app_middleware

        self.middlewares.append(app_middleware(middleware, position))

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether the components are started (``start()`` ran and ``aclose()`` did not)."""
        return self._stack is not None

    @_loop_only
    async def start(self) -> None:
        """Start the components (not the worker). Idempotent.

        On asyncio the components belong to the running loop. When that loop ends with its
        tasks cancelled, as ``asyncio.run``, ``anyio.run`` and pytest-asyncio end theirs, the
        app closes them there, in order (as :meth:`aclose`), and the next loop that uses the
        app starts them again: an app can be used from one ``asyncio.run`` to the next, and
        from test to test with a loop per test. Components left behind by a loop closed
        without that (``loop.close()`` after ``run_until_complete``) are dropped without
        touching the dead loop, and started anew.

        While :meth:`aclose` stops the components, a start (so any call that would start them:
        ``add_task``, ``get``...) raises :class:`~qtasks.errors.ComponentNotStartedError`
        rather than start a second life of the app in the middle of its close; once the close
        has returned, the next call starts the app again."""
        if self._stack is not None and self._loop is not _running_loop():
            self._leave_old_loop()
        if self._start_lock is None:
            self._start_lock = anyio.Lock()
        async with self._start_lock:
            if self._stack is not None:
                return
            if self._closing and self._pid == os.getpid():  # a forked child's is the parent's
                raise ComponentNotStartedError(
                    f"app {self.name!r} is closing (aclose() or close() is under way): it is "
                    "not started again meanwhile; use it once the close has returned"
                )
            shared_tasks.adopt(self)  # modules of shared tasks imported since __init__
            # Names a task's annotations use may be defined after it in its module.
            for task in self.tasks.values():
                task.resolve_annotations()
            stack = AsyncExitStack()
            await stack.__aenter__()
            try:
                self.starting = None  # not an earlier attempt's component, should a hook fail
                if not self._configured:  # once per start, not per attempt of it
                    await self.hooks.notify("qtasks_app_configured", app=self, config=self.config)
                    self._configured = True
                for pending in self._pending_hooks:
                    await pending
                self._pending_hooks.clear()
                for kind in ("storage", "global_config", "broker"):
                    component = getattr(self, kind)
                    self.starting = kind
                    await component.start(stack, self.config)
                    stack.push_async_callback(self._stopped_hook, kind, component)
                    await self.hooks.notify(
                        "qtasks_component_started", app=self, kind=kind, component=component
                    )
                self.enqueue_path, self._store_and_publish = enqueue_step.choose(
                    self, _on_asyncio()
                )
                storage = self.storage
                self._wait_added = (
                    cast(FreshWait, storage).wait_fresh
                    if provides(storage, FreshWait)
                    else storage.wait
                )
                self.starting = None
                await self.hooks.notify("qtasks_app_started", app=self)
            except BaseException:
                # Shielded: a start cancelled half-way (a stop while a worker waits for its
                # servers, see qtasks.waiting) still closes what it opened.
                with anyio.CancelScope(shield=True):
                    await stack.aclose()
                raise
            self._stack = stack
            self._loop = _running_loop()
            self._pid = os.getpid()
            if self._loop is not None:
                guard = self._loop.create_task(
                    self._close_with_loop(), name=f"qtasks app {self.name!r}: close with the loop"
                )
                # It holds nothing: a loop closed without cancelling it need not log it. (An
                # asyncio Task's flag; a custom task factory's tasks may not have it.)
                with contextlib.suppress(AttributeError):
                    guard._log_destroy_pending = False  # type: ignore[attr-defined]
                self._guard = guard

    async def _close_with_loop(self) -> None:
        """Wait for the loop's end: the loop's runner cancels every task left before closing
        the loop, this one too, and waits for them. Close the components then, while the
        loop still runs, unless the app is serving (the serving task, cancelled as well,
        unwinds ``async with app`` itself) or already closing."""
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            if self._guard is asyncio.current_task():
                self._guard = None
                if self._serving is None and not self._closing:
                    await self.aclose()
            raise

    def _leave_old_loop(self) -> None:
        """Drop the components' state from an event loop that is no longer in use, without
        awaiting anything on it (it may be closed); the components, started again, notice
        that their connections belong to another loop and open new ones."""
        old = self._loop
        forked = self._pid != os.getpid()
        if old is not None and old.is_running() and not forked:
            raise ComponentError(
                f"app {self.name!r} was started in an event loop that is still running in "
                "another thread; an app serves one event loop at a time"
            )
        log.debug("app %r: its event loop is gone; starting again in this one", self.name)
        if forked:
            # The parent's loop runs on in the parent, sharing its epoll and sockets with this
            # process: finalizing its state here could unregister them there. Kept, unused.
            _INHERITED.append((old, self._stack, self._serving, self._task_group, self._guard))
            if isinstance(self.worker, QueueWorker):
                self.worker = self.worker.forked()
        self._stack = self._serving = self._task_group = None
        self._guard = self._loop = self._start_lock = None
        self._configured = False

    async def _stopped_hook(self, kind: str, component: Any) -> None:
        await self.hooks.notify(
            "qtasks_component_stopped", app=self, kind=kind, component=component
        )

    @_loop_only
    async def aclose(self) -> None:
        """Stop the worker (if serving) and every component. Calls that would start the app
        meanwhile raise :class:`~qtasks.errors.ComponentNotStartedError` (see :meth:`start`)."""
        if self._stack is not None and self._loop is not _running_loop():
            self._leave_old_loop()  # nothing can be closed on a loop that is gone
            return
        guard, self._guard = self._guard, None
        if guard is not None and guard is not asyncio.current_task():
            guard.cancel()
        self._closing = True
        self._configured = False  # closed (or never started): the next start is a new one
        try:
            if self._serving is not None:
                serving, self._serving = self._serving, None
                try:
                    await serving.aclose()
                finally:
                    self._wake_hurry = None
                    self._stop_now = False
            if self._stack is not None:
                stack, self._stack = self._stack, None
                await self.hooks.notify("qtasks_app_stopping", app=self)
                await stack.aclose()
                await self.hooks.notify("qtasks_app_stopped", app=self)
        finally:
            self._closing = False

    async def __aenter__(self) -> AsyncQueueTasks:
        """Start components and a worker in the current event loop."""
        await self.start()
        serving = AsyncExitStack()
        await serving.__aenter__()
        try:
            tg = await serving.enter_async_context(anyio.create_task_group())
            serving.callback(self.worker.stop)
            # Plugins' long-lived tasks (timers): cancelled first on shutdown, before the
            # worker drains, and available to hooks fired while the worker starts.
            background = await serving.enter_async_context(anyio.create_task_group())
            serving.callback(background.cancel_scope.cancel)
            serving.callback(setattr, self, "_task_group", None)
            self._task_group = background
            await tg.start(self.worker.run, self)
        except BaseException:
            await serving.aclose()
            raise
        self._serving = serving
        local_wait.warn_if_serving_alone(self)
        self._wake_hurry = _threadsafe(self._hurry_worker)
        if self._stop_now:
            self._hurry_worker()
        return self

    def _hurry_worker(self) -> None:
        hurry = getattr(self.worker, "hurry", None)  # read with a default: see Worker
        if hurry is not None:
            hurry()

    @property
    def own_memory_storage(self) -> bool:
        """The storage is the in-memory one the app made itself (none was given, and no
        configuration replaced it since): see :mod:`qtasks.local_wait`."""
        return self._made_storage is not None and self.storage is self._made_storage

    def started_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop this app's components were started in, while it runs (in this
        process), else ``None``: where a blocking call from another thread must go, such as
        the sync app's from a sync task of a worker serving there (``qtasks run``)."""
        loop = self._loop
        if self._stack is None or loop is None or self._pid != os.getpid():
            return None
        return loop if loop.is_running() else None

    @property
    def serving(self) -> bool:
        """Whether a worker of this app serves in this process (``async with app:``,
        :meth:`run_forever`, :meth:`serve`)."""
        return self._serving is not None

    @property
    def task_group(self) -> TaskGroup:
        """While the app serves (``async with app:``): the task group in which plugins run
        long-lived tasks, e.g. ``await app.task_group.start(loop)`` from
        ``qtasks_component_started``. Its tasks are cancelled when shutdown begins, before the
        worker stops; they must not raise (an exception there cancels the serving code).

        Raises :class:`~qtasks.errors.ComponentNotStartedError` when the app is not serving."""
        if self._task_group is None:
            raise ComponentNotStartedError(f"app {self.name!r} is not serving")
        return self._task_group

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @_loop_only
    async def serve(self) -> None:
        """Serve in the running loop until :meth:`stop` or SIGINT/SIGTERM (watched only when
        this loop runs on the main thread), then stop gracefully."""
        await SignalStarter().serve(self)

    def run_forever(self, starter: Starter | None = None, **qtasks17: Any) -> None:
        """Block serving tasks in a new event loop until :meth:`stop` or SIGINT/SIGTERM
        (through ``starter``, by default a :class:`~qtasks.starter.SignalStarter`). It may run
        in any thread; signals are watched only when it runs on the main thread. Servers not
        reachable yet are waited for, up to ``config.start_timeout`` (see
        :mod:`qtasks.waiting`). In a process that set up no logging, it logs to stderr at
        ``config.log_level`` as ``qtasks run`` does (:mod:`qtasks.serving_log`)."""
        if qtasks17:  # QTasks' num_workers=, reset_config=, loop=: accepted, warned
            warn_run_forever_options(qtasks17)
        log_when_unconfigured(self)
        (starter or SignalStarter()).run(self)

    def stop(self, *, now: bool = False) -> None:
        """Ask :meth:`run_forever` (or :meth:`serve`) to end gracefully, as SIGTERM does: no new
        messages, running tasks get ``shutdown_grace`` seconds, then it returns.

        With ``now=True``, as a second SIGINT/SIGTERM does, the grace period is cut short, also
        when a stop is under way: running tasks are cancelled at once and handed back to the
        broker, to run again (at-least-once: nothing is lost, their work so far is redone).

        Callable from any thread, from a task, or from a signal handler; it does not wait (join
        the thread that runs ``run_forever`` for that). Calling it again without ``now``
        changes nothing. Called while nothing serves, the request is kept, and the next
        ``run_forever`` starts and stops at once, so stopping a server thread that has not got
        going yet is never lost; each ``run_forever`` consumes the request when it returns. It
        does not end ``async with app:`` blocks: leave those (``now`` then applies to the stop
        at their end)."""
        self._stop_requested = True
        wake = self._wake_stop
        if wake is not None:
            try:
                wake()
            except RuntimeError:  # its loop just closed: that run has ended anyway
                pass
        if now:
            self._stop_now = True
            hurry = self._wake_hurry
            if hurry is not None:
                try:
                    hurry()
                except RuntimeError:  # as above
                    pass

    def _withdraw_stop(self) -> None:
        """Forget a :meth:`stop` request nothing consumed (no ``run_forever`` to end): the
        next serving would otherwise start and stop at once, and without grace after
        ``now=True``. The sync app's ``close()`` calls it after stopping an app whose loop
        died. From any thread."""
        self._stop_requested = False
        self._stop_now = False

    @_loop_only
    async def stop_requested_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for :meth:`stop` (called before or meanwhile) and say whether
        it was; the request is kept, for :meth:`wait_for_stop` to consume. What a worker
        waiting for its servers at start sleeps on between two attempts."""
        event = anyio.Event()
        self._wake_stop = _threadsafe(event.set)
        try:
            if not self._stop_requested:
                with anyio.move_on_after(seconds):
                    await event.wait()
        finally:
            self._wake_stop = None
        return self._stop_requested

    @_loop_only
    async def wait_for_stop(self) -> None:
        """Return once :meth:`stop` has been called (before this call or while it waits) and
        consume the request. What a :class:`~qtasks.components.Starter` awaits while serving."""
        event = anyio.Event()
        self._wake_stop = _threadsafe(event.set)
        try:
            if not self._stop_requested:
                await event.wait()
        finally:
            self._wake_stop = None
            self._stop_requested = False

    # --- producing ------------------------------------------------------------------------

    # add_task, enqueue and add_tasks return their coroutine from a plain def, so that a call
    # in a sync task's thread (which nothing there could await) raises at once: one C call
    # (no loop runs in this thread?) on the async path, and one coroutine frame fewer.
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
        _parent_uuid: str | None = None,
        **kwargs: Any,
    ) -> Coroutine[Any, Any, AsyncTask]:
        """Enqueue ``task_name(*args, **kwargs)`` and return its record.

        ``priority`` (lower runs first), ``delay`` (seconds, 0 or more) or ``eta`` (unix time)
        schedule it; with ``timeout`` the call waits for the final record and raises
        :class:`~qtasks.errors.TaskTimeoutError` if it does not come in time. ``expires``
        (seconds): not started by then, the task ends ``expired``. ``unique_key``: while a
        task added with that key is not final (with ``unique_for``: for ``unique_for``
        seconds from the add instead, final or not, and no longer), adding another returns
        that task's record instead (see :mod:`qtasks.flow`). Tasks whose own
        parameters use these names are enqueued with :meth:`enqueue`. QTasks' keyword form
        ``add_task(task_name="x", ...)`` (no positional) is accepted too. Called in a sync
        task's thread, where nothing could await it, it raises
        :class:`~qtasks.errors.AsyncCallInThreadError`."""
        if _running_loop() is None and in_task_thread():
            raise AsyncCallInThreadError(self.name, "add_task")
        if task_name is UNSET:
            task_name, args = split_task_name(task_name, args, kwargs)
        return self.enqueue(  # the attribute: qtasks-testing's harness stands in for it
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
            _parent_uuid=_parent_uuid,
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
        _parent_uuid: str | None = None,
    ) -> Coroutine[Any, Any, AsyncTask]:
        """Enqueue with explicit ``args``/``kwargs`` (every keyword stays free for the task).
        In a sync task's thread: :class:`~qtasks.errors.AsyncCallInThreadError`."""
        if _running_loop() is None and in_task_thread():
            raise AsyncCallInThreadError(self.name, "enqueue")
        return self._enqueue(
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
            _parent_uuid=_parent_uuid,
        )

    async def _enqueue(
        self,
        task_name: str,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        *,
        priority: int | None,
        timeout: float | None,
        delay: float | None,
        eta: float | None,
        expires: float | None,
        unique_key: str | None,
        unique_for: float | None,
        _parent_uuid: str | None,
    ) -> AsyncTask:
        if timeout is not None:  # before the enqueue: a bad one must not raise after it
            timeout = check_delay(timeout, "add_task: timeout", TaskArgumentsError)
            local_wait.check_waitable(self, f"add_task({task_name!r}, timeout=...)")
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        record, envelope, unique = await enqueue_step.prepare(
            self,
            task_name,
            args,
            kwargs,
            priority,
            delay,
            eta,
            _parent_uuid,
            expires=expires,
            unique_key=unique_key,
            unique_for=unique_for,
        )
        try:
            if unique is not None:  # claimed with the enqueue step (qtasks.flow)
                existing = await flow.publish_unique(self, record, envelope, unique)
                if existing is not None:  # a task with this unique key is pending
                    if "qtasks_task_deduplicated" in self.hooks.active:
                        await self.hooks.notify(
                            "qtasks_task_deduplicated", app=self, record=record, existing=existing
                        )
                    return self._bind(existing)
            else:
                await self._store_and_publish(record, envelope)  # qtasks.enqueue's step
        except BaseException as exc:  # a cancel too: what a plugin began for it ends
            await bulk.notify_failed(self, ((record, envelope),), exc)
            raise
        if "qtasks_storage_added" in self.hooks.active:
            await self.hooks.notify("qtasks_storage_added", app=self, record=record)
        if "qtasks_task_enqueued" in self.hooks.active:
            await self.hooks.notify("qtasks_task_enqueued", app=self, record=record)
        if timeout is not None:
            # Just stored: neither wait()'s existence check nor (FreshWait) a first read.
            try:
                return self._bind(await self._wait_added(record.uuid, timeout))
            except TaskTimeoutError as exc:
                raise local_wait.explained(self, exc) from None
        return record

    def add_tasks(self, signatures: Iterable[Signature]) -> Coroutine[Any, Any, list[AsyncTask]]:
        """Enqueue many tasks (``[task.s(1), task.s(2), ...]``) in one round trip per batch
        of 1,000; return their records in order. Each is checked and hooked as by
        :meth:`add_task` (see :mod:`qtasks.bulk`); in a sync task's thread it raises, too."""
        if _running_loop() is None and in_task_thread():
            raise AsyncCallInThreadError(self.name, "add_tasks")
        return self._add_tasks(signatures)

    async def _add_tasks(self, signatures: Iterable[Signature]) -> list[AsyncTask]:
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        return await bulk.add_tasks(self, signatures)

    def signature(
        self,
        task_name: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        priority: int | None = None,
        delay: float | None = None,
        retry: int | None = None,
        immutable: bool = False,
    ) -> Signature:
        """A call of the task ``task_name`` for a workflow or :meth:`add_tasks`, not made yet
        (options: ``priority``, ``delay``, ``retry``; ``immutable``: as a workflow step it
        gets no input, see :meth:`TaskDef.si`); an unknown task raises
        :class:`~qtasks.errors.UnknownTaskError` here."""
        return signature(
            self,
            task_name,
            args,
            kwargs,
            priority=priority,
            delay=delay,
            retry=retry,
            immutable=immutable,
        )

    @_loop_only
    async def run_workflow(
        self, workflow: Node, *, on_error: Signature | None = None
    ) -> workflows.Workflow:
        """Run a workflow (``chain``, ``group``, ``chord``, a signature): store it, enqueue
        its first steps and return its state; the workers do the rest. ``on_error`` runs once
        if a member fails, with the workflow id first. See ``docs/workflows.md``."""
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        return await workflows.run(self, workflow, on_error)

    @_loop_only
    async def get_workflow(self, id: str) -> workflows.Workflow | None:
        """The state of the workflow ``id``, or ``None``."""
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        return await workflows.get(self, id)

    @_loop_only
    async def wait_workflow(self, id: str, timeout: float | None = None) -> workflows.Workflow:
        """Wait until the workflow ``id`` ended (woken, not polled); return its state."""
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        return await workflows.wait(self, id, timeout)

    @_loop_only
    async def cancel_workflow(
        self, id: str, reason: str = "cancelled"
    ) -> workflows.Workflow | None:
        """Cancel the workflow ``id`` and its pending and running members; ``None`` when
        unknown."""
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        return await workflows.cancel(self, id, reason)

    @_loop_only
    async def get_workflow_records(self, id: str) -> dict[str, AsyncTask | None] | None:
        """Every member's record of the workflow ``id`` in one read: uuid -> record, in the
        order the members were declared, the error callback last; ``None`` for a record that
        expired (``result_ttl`` after the workflow ended) or is gone otherwise (evicted,
        deleted). ``None`` when no such workflow is stored. For a failed workflow, each
        member's status, error and traceback."""
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        found = await workflows.records(self, id)
        if found is None:
            return None
        return {
            uuid: None if record is None else await self._got(record)
            for uuid, record in found.items()
        }

    async def _got(self, record: TaskRecord) -> AsyncTask:
        """A stored record as :meth:`get` returns it: through ``qtasks_storage_got``, bound."""
        record = await self.hooks.transform("qtasks_storage_got", "record", app=self, record=record)
        return self._bind(record)

    def _bind(self, record: TaskRecord) -> AsyncTask:
        bound = AsyncTask(*record.values())
        bound._client = self
        task = self.tasks.get(bound.task_name)
        if task is not None and task.result_model is not None:
            typed_result(task, bound)  # a pydantic result, as the task's annotation says
        return bound

    @_loop_only
    async def get(self, uuid: str) -> AsyncTask | None:
        """The stored record of ``uuid``, or ``None``."""
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        record = await self.storage.get(uuid)
        return None if record is None else await self._got(record)

    @_loop_only
    async def wait(self, uuid: str, timeout: float | None) -> AsyncTask:
        """Wait for the final record of ``uuid`` (woken when it is written); raises
        :class:`~qtasks.errors.TaskTimeoutError` when ``timeout`` runs out, and
        :class:`~qtasks.errors.InvalidTimeoutError` for a ``timeout`` that is not seconds."""
        timeout = check_timeout(timeout, "wait: timeout")
        local_wait.check_waitable(self, f"waiting for task {uuid}")
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        if await self.storage.get(uuid) is None:
            raise TaskNotFoundError(uuid)
        try:
            return self._bind(await self.storage.wait(uuid, timeout))
        except TaskTimeoutError as exc:
            raise local_wait.explained(self, exc) from None

    @_loop_only
    async def stream(self, uuid: str, timeout: float | None = None) -> AsyncGenerator[Any, None]:
        """Yield the stored steps of a generator task as they come, until it is final; where
        the task ran again and its generator started over, a
        :class:`~qtasks.steps.StepsRestarted` comes before the new run's steps (see
        docs/generators.md, "When the task runs again"). Raises
        :class:`~qtasks.errors.TaskNotFoundError` for an unknown uuid and
        :class:`~qtasks.errors.TaskTimeoutError` when ``timeout`` (for the whole stream)
        runs out, as :meth:`wait` does.

        No cancel scope is open across a ``yield`` (anyio forbids it): each wait for the next
        step is bounded by what is left of the deadline, so the deadline never cancels the
        consumer's own awaits between steps, and a consumer that stops early (``break``,
        ``aclose()``, dropping the iterator) ends the stream cleanly from any task."""
        timeout = check_timeout(timeout, "stream: timeout")
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        if await self.storage.get(uuid) is None:
            raise TaskNotFoundError(uuid)
        steps = self.storage.steps(uuid)
        try:
            while True:
                with anyio.CancelScope(deadline=deadline) as scope:
                    try:
                        step = await anext(steps)
                    except StopAsyncIteration:
                        return
                if scope.cancelled_caught:
                    raise TaskTimeoutError(uuid, timeout)
                yield step
        finally:
            aclose = getattr(steps, "aclose", None)
            if aclose is not None:  # releases a live follow (Storage.steps) at once
                with anyio.CancelScope(shield=True):
                    await aclose()

    @_loop_only
    async def cancel(self, uuid: str, reason: str = "cancelled") -> AsyncTask | None:
        """Cancel a task: a queued one never runs (a rate token it held is given back), a
        running one on this worker is cancelled now (on another worker, at its next lease
        renewal). Returns the record.

        A workflow member's workflow is told it ended (it fails, as the member's failure
        would): a queued member's message is dropped, so no worker would tell it. A workflow's
        own record is cancelled as by :meth:`cancel_workflow`, its members with it.

        ``qtasks_task_cancelled`` fires here, in this app, when this call cancelled a task no
        worker ran (its record was ``new`` or ``retry``); a running one's worker fires it."""
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        storage = self.storage
        prior: TaskStatus | None = None  # unknown without CancelFrom
        if _cancels_from(storage):
            done = await cast(CancelFrom, storage).cancel_from(uuid, reason)  # _cancels_from
            if done is None:
                return None
            record, prior = done
        else:
            cancelled = await storage.cancel(uuid, reason)
            if cancelled is None:
                return None
            record = cancelled
        if record.status is TaskStatus.CANCEL:
            dropped = await self.broker.cancel(uuid)
            if dropped:  # dropped unstarted: its rate token is free
                await flow.dropped(self, record)
            self.worker.cancel_local(uuid, reason)
            if record.task_name == WORKFLOW_TASK:
                await workflows.cancel(self, uuid, reason)  # its gated members too
            elif record.workflow:
                # ``again``: a repeated cancel, or the member's worker refused its result
                # first, may have opened the error gate already; it is not published twice.
                await workflows.member_ended(self, record, again=True)
            # Once across processes: a worker that holds the task unstarted finds its record
            # final when it begins it and drops it without a word (qtasks.worker); one that
            # began it (``process``) fires the hook when it settles or drops it.
            queued = dropped if prior is None else prior in (TaskStatus.NEW, TaskStatus.RETRY)
            if queued and record.task_name != WORKFLOW_TASK:
                await self.hooks.notify(
                    "qtasks_task_cancelled",
                    app=self,
                    record=record,
                    reason=record.cancel_reason or reason,
                )
        return self._bind(record)

    @_loop_only
    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The broker's dead letters (oldest first), each with the reason it was given up."""
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        return await self.broker.dead_letters(limit)

    @_loop_only
    async def requeue_dead_letters(
        self, ids: list[str] | None = None, *, force: bool = False
    ) -> int:
        """Put dead letters back in the queue (all when ``ids`` is None) and reset their
        records to ``new`` (their fencing token kept; the last run's result, error, steps,
        ``worker`` and ``started_at`` cleared) so that a worker runs them again.
        Returns how many.

        A dead letter whose task record says ``success`` (a late result came in, or the task
        was run and settled by other means) is left in place with a warning, so a stored
        result is never reset and its task run again by accident; ``force=True`` requeues it
        all the same."""
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        letters = await self.broker.dead_letters(limit=1_000_000)
        chosen = [d for d in letters if ids is None or d.id in ids]
        requeue: list[str] = []
        for letter in chosen:
            record = await self.storage.get(letter.id)
            if record is not None and record.status is TaskStatus.SUCCESS and not force:
                log.warning(
                    "dead letter %s not requeued: its task already succeeded (force=True "
                    "runs it again)",
                    letter.id,
                )
                continue
            if record is not None and record.status.final:
                # Its token stays (``dead-letter`` when its delivery limit ended it): the
                # message's last holder, whose lease ran out, may still settle late, and an
                # empty token would let its result or error end the task before it runs again.
                record.status, record.error = TaskStatus.NEW, None
                record.returning, record.steps = None, 0  # add() drops the old steps
                # Queued again: nothing of the lost run (a queued task that looked started).
                record.worker = record.started_at = record.traceback = None
                record.cancel_reason = None
                record.updated_at = time.time()
                await self.storage.add(record)  # add() replaces: a deliberate reset
            requeue.append(letter.id)
        if not requeue:
            return 0
        return await self.broker.requeue_dead_letters(requeue)

    @_loop_only
    async def config_get(self, namespace: str, key: str, default: Any = None) -> Any:
        """Read a cluster-wide value from the GlobalConfig (``default`` when missing)."""
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        value = await self.global_config.get(namespace, key, default)
        return await self.hooks.transform(
            "qtasks_global_config_got",
            "value",
            app=self,
            namespace=namespace,
            key=key,
            value=value,
        )

    @_loop_only
    async def config_set(self, namespace: str, key: str, value: Any) -> None:
        """Write a cluster-wide value to the GlobalConfig (``qtasks_global_config_write`` may
        replace the value first)."""
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        if "qtasks_global_config_write" in self.hooks.active:
            value = await self.hooks.transform(
                "qtasks_global_config_write",
                "value",
                app=self,
                namespace=namespace,
                key=key,
                value=value,
            )
        await self.global_config.set(namespace, key, value)
        await self.hooks.notify(
            "qtasks_global_config_set", app=self, namespace=namespace, key=key, value=value
        )

    @_loop_only
    async def inspect(self) -> dict[str, Any]:
        """What ``qtasks inspect`` shows (JSON-ready); see :func:`qtasks.report.inspect`."""
        if self._stack is None or self._loop is not _running_loop():
            await self.start()
        return await report.inspect(self)

    @_loop_only
    async def ping(self, server: bool = True) -> bool:
        """QTasks' health check; see :func:`qtasks.compat.admin.ping`."""
        from qtasks.compat.admin import ping

        return await ping(self, server)

    @_loop_only
    async def flush_all(self) -> dict[str, int]:
        """Delete everything this app's components hold (guarded); see
        :func:`qtasks.compat.admin.flush_all`."""
        from qtasks.compat.admin import flush_all

        return await flush_all(self)

    def require_started(self) -> None:
        """Raise :class:`~qtasks.errors.ComponentNotStartedError` unless the app is started."""
        if self._stack is None:
            raise ComponentNotStartedError(f"app {self.name!r} is not started")


_CANCELS_FROM: dict[type, bool] = {}
""":func:`_cancels_from` by storage class: decided once per class, not at every cancel
(not kept for a wrapper forwarding with ``__getattr__``: it answers as what it wraps)."""


def _cancels_from(storage: object) -> bool:
    """Whether ``app.cancel`` calls ``storage.cancel_from``: a :class:`CancelFrom` storage
    that does not override ``cancel`` below the class giving it ``cancel_from`` (a subclass
    of a built-in storage auditing its cancels keeps its override called; the canceller then
    fires ``qtasks_task_cancelled`` when the broker dropped the message unstarted)."""
    kind = type(storage)
    known = _CANCELS_FROM.get(kind)
    if known is None:
        known = provides(storage, CancelFrom) and not plain_overridden(
            kind, "cancel", "cancel_from"
        )
        if not forwards(kind):
            _CANCELS_FROM[kind] = known
    return known
