"""The test harness: swap an app's components for in-memory ones, run tasks inline or with an
in-process worker, record what was enqueued, control time, and restore everything afterwards.

:class:`Harness` is the async API (for an :class:`~qtasks.AsyncQueueTasks` used from async
tests); :class:`~qtasks_testing.sync_harness.SyncHarness` is its blocking facade, and
:mod:`qtasks_testing.records` what it records. The unittest cases and the pytest fixtures are
thin layers over these.

Over ~1,000 lines: one class, whose two modes share the component swap, the clock and the
bookkeeping of the tasks it holds back and moves the clock for (what a test adds to the app is
taken off by :mod:`qtasks_testing.isolation`; which call of the test a task belongs to is kept
by :mod:`qtasks_testing.calls`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, overload

import anyio

from qtasks.app import AsyncQueueTasks
from qtasks.clock import Clock
from qtasks.components import Delivery, FlowControl, provides
from qtasks.errors import QTasksError, TaskFailedError, TaskNotFoundError, TaskTimeoutError
from qtasks.memory import MemoryBroker, MemoryGlobalConfig, MemoryStorage
from qtasks.plugins import hookimpl
from qtasks.record import TaskRecord, TaskStatus
from qtasks.routers import pin_app
from qtasks.state import StateRegistry
from qtasks.sync import QueueTasks
from qtasks.task import AsyncTask
from qtasks.worker import QueueWorker
from qtasks.workflows import Workflow
from qtasks_testing.calls import RUNNING, Call, Running, Session
from qtasks_testing.clock import FakeClock
from qtasks_testing.isolation import Additions
from qtasks_testing.records import (
    CHILD_NOTE,
    EnqueuedLog,
    EnqueuedTask,
    as_received,
    describe,
    failure_message,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Generator

    from qtasks.workflows.canvas import Node, Signature

log = logging.getLogger("qtasks.testing")

Mode = Literal["inline", "worker"]
COMPONENTS = ("broker", "storage", "global_config")
WRAPPED = ("enqueue", "add_tasks", "run_workflow", "wait", "wait_workflow")
"""The app's methods the harness stands in for while installed."""


class HarnessError(QTasksError):
    """The harness was used wrongly (app already started, unknown component, ...)."""


class HarnessTimeoutError(HarnessError, TaskTimeoutError):
    """A task run inline did not finish within the harness's ``timeout``; it was cancelled.
    Also a :class:`~qtasks.errors.TaskTimeoutError` (what waiting for a task too long raises),
    and raised at once for ``add_task(delay=..., timeout=...)`` when the delay is longer than
    the timeout."""

    def __init__(self, uuid: str, timeout: float, text: str) -> None:
        TaskTimeoutError.__init__(self, uuid, timeout)
        self.args = (text,)


def _edits(a: str, b: str) -> int:
    """How many characters to insert, delete or replace to turn ``a`` into ``b``."""
    row = list(range(len(b) + 1))
    for i, char in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, other in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (char != other))
    return row[-1]


class _InlinePlugin:
    """Records what the app enqueues. Zeroes retry delays in inline mode: the retry decision is
    the task's own, the backoff is skipped so that a test does not sleep through it. In worker
    mode the backoff is real; a task that its rate limit or concurrency limit holds back is
    handed back to the broker for later in both modes. The plugin tells the harness when a task
    is handed back with a delay, so that it can move the clock through the wait."""

    name = "qtasks_testing.inline"

    def __init__(self, harness: Harness) -> None:
        self._harness = harness

    @hookimpl
    def qtasks_storage_added(self, record: TaskRecord) -> None:
        # Fires for every task the app stores as new: add_task, each task of add_tasks and
        # every member of a workflow (when run_workflow stores it, before its gate opens).
        args, kwargs = self._harness._received(record.args, record.kwargs)
        self._harness._enqueued.append(
            EnqueuedTask(record.uuid, record.task_name, args, kwargs, record.priority, record.eta)
        )

    @hookimpl
    def qtasks_executor_execute_before(self, record: TaskRecord) -> None:
        # A workflow step fed its predecessors' result was stored (and recorded above) with a
        # placeholder in that argument's place: its input is in its record once it starts.
        if record.workflow is not None:
            self._harness._started_with(record)

    @hookimpl(wrapper=True)
    def qtasks_task_retry_delay(self) -> Generator[None, float | None, float | None]:
        delay = yield
        if delay is not None and self._harness.mode == "inline":
            return 0.0
        return delay

    @hookimpl
    def qtasks_broker_requeued(self, delivery: Delivery, delay: float | None) -> None:
        # Fired once a retry's record is saved and its message requeued with its backoff, or
        # once the flow gate handed a message back (rate or concurrency limit); the broker
        # measures the delay on the harness's clock.
        if not delay:
            return
        harness = self._harness
        harness._requeued[delivery.id] = harness.clock.time() + delay
        for progress in harness._progress:
            progress.set()


class Harness(EnqueuedLog):
    """Test an :class:`~qtasks.AsyncQueueTasks` without servers or a separate worker.

    ``await harness.start()`` replaces the app's broker, storage and global config with fresh
    in-memory ones (except those named in ``keep``) and its worker-scoped State for an empty
    one, starts the app and, in ``worker`` mode, a worker in this event loop; ``await
    harness.close()`` stops them and puts the originals back. The app object is the same one
    the code under test imports.

    Modes: ``inline`` runs each task the moment it is added, through the real worker code
    (plugins, ``Depends``, ``State``, echo/ctx, retries without backoff, generators), so
    ``add_task`` returns the final record; delayed tasks wait for :meth:`advance_time` or
    :meth:`run_pending` (``add_task(delay=..., timeout=...)`` moves the clock to the task when
    the delay is within the timeout). Each call ends within ``timeout`` seconds: a task still
    running then is cancelled, settled (its record ends ``cancel``, no later call runs it
    again) and :class:`HarnessTimeoutError` names it. Calls made at once
    (``asyncio.gather`` of two ``add_task``, code under test enqueuing from two threads) run
    one after the other, each with its own timeout and its own failures: inline mode runs one
    task at a time (a child within its parent), each call takes whatever task the broker hands
    it next, and two calls taking turns would run, and report, each other's tasks. A child is
    a task enqueued from the code of a task the harness runs (see :mod:`qtasks_testing.calls`),
    not one enqueued while it runs. ``worker`` runs a
    real worker concurrently, for code that depends on concurrency; use :meth:`wait` or
    :meth:`run_pending` to let it catch up (retries keep their backoff, which
    :meth:`run_pending` moves the clock through). Closing the harness cancels tasks still
    running at once.

    The app reads :attr:`clock` too while the harness is installed (new tasks' times,
    ``expires``, rate limits): a task its rate or concurrency limit holds back makes the harness
    move the clock to its turn, in both modes.

    With ``raise_task_errors`` (the default) a task that ends in ``error`` raises
    :class:`~qtasks.errors.TaskFailedError` with the task's traceback where the harness hands out
    its record (``add_task`` in inline mode, :meth:`wait`, :meth:`run_pending`). A child (a
    task enqueued while another runs, in inline mode) runs at once too, but as in production
    its failure never raises into the task that enqueued it: the call of the test that ran
    them raises it when it returns.
    """

    def __init__(
        self,
        app: AsyncQueueTasks,
        *,
        mode: Mode = "inline",
        keep: Collection[str] = (),
        raise_task_errors: bool = True,
        clock: FakeClock | None = None,
        timeout: float = 10.0,
    ) -> None:
        if isinstance(app, QueueTasks):
            raise HarnessError(
                "Harness drives an AsyncQueueTasks; for a QueueTasks app use SyncHarness "
                "(SyncTestCase, or the `qtasks` pytest fixture)"
            )
        if mode not in ("inline", "worker"):
            raise HarnessError(f"mode must be 'inline' or 'worker', not {mode!r}")
        unknown = set(keep) - set(COMPONENTS)
        if unknown:
            raise HarnessError(f"keep names unknown components {sorted(unknown)}: {COMPONENTS}")
        if not (isinstance(timeout, int | float) and 0 < timeout < math.inf):
            raise HarnessError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if not isinstance(raise_task_errors, bool):
            # "no" or 0 from a marker would read as true (or false) without a word.
            raise HarnessError(
                f"raise_task_errors must be True or False, not {raise_task_errors!r}"
            )
        self.app = app
        self.mode: Mode = mode
        self.keep = frozenset(keep)
        self.raise_task_errors = raise_task_errors
        self.clock = clock or FakeClock()
        self._moved: anyio.Event | None = None
        """Set when the test moves the clock (and replaced): what :meth:`_wait_clock` waits
        on."""
        self.timeout = timeout
        """Seconds a call of the harness may take: inline, a task still running then is
        cancelled for good (its record ends ``cancel``); with a worker, :meth:`wait` and
        :meth:`run_pending` stop waiting for it."""
        self._enqueued: list[EnqueuedTask] = []
        self._handed_out: set[str] = set()
        self._saved: dict[str, Any] | None = None
        self._saved_states: StateRegistry | None = None
        self._saved_limiter: anyio.CapacityLimiter | None = None
        self._saved_clock: Clock | None = None
        self._plugin = _InlinePlugin(self)
        self._worker = QueueWorker()
        self._stop_serving: anyio.Event | None = None
        self._serving: asyncio.Task[None] | None = None
        self._requeued: dict[str, float] = {}
        """uuid -> due time on the clock of tasks the worker handed back to the broker with a
        delay: a retry backoff (worker mode), or held back by a rate or concurrency limit."""
        self._session: Session | None = None
        self._lock: anyio.Lock | None = None
        """Inline: held by the call of the test that runs tasks now (see the class)."""
        self._unpin: Callable[[], None] | None = None
        self._additions: Additions | None = None
        self._progress: set[anyio.Event] = set()
        """Events of waiters in :meth:`_catch_up`, set when a task is handed back with a delay
        (a final save wakes them through the storage)."""

    # --- lifecycle ------------------------------------------------------------------------

    def install(self) -> None:
        """Swap the components, the worker-scoped State and the limiter of sync tasks' threads
        for fresh ones and wrap the app's enqueue methods (no event loop needed)."""
        app = self.app
        if self._saved is not None:
            raise HarnessError("the harness is already installed")
        if "global_config" in self.keep:
            self._refuse_a_foreign_rate_clock()
        if any(wrapped in vars(app) for wrapped in WRAPPED):
            raise HarnessError(
                f"app {app.name!r} already has a harness installed: a test uses one harness "
                "fixture (qtasks or qtasks_worker, aqtasks or aqtasks_worker; "
                "@pytest.mark.qtasks(mode=...) picks the mode), and harnesses of one app do "
                "not nest"
            )
        if app.started:
            raise HarnessError(
                f"app {app.name!r} is already started: the harness must swap its components "
                "before first use (something enqueued at import time, or a previous test did not "
                "close its harness)"
            )
        self._saved = {kind: getattr(app, kind) for kind in COMPONENTS}
        self._session = Session()
        # Tasks, plugins, middlewares and event handlers the test adds are taken off again.
        self._additions = Additions(app)
        # Worker-scoped State lives with the app, not in a component: a new worker starts
        # without it, and so does each harness session.
        self._saved_states = app.injector.states
        app.injector.states = StateRegistry()
        # A sync task given up on at the timeout keeps its thread's token of the limiter until
        # the thread returns (qtasks.threads): kept in the app's own, ten such tests would
        # leave every later test of the app without threads. Each thread gives its token back
        # to the limiter it took it from, this one, whatever is installed by then.
        self._saved_limiter = app.thread_limiter
        app.thread_limiter = anyio.CapacityLimiter(app.thread_limiter.total_tokens)
        # New tasks' times and the flow gate's decisions (expires, rate limits) follow our
        # clock. The flow gate's own short waits for a rate token move it, as the harness
        # does for the longer holds it hands back to the broker: no real sleep. A task's
        # ctx.sleep ends when the test moves it past its end (advance_time).
        self._saved_clock = app.time_source
        app.time_source = Clock(self.clock.time, self.advance_to, self._wait_clock)
        replacements: dict[str, Any] = {
            "broker": MemoryBroker(clock=self.clock),
            "storage": MemoryStorage(clock=self.clock),
            "global_config": MemoryGlobalConfig(clock=self.clock.time),
        }
        for kind in COMPONENTS:
            if kind not in self.keep:
                setattr(app, kind, replacements[kind])
        if isinstance(app.worker, QueueWorker):
            self._worker = app.worker
        app.add_plugin(self._plugin)
        # The app's shared and router tasks enqueue through it, not through an app an earlier
        # test (or a fixture) built after it, which bound them last.
        self._unpin = pin_app(app)
        # Restored in uninstall(). add_tasks and run_workflow do not go through enqueue.
        app.enqueue = self._enqueue  # type: ignore[method-assign]
        app.add_tasks = self._add_tasks  # type: ignore[method-assign]
        app.run_workflow = self._run_workflow  # type: ignore[method-assign]
        # A task's or workflow's wait_result goes through these.
        app.wait = self._app_wait  # type: ignore[method-assign]
        app.wait_workflow = self._app_wait_workflow  # type: ignore[method-assign]

    def _refuse_a_foreign_rate_clock(self) -> None:
        """Rate limits kept on another clock than the harness's (a Redis global config times
        them by the server) cannot work: the harness moves its clock to each held task's turn,
        the global config still holds it back, and the clock runs away. Refused up front."""
        kept = self.app.global_config
        if not provides(kept, FlowControl):
            return
        if isinstance(kept, MemoryGlobalConfig) and kept.clock in (self.clock, self.clock.time):
            return
        limited = sorted(
            name
            for name, task in self.app.tasks.items()
            if task.flow is not None and task.flow.rate is not None
        )
        if limited:
            raise HarnessError(
                f"the kept global config {kept!r} measures rate limits on a clock of its own "
                "(Redis: the server's), which the harness's clock does not move, so the "
                f"rate-limited tasks {limited} cannot run under it; do not keep "
                "'global_config' (the in-memory one follows the harness's clock), or build a "
                "MemoryGlobalConfig(clock=clock.time) on the FakeClock given to the harness"
            )

    def uninstall(self) -> None:
        """Put the original components, State, thread limiter and enqueue methods back."""
        if self._saved is None:
            return
        app = self.app
        for wrapped in WRAPPED:
            vars(app).pop(wrapped, None)
        app.hooks.unregister(self._plugin)
        # Plugins let go of what the test attached through them (a timer built in the test),
        # those the test added included, before these are taken off.
        for pending in app.hooks.notify_sync("qtasks_app_restored", app=app):
            if inspect.iscoroutine(pending):
                pending.close()  # the hook is sync (no event loop here): documented so
        additions, self._additions = self._additions, None
        if additions is not None:
            additions.undo()
        unpin, self._unpin = self._unpin, None
        if unpin is not None:
            unpin()
        for kind, component in self._saved.items():
            setattr(app, kind, component)
        if self._saved_states is not None:
            app.injector.states, self._saved_states = self._saved_states, None
        if self._saved_limiter is not None:
            app.thread_limiter, self._saved_limiter = self._saved_limiter, None
        if self._saved_clock is not None:
            app.time_source, self._saved_clock = self._saved_clock, None
        if self._session is not None:
            self._session.installed = False
        self._saved = None

    async def start(self) -> None:
        """Install, start the components and, in worker mode, a worker."""
        self.install()
        try:
            await self.app.start()
            if self.mode == "worker":
                await self._start_serving()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the worker and the components, then restore the app."""
        try:
            await self._stop_serving_task()
            await self.app.aclose()
        finally:
            self.uninstall()

    async def __aenter__(self) -> Harness:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _start_serving(self) -> None:
        # A worker is a task group, which must be exited by the task that entered it; test
        # frameworks run set-up and tear-down in different tasks, so a host task owns it.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise HarnessError(
                "worker mode needs asyncio here; on other loops use `async with harness.serving()`"
            ) from None
        started: asyncio.Future[None] = loop.create_future()
        self._stop_serving = anyio.Event()

        async def host() -> None:
            try:
                async with self.serving():
                    started.set_result(None)
                    assert self._stop_serving is not None
                    await self._stop_serving.wait()
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                raise

        self._serving = loop.create_task(host(), name="qtasks_testing worker")
        await started

    async def _stop_serving_task(self) -> None:
        if self._serving is None:
            return
        serving, self._serving = self._serving, None
        assert self._stop_serving is not None
        self._stop_serving.set()
        await serving

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Harness]:
        """Run a worker for the block (in the current task).

        Leaving the block cancels tasks still running at once (``shutdown_grace`` is 0 while
        the harness serves): a test that ends must not wait for them."""
        app = self.app
        config = app.config
        app.config = config.merged(shutdown_grace=0.0)
        try:
            async with app:
                yield self
        finally:
            app.config = config

    # --- enqueue --------------------------------------------------------------------------

    async def _enqueue(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncTask:
        # Stands in for app.enqueue (add_task and TaskDef.add_task go through it): enqueue for
        # real (the plugin records it), then run it (inline) or honour ``timeout`` ourselves,
        # since the app's own wait would wait for a worker that inline mode does not have.
        parent = self._parent()
        if self.mode != "inline":
            task = await type(self.app).enqueue(self.app, task_name, args, kwargs, **options)
            if timeout is not None:
                return await type(self.app).wait(self.app, task.uuid, timeout)
            return task
        async with self._call("add_task", parent) as call:
            task = await type(self.app).enqueue(self.app, task_name, args, kwargs, **options)
            if call is not parent:
                call.what = f"add_task of {self._describe_uuid(task.uuid)}"
            delay = 0.0
            if self._delayed(task):
                if timeout is None:
                    return task
                delay = await self._reach_in_time(task, timeout)
            record = await self._run_within(call, task.uuid, timeout, delay)
            return await self._hand_out(call, record, parent)

    async def _run_within(
        self, call: Call, uuid: str, timeout: float | None, delay: float
    ) -> TaskRecord:
        """Inline: run ``uuid`` to its end; with ``add_task(timeout=...)``, within what the
        ``delay`` (moved through on the clock) left of it, as production waits for it. Past
        the timeout the task is cancelled (there is no worker to run it on meanwhile) and this
        raises what production raises then, a :class:`~qtasks.errors.TaskTimeoutError`
        (:class:`HarnessTimeoutError`)."""
        if timeout is None:
            return await self._run_until_final(call, uuid)
        with anyio.move_on_after(timeout - delay) as scope:
            return await self._run_until_final(call, uuid)
        assert scope.cancelled_caught
        running, call.cancelled = call.cancelled, []
        record = await self.app.storage.get(uuid)
        left = "gone" if record is None else f"left {record.status.value!r}"
        text = (
            f"task {self._describe_uuid(uuid)} did not finish within add_task's timeout of "
            f"{timeout:g} s{f' (delayed {delay:g} s)' if delay else ''}: add_task raises "
            "TaskTimeoutError, as in production. There the worker runs the task on; inline "
            "there is no worker to, so it was cancelled (the thread of a sync task is "
            "abandoned and runs on)"
        )
        if running and running[-1] != uuid:
            text += f" with its child {self._describe_uuid(running[-1])}, which was running"
        text += f", and is {left}: a later call (run_pending) runs it again from the start"
        raise HarnessTimeoutError(uuid, timeout, text)

    async def _reach_in_time(self, task: TaskRecord, timeout: float) -> float:
        """Inline ``add_task(delay=..., timeout=...)``: in production the call returns once the
        worker ran the task at its eta, if that comes within ``timeout``. Here the clock is
        moved to the eta (the task then runs at once, within what is left of the timeout); an
        eta beyond the timeout raises at once what production raises when the timeout runs out
        (the task stays enqueued). Returns the seconds the clock moved."""
        assert task.eta is not None
        wait = task.eta - self.clock.time()
        if wait > timeout:
            raise HarnessTimeoutError(
                task.uuid,
                timeout,
                f"task {self._describe_uuid(task.uuid)} is delayed {wait:g} s, longer than "
                f"add_task's timeout of {timeout:g} s, so it cannot finish in time; it stays "
                "enqueued: call advance_time() or run_pending(include_delayed=True) to let it run",
            )
        await self.advance_to(task.eta)
        return wait

    async def _add_tasks(self, signatures: Iterable[Signature]) -> list[AsyncTask]:
        # Stands in for app.add_tasks: inline, the tasks run before it returns (as add_task's).
        parent = self._parent()
        if self.mode != "inline":
            return await type(self.app).add_tasks(self.app, signatures)
        async with self._call("add_tasks", parent) as call:
            mark = len(self._enqueued)
            tasks = await type(self.app).add_tasks(self.app, signatures)
            await self._ran_since(call, mark, parent)
            return [await self._bound(task) for task in tasks]

    async def _app_wait(self, uuid: str, timeout: float | None) -> AsyncTask:
        # Stands in for app.wait (task.wait_result): inline, nothing would ever run a task
        # delayed into the future of the clock, so waiting for it without a timeout could
        # only hang (with one, it times out, as the code under test may expect).
        if self.mode == "inline" and timeout is None:
            record = await self.app.storage.get(uuid)
            if record is not None and not record.status.final and self._delayed(record):
                raise self._delayed_error(f"task {self._describe_uuid(uuid)}")
        return await type(self.app).wait(self.app, uuid, timeout)

    async def _app_wait_workflow(self, id: str, timeout: float | None = None) -> Workflow:
        # Stands in for app.wait_workflow (a workflow's wait_result), as _app_wait does.
        if self.mode == "inline" and timeout is None:
            await self._refuse_a_delayed_step(id)
        return await type(self.app).wait_workflow(self.app, id, timeout)

    async def _refuse_a_delayed_step(self, id: str) -> None:
        """Inline: raise when the workflow ``id`` runs on and waits for a delayed step."""
        state = await type(self.app).get_workflow(self.app, id)
        if state is None or state.done:
            return
        for uuid in state.members:
            member = await self.app.storage.get(uuid)
            if member is not None and not member.status.final and self._delayed(member):
                what = f"workflow {id} waits for its step {self._describe_uuid(uuid)}, which"
                raise self._delayed_error(what)

    @staticmethod
    def _delayed_error(what: str) -> HarnessError:
        return HarnessError(
            f"{what} is delayed: inline, it runs only when the clock moves; call "
            "advance_time() or run_pending(include_delayed=True) to let it run (waiting "
            "for it could only hang)"
        )

    async def _run_workflow(self, workflow: Node, *, on_error: Signature | None = None) -> Any:
        # Stands in for app.run_workflow: inline, the workflow runs before it returns (its
        # steps as the worker enqueues them), and its state then is returned.
        parent = self._parent()
        if self.mode != "inline":
            return await type(self.app).run_workflow(self.app, workflow, on_error=on_error)
        async with self._call("run_workflow", parent) as call:
            mark = len(self._enqueued)
            state = await type(self.app).run_workflow(self.app, workflow, on_error=on_error)
            await self._ran_since(call, mark, parent)
            return await type(self.app).get_workflow(self.app, state.id) or state

    async def _ran_since(self, call: Call, mark: int, parent: Call | None) -> None:
        """Inline: run what is due, then hand out the final records of the tasks recorded
        since ``mark`` (to the test, or to the running task that enqueued them)."""
        await self._drain_due(call, include_delayed=False)
        for item in self._enqueued[mark:]:
            if item.uuid in self._handed_out:
                continue
            record = await self.app.storage.get(item.uuid)
            if record is not None and record.status.final:
                await (self._child(call, record) if parent else self._checked(call, record))
        if parent is None:
            self._report(call)

    def _delayed(self, record: TaskRecord) -> bool:
        eta = self._eta(record)
        return eta is not None and eta > self.clock.time()

    def _in_gate(self, record: TaskRecord) -> bool:
        """Whether ``record`` is a workflow step not published yet: it waits for the steps
        before it (in a retry backoff, say), not for the worker. The settle step that opens
        its gate publishes it, so it has a message once they ended."""
        broker = self.app.broker
        return (
            record.workflow is not None
            and record.status is TaskStatus.NEW
            and isinstance(broker, MemoryBroker)
            and not broker.holds(record.uuid)
        )

    def _eta(self, record: TaskRecord) -> float | None:
        """When ``record``'s task is due: its ``eta``, else the in-memory broker's due time of
        its message (a workflow step published with a ``delay`` by the worker that finished
        the step before has no ``eta`` in its record)."""
        if record.eta is not None:
            return record.eta
        broker = self.app.broker
        if isinstance(broker, MemoryBroker) and record.status is TaskStatus.NEW:
            return broker.due(record.uuid)
        return None

    async def _hand_out(self, call: Call, record: TaskRecord, parent: Call | None) -> AsyncTask:
        """The final record of the task a call ran: to the task that enqueued it (``parent``),
        or to the test, raising for what failed."""
        if parent is not None:
            return await self._child(call, record)
        bound = await self._checked(call, record)
        self._report(call)
        return bound

    async def _checked(self, call: Call | None, record: TaskRecord) -> AsyncTask:
        """Hand out a final record to the test: raise for an error (if asked to), else bind
        it."""
        self._handed_out.add(record.uuid)
        if record.status is TaskStatus.ERROR and self.raise_task_errors:
            raise self._failure(record, self._take_unreported(call))
        return await self._bound(record)

    async def _child(self, call: Call, record: TaskRecord) -> AsyncTask:
        """Hand out the final record of a child to the task that enqueued it: never raises
        (``add_task`` does not, in production); a failure is kept for :meth:`_report`."""
        self._handed_out.add(record.uuid)
        if record.status is TaskStatus.ERROR and self.raise_task_errors:
            call.unreported.append(record)
        return await self._bound(record)

    @staticmethod
    def _take_unreported(call: Call | None) -> list[TaskRecord]:
        if call is None:
            return []
        unreported, call.unreported = call.unreported, []
        return unreported

    def _report(self, call: Call | None) -> None:
        """At the end of a call of the test: raise for the children that failed during it."""
        unreported = self._take_unreported(call)
        if unreported:
            raise self._failure(unreported[0], unreported[1:], CHILD_NOTE)

    @staticmethod
    def _failure(
        record: TaskRecord, others: list[TaskRecord], note: str | None = None
    ) -> TaskFailedError:
        text = failure_message(record)
        if note:
            text += "\n\n" + note
        if others:
            names = ", ".join(describe(other) for other in others)
            text += f"\n\nChildren that failed during the same call: {names}"
        return TaskFailedError(record, text)

    async def _bound(self, record: TaskRecord) -> AsyncTask:
        bound = await self.app.get(record.uuid)
        if bound is None:  # expired between the two reads: hand out what we have
            data = {name: getattr(record, name) for name in TaskRecord.__dataclass_fields__}
            return AsyncTask(**data, _client=self.app)
        return bound

    # --- running --------------------------------------------------------------------------

    def _parent(self) -> Call | None:
        """Inline: the call of the task whose code called the app here (the caller is a
        child), or ``None`` for a call of the test. Refuses the call of a task that the
        harness of an earlier test gave up on (its thread ran on after that test ended)."""
        running = RUNNING.get()
        if running is None:
            return None
        call = running.call
        if call.session is self._session:
            # A task that outlived its call (given up on at the timeout, its thread ran on)
            # calls as the test would.
            return None if call.ended else call
        if call.session.installed:
            return None  # a task of another harness, on another app: a call of the test here
        text = (
            f"task {call.describe(running.uuid)}, given up on at the timeout of the harness of "
            "an earlier test (its thread ran on), called the app after that test ended; "
            "refused, so that it does not enqueue into this test"
        )
        log.warning("%s", text)  # raised in a thread nobody waits for any more
        raise HarnessError(text)

    @asynccontextmanager
    async def _call(self, what: str, parent: Call | None) -> AsyncIterator[Call]:
        """Inline: the call the body belongs to: ``parent`` for a child; else a new call of
        the test, which runs when the calls made before it ended (one at a time, see the
        class) and within :attr:`timeout` seconds. The tasks running then are cancelled (a
        sync task's thread is abandoned, as a worker does) and :class:`HarnessTimeoutError`
        names the call and the task that did not finish."""
        if parent is not None:
            yield parent
            return
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            assert self._session is not None, "the harness is not installed"
            call = Call(self._session, what, self._describe_uuid)
            try:
                with anyio.move_on_after(self.timeout) as scope:
                    yield call
            finally:
                call.ended = True
            if scope.cancelled_caught:
                given_up = list(call.cancelled)
                error = self._timed_out(call)
                await self._give_up(given_up, call.what)
                raise error from None

    async def _give_up(self, uuids: Sequence[str], what: str) -> None:
        """Inline: settle the tasks cancelled at the harness's timeout (the innermost one and
        the parents that enqueued it), so that no later call runs them again: each is
        cancelled as by ``app.cancel`` (its record ends ``cancel``, with a reason naming the
        harness's timeout; its message, which the broker got back with the cancel, is
        dropped; its workflow, if any, is told), and counts as handed out (the error names
        it)."""
        reason = (
            f"given up on by the test harness: {what} did not end within its timeout of "
            f"{self.timeout:g} s"
        )
        for uuid in uuids:
            await type(self.app).cancel(self.app, uuid, reason)
            self._handed_out.add(uuid)

    def _timed_out(self, call: Call) -> HarnessError:
        advice = (
            "; if it needs longer, give the harness a longer timeout (timeout=..., or "
            "@pytest.mark.qtasks(timeout=...))"
        )
        running, call.cancelled = call.cancelled, []
        if not running:
            return HarnessError(
                f"no message came from the broker within {self.timeout} s while waiting for "
                f"{call.what}{advice}"
            )
        named = [call.describe(one) for one in running]
        done = call.finished
        text = (
            f"{call.what} did not end within the harness's timeout of {self.timeout:g} s, one "
            "budget for the whole call and every task it runs"
            + (f" ({done} finished in it)" if done else "")
            + f": task {named[-1]} was still running and was cancelled (the thread of a sync "
            "task is abandoned and runs on)"
        )
        if len(named) > 1:
            text += f"; it was enqueued by {' <- '.join(reversed(named[:-1]))}, cancelled too"
        text += (
            "; settled: its record is 'cancel' (the harness gave up on it) and no later call "
            "runs it again"
        )
        assert self._lock is not None
        waiting = self._lock.statistics().tasks_waiting
        if waiting:
            text += (
                f"; {waiting} other call{'s' if waiting != 1 else ''} of the test waited for "
                "it meanwhile (calls run one at a time: an enqueue from a thread that a task "
                "started without its context, say a ThreadPoolExecutor's, is one, and a task "
                "that waits for it waits for itself)"
            )
        return HarnessTimeoutError(running[-1], self.timeout, text + advice)

    def _received(
        self, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        return as_received(self.app.codec.serializer, args, kwargs)

    def _started_with(self, record: TaskRecord) -> None:
        """The workflow step ``record`` starts: what :meth:`enqueued` shows of it takes the
        arguments it is called with (its input in place of the placeholder)."""
        enqueued = self._enqueued
        for i in range(len(enqueued) - 1, -1, -1):
            item = enqueued[i]
            if item.uuid == record.uuid:
                args, kwargs = self._received(record.args, record.kwargs)
                if (args, kwargs) != (item.args, item.kwargs):
                    enqueued[i] = replace(item, args=args, kwargs=kwargs)
                return

    def _check_name(self, name: str) -> None:
        """A name the app has no task of, that nothing was enqueued under, and that is close
        to one of the app's tasks is a typo: an assertion on it would pass (or fail) whatever
        the code did. A task of another app, enqueued by name, is enqueued under its name."""
        tasks = self.app.tasks
        if name in tasks or any(item.task_name == name for item in self._enqueued):
            return
        limit = 2 if len(name) >= 5 else 1
        close = [task for task in tasks if _edits(name, task) <= limit]
        if close:
            raise HarnessError(
                f"app {self.app.name!r} has no task {name!r} and nothing was enqueued under "
                f"that name: did you mean {close[0]!r}? (pass the task itself to be sure)"
            )

    def _elsewhere(self, name: str) -> str:
        """A task the app under test does not have, that nothing was enqueued under: the code
        under test most likely enqueued it through another app (the pytest plugin's fresh
        app, with no ``qtasks_app`` ini option), which no harness records."""
        if name in self.app.tasks or any(item.task_name == name for item in self._enqueued):
            return ""
        return (
            f"; the app under test ({self.app.name!r}, {len(self.app.tasks)} task(s)) has no "
            f"task {name!r}: if the code enqueues it through another app, test that one (the "
            "pytest ini option qtasks_app = 'module:app', a qtasks_app fixture returning it, "
            "or the harness built around it)"
        )

    def _describe_uuid(self, uuid: str) -> str:
        for item in self._enqueued:
            if item.uuid == uuid:
                return f"{item.describe()} [{uuid}]"
        return uuid

    async def _run_until_final(self, call: Call, uuid: str) -> TaskRecord:
        """Process due deliveries through the worker until ``uuid`` is final."""
        app = self.app
        async with app.broker.consume(prefetch=1) as deliveries:
            iterator = deliveries.__aiter__()
            while True:
                record = await app.storage.get(uuid)
                if record is None:
                    raise TaskNotFoundError(uuid)
                if record.status.final:
                    return record
                due = self._held_until(record)
                if due is not None and not await self._ready():
                    # Held back by its rate or concurrency limit: its turn is on our clock.
                    self._requeued.pop(uuid, None)
                    await self.advance_to(due)
                await self._process(call, await iterator.__anext__())

    async def _process(self, call: Call, delivery: Delivery) -> None:
        call.running.append(delivery.id)
        # What the task's code enqueues is its child (see qtasks_testing.calls).
        token = RUNNING.set(Running(call, delivery.id))
        try:
            await self._worker.process(self.app, delivery)
        except anyio.get_cancelled_exc_class():
            # The innermost task sees it first: what ran when the limit cancelled them.
            call.cancelled = call.cancelled or list(call.running)
            raise
        finally:
            RUNNING.reset(token)
            call.running.pop()
        call.finished += 1

    async def _ready(self) -> int:
        stats = await self.app.broker.stats()
        return sum(stats.ready_by_priority.values())

    async def _next_eta(self) -> float | None:
        pending = [r for r in await self._records() if not r.status.final]
        etas = [eta for r in pending if (eta := self._eta(r)) is not None]
        return min(etas) if etas else None

    async def run_pending(self, *, include_delayed: bool = False) -> list[AsyncTask]:
        """Run every task that is due (in worker mode: wait for the worker to finish them,
        moving the clock through retry backoffs).

        With ``include_delayed`` the clock is moved forward to each delayed task in turn, so
        everything enqueued runs. Returns, in enqueue order, the final records of tasks enqueued
        through the harness that it has not handed out yet (by ``add_task`` in inline mode,
        :meth:`wait`, or an earlier call)."""
        what = "run_pending(include_delayed=True)" if include_delayed else "run_pending()"
        return await self._run_pending(include_delayed, what)

    async def _run_pending(self, include_delayed: bool, what: str) -> list[AsyncTask]:
        if self.mode != "inline":
            await self._wait_due(include_delayed)
            return await self._not_handed_out(None)
        parent = self._parent()
        async with self._call(what, parent) as call:
            await self._drain_due(call, include_delayed)
            return await self._not_handed_out(call)

    async def _not_handed_out(self, call: Call | None) -> list[AsyncTask]:
        done = [
            await self._checked(call, r)
            for r in await self._records()
            if r.status.final and r.uuid not in self._handed_out
        ]
        self._report(call)
        return done

    async def _records(self) -> list[TaskRecord]:
        records = []
        for item in self._enqueued:
            record = await self.app.storage.get(item.uuid)
            if record is not None:
                records.append(record)
        return records

    async def _drain_due(self, call: Call, include_delayed: bool) -> None:
        app = self.app
        async with app.broker.consume(prefetch=1) as deliveries:
            iterator = deliveries.__aiter__()
            while True:
                if not await self._ready():
                    due = await self._next_hold()
                    if due is not None:
                        await self.advance_to(due)
                        continue
                    if not include_delayed:
                        return
                    eta = await self._next_eta()
                    if eta is None or eta <= self.clock.time():
                        return  # nothing left that moving the clock would make due
                    await self.advance_to(eta)
                    continue
                await self._process(call, await iterator.__anext__())

    async def _next_hold(self) -> float | None:
        """Inline: the earliest due time of the tasks held back with a delay, forgotten here
        (the clock is moved there next)."""
        held: dict[str, float] = {}
        for uuid in list(self._requeued):
            record = await self.app.storage.get(uuid)
            until = None if record is None else self._held_until(record)
            if until is None:
                del self._requeued[uuid]
            else:
                held[uuid] = until
        if not held:
            return None
        due = min(held.values())
        for uuid, until in held.items():
            if until <= due:
                del self._requeued[uuid]
        return due

    def _held_until(self, record: TaskRecord) -> float | None:
        """When ``record``'s task is due again, if the worker handed it back with a delay (a
        retry backoff, or a rate or concurrency limit) and it has not started again."""
        if record.status is TaskStatus.RETRY or record.status is TaskStatus.NEW:
            return self._requeued.get(record.uuid)
        return None

    async def _wait_due(self, include_delayed: bool) -> None:
        stuck = await self._catch_up(None, include_delayed, self.timeout)
        if stuck:
            names = ", ".join(f"{r.task_name} [{r.uuid}] ({r.status.value})" for r in stuck)
            raise HarnessError(f"the worker did not finish within {self.timeout} s: {names}")

    async def _catch_up(
        self, uuids: Collection[str] | None, include_delayed: bool, timeout: float
    ) -> list[TaskRecord]:
        """Worker mode: wait until every task enqueued through the harness (or only those of
        ``uuids``) that is due is final. A task the worker requeued with a retry delay, or
        that its rate or concurrency limit held back, is still due (as in inline mode, where
        retries skip their backoff): the clock is moved to its turn. A workflow step still in
        its gate is not waited for: the steps before it are.
        Tasks delayed at enqueue are moved to with ``include_delayed`` only.

        Returns ``[]``, or the tasks still running when ``timeout`` seconds passed without one
        of them ending or starting a backoff."""
        while True:
            # Registered before reading the records, so a backoff that starts after the read
            # is seen.
            progress = anyio.Event()
            self._progress.add(progress)
            try:
                if uuids is None:
                    records = await self._records()
                else:
                    stored = [await self.app.storage.get(uuid) for uuid in uuids]
                    records = [one for one in stored if one is not None]
                pending = [r for r in records if not r.status.final]
                backoff = {r.uuid: due for r in pending if (due := self._held_until(r)) is not None}
                busy = [
                    r
                    for r in pending
                    if r.uuid not in backoff
                    and (r.status is not TaskStatus.NEW or not self._delayed(r))
                    and not self._in_gate(r)
                ]
                if busy:
                    if not await self._wait_for_progress(busy, progress, timeout):
                        return busy
                    continue
            finally:
                self._progress.discard(progress)
            etas = list(backoff.values())
            if not etas and include_delayed:
                etas = [eta for r in pending if (eta := self._eta(r)) is not None]
            if not etas:
                return []
            await self.advance_to(min(etas))
            # A retry now due is busy again until the worker finishes or retries it: the next
            # round waits for that instead of reading the same records in a loop.
            for done, due in backoff.items():
                if due <= self.clock.time():
                    self._requeued.pop(done, None)

    async def _wait_for_progress(
        self, busy: list[TaskRecord], progress: anyio.Event, timeout: float
    ) -> bool:
        """Until one of ``busy`` is final or a task starts a retry backoff (``progress``);
        ``False`` if neither happened within ``timeout`` seconds."""
        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as tg:

                async def final(uuid: str) -> None:
                    await self.app.storage.wait(uuid, None)
                    tg.cancel_scope.cancel()

                async def backoff() -> None:
                    await progress.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(backoff)
                for record in busy:
                    tg.start_soon(final, record.uuid)
            return True
        return False

    @overload
    async def wait(self, task: Workflow, timeout: float | None = None) -> Workflow: ...

    @overload
    async def wait(self, task: str | TaskRecord, timeout: float | None = None) -> AsyncTask: ...

    async def wait(
        self, task: str | TaskRecord | Workflow, timeout: float | None = None
    ) -> AsyncTask | Workflow:
        """The final record of ``task`` (a uuid or a record); runs it first in inline mode. In
        worker mode the clock is moved through the task's retry backoffs. For a
        :class:`~qtasks.workflows.Workflow` (what ``run_workflow`` returned): its state once
        it ended, its members run (inline) or waited for (worker) the same way."""
        if isinstance(task, Workflow):
            return await self._wait_workflow(task.id, timeout)
        uuid = task if isinstance(task, str) else task.uuid
        record = await self.app.storage.get(uuid)
        if record is None:
            raise TaskNotFoundError(uuid)
        if self.mode == "inline" and not record.status.final:
            if self._delayed(record):
                raise self._delayed_error(f"task {self._describe_uuid(uuid)}")
            parent = self._parent()
            async with self._call(f"wait for {self._describe_uuid(uuid)}", parent) as call:
                record = await self._run_until_final(call, uuid)
                return await self._hand_out(call, record, parent)
        else:
            limit = timeout if timeout is not None else self.timeout
            if self.mode == "worker" and await self._catch_up([uuid], False, limit):
                raise TaskTimeoutError(uuid, limit)
            # Final by now, or delayed at enqueue: wait for it as the app would.
            record = await type(self.app).wait(self.app, uuid, limit)
        return await self._checked(None, record)

    async def _wait_workflow(self, id: str, timeout: float | None) -> Workflow:
        """:meth:`wait` for the workflow ``id``: its record ends when its members did. A
        workflow that failed raises (if asked to) the failure of the member that failed it,
        with that member's traceback."""
        state = await self.app.get_workflow(id)
        if state is None:
            raise TaskNotFoundError(id)
        if not state.done and self.mode == "inline":
            await self._refuse_a_delayed_step(id)
            await self.wait(id, timeout)  # raises a member's failure as it runs
        elif not state.done:
            limit = timeout if timeout is not None else self.timeout
            if await self._catch_up(state.members, False, limit):
                raise TaskTimeoutError(id, limit)
            await type(self.app).wait(self.app, id, limit)
        ended = await self.app.get_workflow(id)
        assert ended is not None  # its record was there, and a final one is not removed
        self._handed_out.add(id)
        if ended.status == "error" and self.raise_task_errors:
            members = [await self.app.storage.get(uuid) for uuid in ended.members]
            failed = [m for m in members if m is not None and m.status is TaskStatus.ERROR]
            if failed:
                note = f"It failed workflow {id}: its steps not final then were cancelled."
                raise self._failure(failed[0], [], note)
            record = await self.app.storage.get(id)
            assert record is not None
            raise self._failure(record, [])
        return ended

    # --- time -----------------------------------------------------------------------------

    def freeze_time(self) -> None:
        """Stop the clock of the in-memory broker and storage: delayed tasks wait until
        :meth:`advance_time`."""
        self.clock.freeze()

    def unfreeze_time(self) -> None:
        self.clock.unfreeze()

    async def advance_time(self, seconds: float) -> list[AsyncTask]:
        """Move the clock forward, then :meth:`run_pending`: tasks that became due run (inline)
        or are woken and waited for (worker). Returns what :meth:`run_pending` returns."""
        self.clock.advance(seconds)
        self._clock_moved()
        return await self._run_pending(False, f"advance_time({seconds:g})")

    async def advance_to(self, when: float) -> None:
        """Move the clock forward to unix time ``when`` (nothing is run)."""
        self.clock.advance_to(when)
        self._clock_moved()

    async def _wait_clock(self, when: float) -> None:
        """Return once the clock reads ``when`` or later, moved there by the test
        (:meth:`advance_time`, :meth:`advance_to`, the flow gate's waits): the app's
        clock's ``wait_until`` (:attr:`~qtasks.app.AsyncQueueTasks.time_source`), which ends a
        task's ``ctx.sleep``
        there, or once time brings it there (a clock not frozen runs at the real rate)."""
        while (left := when - self.clock.time()) > 0:
            moved = self._moved
            if moved is None:
                moved = self._moved = anyio.Event()
            with anyio.move_on_after(math.inf if self.clock.frozen else left):
                await moved.wait()

    def _clock_moved(self) -> None:
        broker = self.app.broker
        if isinstance(broker, MemoryBroker):
            broker.wake()
        moved, self._moved = self._moved, None
        if moved is not None:
            moved.set()


def __getattr__(name: str) -> Any:
    """``SyncHarness`` lived here until it moved to :mod:`qtasks_testing.sync_harness`: the
    old import keeps working (``from qtasks_testing import SyncHarness`` is the public one)."""
    if name == "SyncHarness":
        from qtasks_testing.sync_harness import SyncHarness

        return SyncHarness
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
