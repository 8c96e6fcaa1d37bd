"""The blocking facade of the test harness, for sync tests (see :class:`SyncHarness`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from qtasks.app import AsyncQueueTasks
from qtasks.record import TaskRecord
from qtasks.sync import QueueTasks
from qtasks.task import AsyncTask, SyncTaskDef, Task, TaskDef
from qtasks.workflows import Workflow
from qtasks_testing.clock import FakeClock
from qtasks_testing.harness import Harness, HarnessError, Mode
from qtasks_testing.records import EnqueuedTask

T = TypeVar("T")


class SyncHarness:
    """The blocking facade of :class:`Harness`, for sync tests.

    For a :class:`~qtasks.QueueTasks` it works through the app's own portal, so the code under
    test and the harness share the event loop that holds the in-memory components. For an
    :class:`~qtasks.AsyncQueueTasks` it runs a portal of its own; call async code of the app
    with :meth:`call`.
    """

    def __init__(
        self,
        app: QueueTasks | AsyncQueueTasks,
        *,
        mode: Mode = "inline",
        keep: Collection[str] = (),
        raise_task_errors: bool = True,
        clock: FakeClock | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.app = app
        self._facade = app if isinstance(app, QueueTasks) else None
        aio = app.aio if isinstance(app, QueueTasks) else app
        self.harness = Harness(
            aio,
            mode=mode,
            keep=keep,
            raise_task_errors=raise_task_errors,
            clock=clock,
            timeout=timeout,
        )
        self._own_portal: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None

    @property
    def clock(self) -> FakeClock:
        return self.harness.clock

    @property
    def mode(self) -> Mode:
        return self.harness.mode

    @property
    def portal(self) -> BlockingPortal:
        """The portal running the app's event loop."""
        if self._portal is None:
            if self._facade is not None:
                self._portal = self._facade.portal
            else:
                self._own_portal = start_blocking_portal()
                self._portal = self._own_portal.__enter__()
        return self._portal

    def call(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await func(*args)`` in the app's event loop and return the result. A blocking
        method of a sync app (``QueueTasks``, its tasks and records) is refused with
        :class:`HarnessError`: call it directly, or pass its async form."""
        owner = getattr(func, "__self__", None)
        if isinstance(owner, QueueTasks | SyncTaskDef | Task):
            raise HarnessError(
                f"call() awaits its function in the app's event loop, for async code; "
                f"{getattr(func, '__qualname__', func)!r} is a blocking method of the sync app, "
                "which would wait for that loop from inside it: call it directly, or pass its "
                "async form (app.aio.add_task, task.aio.add_task)"
            )
        return self.portal.call(func, *args)

    def start(self) -> None:
        """Start the harness (see :meth:`Harness.start`). A start that fails stops the portal
        the harness started, so its thread does not keep the process alive."""
        try:
            self.call(self.harness.start)
        except BaseException:
            # Harness.start cleaned up after itself (or installed nothing, e.g. for an app
            # already started, which must not be closed here): only the portal is left.
            self._stop_own_portal()
            raise

    def close(self) -> None:
        """Stop everything and restore the app (also stops a portal the harness started)."""
        try:
            if self._portal is not None:
                self.call(self.harness.close)
        finally:
            self.harness.uninstall()
            if self._facade is not None:
                self._facade.close()
            self._stop_own_portal()

    def _stop_own_portal(self) -> None:
        own, self._own_portal, self._portal = self._own_portal, None, None
        if own is not None:
            own.__exit__(None, None, None)

    def __enter__(self) -> SyncHarness:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _bind(self, record: AsyncTask) -> Any:
        """The record as the app hands out records: a ``Task`` for the sync app."""
        if self._facade is None:
            return record
        return self._facade.get(record.uuid) or record

    def run_pending(self, *, include_delayed: bool = False) -> list[Any]:
        """See :meth:`Harness.run_pending`."""
        records = self.call(lambda: self.harness.run_pending(include_delayed=include_delayed))
        return [self._bind(r) for r in records]

    def wait(self, task: str | TaskRecord | Workflow, timeout: float | None = None) -> Any:
        """See :meth:`Harness.wait`: a record, or for a workflow its state."""
        if isinstance(task, Workflow):
            state = self.call(self.harness.wait, task, timeout)
            if self._facade is None:
                return state
            return self._facade.get_workflow(state.id) or state
        one: str | TaskRecord = task
        return self._bind(self.call(lambda: self.harness.wait(one, timeout)))

    def freeze_time(self) -> None:
        self.harness.freeze_time()

    def unfreeze_time(self) -> None:
        self.harness.unfreeze_time()

    def advance_time(self, seconds: float) -> list[Any]:
        """See :meth:`Harness.advance_time`."""
        return [self._bind(r) for r in self.call(self.harness.advance_time, seconds)]

    def advance_to(self, when: float) -> None:
        """See :meth:`Harness.advance_to`."""
        self.call(self.harness.advance_to, when)

    def enqueued(self, task: str | TaskDef[..., Any] | None = None) -> list[EnqueuedTask]:
        """See :meth:`Harness.enqueued`."""
        return self.harness.enqueued(task)

    def assert_enqueued(
        self, task: str | TaskDef[..., Any], /, *args: Any, **kwargs: Any
    ) -> EnqueuedTask:
        return self.harness.assert_enqueued(task, *args, **kwargs)

    def assert_not_enqueued(
        self, task: str | TaskDef[..., Any], /, *args: Any, **kwargs: Any
    ) -> None:
        self.harness.assert_not_enqueued(task, *args, **kwargs)
