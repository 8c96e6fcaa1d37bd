"""The default task executor: injection, middlewares, the call, generators, result encoding."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from qtasks import steps
from qtasks.errors import (
    LeaseLostError,
    SerializationError,
    TaskCancelledError,
    TaskExitError,
    TaskInterruptError,
    TaskMaxTimeError,
)
from qtasks.messages import Message
from qtasks.middleware import chain_of
from qtasks.record import TaskRecord
from qtasks.sync_gen import SyncGenerator
from qtasks.task import TaskDef, TaskKind
from qtasks.threads import ThreadCall, in_thread
from qtasks.workflows import runtime as workflows
from qtasks.workflows.plan import INPUT

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

_ENDED = "qtasks.context.ended"  # run.state key of the event ctx.sleep waits on

CallNext = Callable[[], Awaitable[Any]]
Middleware = Callable[["TaskRun", CallNext], Awaitable[Any]]
"""A task middleware: ``async def mw(run, call_next) -> result``. It may run code around
``await call_next()``, see its result or exception, replace the result, or return without
calling it (short-circuit)."""


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception in ``group``, nested groups included."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


@dataclass(slots=True)
class TaskRun:
    """Everything about one execution of one task, passed to the executor and middlewares."""

    app: AsyncQueueTasks
    task: TaskDef[..., Any]
    message: Message
    record: TaskRecord
    cancel_scope: anyio.CancelScope | None = None
    """The scope the task's code runs in. The worker shares one scope between the tasks a
    runner runs in turn (a scope per task costs more than a no-op task), so never cancel it
    directly: call :meth:`cancel`, which touches it only while this run is executing."""
    cancel_reason: str | None = None
    delivery: Any = None
    """The broker delivery being executed (``None`` when run inline)."""
    lease_lost: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    """Free space for plugins (e.g. the Depends exit stack of this run)."""
    executing: bool = False
    """True while the executor runs the task (a cancel is delivered at once)."""
    cancel_requested: bool = False
    """Set by :meth:`cancel`, also before the run started (it then never starts)."""
    closers: list[Callable[[], Awaitable[Any]]] | None = None
    """What :meth:`on_close` registered, until the worker awaits it."""
    max_time_scope: anyio.CancelScope | None = None
    """The scope of the task's ``max_time``, if it has one (so that a thread given up on can
    tell ``max_time`` from the other reasons)."""
    abandoned: ThreadCall | None = None
    """The call of this sync task whose thread ``max_time`` or a cancel gave up on while it
    still runs (see :mod:`qtasks.threads`): its concurrency slot is held, and its teardown
    waits, until it returns."""
    step_input: tuple[Any] | None = None
    """A workflow step's input, as ``(value,)``, when the worker read it before the run (a
    concurrency key of it): the task is given this value, not a second read of its
    predecessors' results. ``None``: not read yet."""
    ended_by: BaseException | None = None
    """How the run's code ended, for what :meth:`on_close` registered: ``None`` when it
    returned; else the exception it raised, a :class:`~qtasks.errors.TaskCancelledError` when
    it was cancelled (a worker's shutdown too), a :class:`~qtasks.errors.LeaseLostError`
    when its lease was lost (its result is dropped and the task runs again)."""

    def on_close(self, close: Callable[[], Awaitable[Any]]) -> None:
        """Await ``close()`` once this run's code has ended, on every path (success, error,
        cancel, a lost lease, a shutdown hand-back), before ``qtasks_executor_closed`` is
        notified: the teardown of something made for this run alone (task-scoped
        ``Depends``, which are given :attr:`ended_by`). For a sync call given up on whose
        thread still runs (:attr:`abandoned`), once the thread returns, or at the worker's
        stop (:mod:`qtasks.teardowns`). The last registered is awaited first; an exception is
        logged and swallowed, as a hook's is."""
        if self.closers is None:
            self.closers = []
        self.closers.append(close)

    def cancel(self, reason: str | None = None) -> None:
        """Cancel this run: its code gets the cancellation at its next ``await``, or as soon as
        it starts when it has not started yet. ``reason`` is kept as ``cancel_reason``."""
        if reason is not None:
            self.cancel_reason = reason
        self.cancel_requested = True
        if self.executing and self.cancel_scope is not None:
            self.cancel_scope.cancel()


class TaskExecutor:
    """Runs one task call; see :class:`qtasks.components.TaskExecutor`."""

    async def execute(self, run: TaskRun) -> Any:
        app, task = run.app, run.task
        chain = chain_of(app, task)
        if "qtasks_executor_middlewares" in app.hooks.active:
            chain = await app.hooks.transform(
                "qtasks_executor_middlewares",
                "middlewares",
                app=app,
                task=task,
                record=run.record,
                middlewares=chain,
            )

        if chain:

            async def innermost() -> Any:
                return await self.call(run)

            call_next: CallNext = innermost
            for middleware in reversed(chain):
                call_next = partial(middleware, run, call_next)
            result = await call_next()
        else:
            result = await self.call(run)
        if "qtasks_executor_result" in app.hooks.active:
            result = await app.hooks.transform(
                "qtasks_executor_result", "result", app=app, record=run.record, result=result
            )
        if "qtasks_executor_execute_after" in app.hooks.active:
            await app.hooks.notify(
                "qtasks_executor_execute_after", app=app, record=run.record, result=result
            )
        return self.encode(run, result)

    async def call(self, run: TaskRun) -> Any:
        """Build the arguments and run the function (with ``max_time``)."""
        app, task, record = run.app, run.task, run.record
        args, kwargs = await self.arguments(run)
        if "qtasks_executor_execute_before" in app.hooks.active:
            await app.hooks.notify("qtasks_executor_execute_before", app=app, record=record)
        max_time = task.options.max_time
        if max_time is None:
            return await self.run_function(run, args, kwargs)
        with anyio.move_on_after(max_time) as scope:
            run.max_time_scope = scope
            return await self.run_function(run, args, kwargs)
        if scope.cancelled_caught:
            await app.hooks.notify(
                "qtasks_task_timed_out", app=app, record=record, max_time=max_time
            )
            raise TaskMaxTimeError(task.name, max_time)
        raise AssertionError("unreachable")  # pragma: no cover

    async def arguments(self, run: TaskRun) -> tuple[list[Any], dict[str, Any]]:
        """What the task is called with: the message's arguments, through the
        ``qtasks_executor_args`` transform when a plugin implements it; then a workflow
        step's input as its first argument; then its ``Depends`` and State parameters
        (:class:`~qtasks.depends.InjectPlugin`); an ``echo`` task's handle first. The last
        three are the core's own steps, not hooks: a task that needs none of them pays a
        header lookup and a dictionary lookup."""
        app, task, message = run.app, run.task, run.message
        args, kwargs = list(message.args), dict(message.kwargs)
        hooks = app.hooks
        if "qtasks_executor_args" in hooks.active:
            new_args, new_kwargs = await hooks.transform(
                "qtasks_executor_args",
                ("args", "kwargs"),
                app=app,
                task=task,
                record=run.record,
                args=args,
                kwargs=kwargs,
                run=run,
            )
            # Copied only when a plugin returned its own (most tasks inject nothing).
            if new_args is not args:
                args = list(new_args)
            if new_kwargs is not kwargs:
                kwargs = dict(new_kwargs)
        headers = message.headers
        if headers and INPUT in headers:
            args = await workflows.with_input(run, args)
        injected = app.injector.arguments(args, kwargs, run)
        if injected is not None:
            args, kwargs = await injected
        if task.options.echo:
            from qtasks.context import make_handle

            args.insert(0, make_handle(run))
        return args, kwargs

    async def run_function(self, run: TaskRun, args: list[Any], kwargs: dict[str, Any]) -> Any:
        try:
            return await self._run_function(run, args, kwargs)
        except SystemExit as exc:  # the task's, not a stop of the worker (signals don't raise it)
            raise TaskExitError(run.task.name, repr(exc.code)) from exc
        except KeyboardInterrupt as exc:
            # Python delivers Ctrl-C to the main thread only: on another (the sync app's loop)
            # the task's code raised it, and it would end the loop. A sync task's is turned
            # into the error in its worker thread (ThreadCall).
            if threading.current_thread() is threading.main_thread():
                raise
            raise TaskInterruptError(run.task.name) from exc
        except BaseExceptionGroup as group:
            # ctx.cancel() in a task group's child: the task is cancelled, as without the group.
            # (A child's sys.exit() is not caught: asyncio raises it out of the event loop.)
            cancels, rest = group.split(TaskCancelledError)
            if cancels is None or rest is not None:
                raise
            raise _first(cancels) from None
        finally:
            # Wakes a sync task's ctx.sleep in its (possibly abandoned) worker thread.
            ended = run.state.get(_ENDED)
            if ended is not None:
                ended.set()

    async def _run_function(self, run: TaskRun, args: list[Any], kwargs: dict[str, Any]) -> Any:
        task = run.task
        func = task.func
        kind = task.kind
        if kind is TaskKind.ASYNC:
            return await func(*args, **kwargs)
        if kind is TaskKind.SYNC:
            return await in_thread(run, func, args, kwargs)
        if kind is TaskKind.ASYNC_GEN:
            return await self._async_gen(run, func(*args, **kwargs))
        return await self._sync_gen(run, args, kwargs)

    async def _handle_step(self, run: TaskRun, value: Any) -> Any:
        handler = run.task.options.generate_handler
        if handler is not None:
            value = handler(value)
            if inspect.isawaitable(value):
                value = await value
        app = run.app
        delivery = run.delivery
        try:
            index = await steps.add_step(
                app.storage,
                run.record.uuid,
                self.storable(run, value, step=True),
                None if delivery is None else delivery.token,
            )
        except LeaseLostError:
            run.lease_lost = True  # the settle drops the result and leaves the message alone
            raise
        # The worker saves run.record whole at the end: keep its step count current.
        run.record.steps = index + 1
        await app.hooks.notify("qtasks_executor_yielded", app=app, record=run.record, value=value)
        return value

    async def _async_gen(self, run: TaskRun, gen: Any) -> Any:
        # Without a handler nothing is sent back, so ``yield from iterable`` works.
        has_handler = run.task.options.generate_handler is not None
        results: list[Any] = []
        sent: Any = None
        try:
            while True:
                try:
                    value = await gen.asend(sent)
                except StopAsyncIteration:
                    return results
                handled = await self._handle_step(run, value)
                results.append(handled)
                sent = handled if has_handler else None
        finally:
            # The generator's own cleanup runs even when the task was cancelled (bounded, so a
            # stuck finally cannot hold the worker forever).
            with anyio.move_on_after(run.app.config.shutdown_grace, shield=True):
                await gen.aclose()

    async def _sync_gen(self, run: TaskRun, args: list[Any], kwargs: dict[str, Any]) -> Any:
        # One worker thread for its creation, every step and its close (see qtasks.sync_gen).
        gen = SyncGenerator(run, partial(run.task.func, *args, **kwargs))
        return await gen.drive(partial(self._handle_step, run))

    def encode(self, run: TaskRun, result: Any) -> Any:
        """Apply the task's ``decode`` encoder; check the value can be stored."""
        decode = run.task.options.decode
        if decode is not None:
            result = decode(result)
        return self.storable(run, result)

    def storable(self, run: TaskRun, result: Any, *, step: bool = False) -> Any:
        """Return ``result`` (a yielded value if ``step``) if the app's serializer can store
        it, else raise, naming the option that converts it."""
        kind = type(result)
        if result is None or kind is str or kind is bool or kind is int:
            return result  # every serializer stores these: skip a trial encoding
        try:
            run.app.codec.serializer.dumps(result)
        except SerializationError as exc:
            what, option = ("yielded", "generate_handler") if step else ("returned", "decode")
            raise SerializationError(
                f"task {run.task.name!r} {what} a value that cannot be stored"
                f"{' as a step' if step else ''} ({type(result).__name__}): {exc}; pass "
                f"{option}= to convert it"
            ) from exc
        return result
