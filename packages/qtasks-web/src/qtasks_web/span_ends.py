"""The hooks of :class:`~qtasks_web.tracing.TracingPlugin` that act only on what it made: the
end of an enqueue span, the events and end of a run span, the detach of the context made
current for a run.

Each group is a plugin of its own (``qtasks-web.tracing.sends``, ``.runs``, ``.closes``),
registered in an app's plugin manager the first time the tracing plugin has something for it
there (:meth:`Follower.follow`): each hook a plugin implements costs its call on every task,
and an app that never records a span nor receives a trace (opentelemetry-api alone, no SDK)
never needs these (issue 20's hot path). Once registered a group stays; it does nothing for
what the tracing plugin did not make.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from opentelemetry.trace import Status, StatusCode

from qtasks import hookimpl
from qtasks.errors import PluginError
from qtasks.record import TaskStatus
from qtasks_web.w3c import detach

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from qtasks.executor import TaskRun
    from qtasks.plugins import Hooks
    from qtasks.record import TaskRecord

log = logging.getLogger("qtasks.web")

TOKEN = "qtasks_web.tracing.token"
"""``run.state`` key: the token of the context attached while the task's code runs."""


class Follower:
    """A group of hooks registered in a plugin manager when first needed there."""

    def __init__(self, kind: str) -> None:
        self.name = f"qtasks-web.tracing.{kind}"
        self._hooks: Hooks | None = None
        self._active: frozenset[str] | None = None
        """The plugin manager this group was last found registered in, and its set of
        active hooks then: while that set is the same object, nothing was registered or
        unregistered since, so the group still is (one identity test per call)."""
        self._lock = threading.Lock()

    def follow(self, hooks: Hooks) -> None:
        """Make sure this group is registered in ``hooks``."""
        if hooks is not self._hooks or hooks.active is not self._active:
            self._register(hooks)

    def _register(self, hooks: Hooks) -> None:
        with self._lock:
            if not hooks.pm.is_registered(self):
                stale = hooks.pm.get_plugin(self.name)
                if stale is not None:
                    # Of a tracing plugin the app had before this one (one per app): it
                    # ended what that one made.
                    hooks.unregister(stale)
                try:
                    hooks.register(self, self.name)
                except PluginError:  # pragma: no cover - its name was just freed
                    log.exception("tracing: %s not registered, its spans may not end", self.name)
                    return
            self._hooks, self._active = hooks, hooks.active


class Sends(Follower):
    """The end of the enqueue spans kept in ``sending`` (task uuid -> span)."""

    def __init__(self, sending: dict[str, Span]) -> None:
        super().__init__("sends")
        self.sending = sending

    @hookimpl
    def qtasks_storage_added(self, record: TaskRecord) -> None:
        """End the enqueue span once the task is stored and, outside workflows, published:
        the core fires this hook after both (and before ``qtasks_task_enqueued``, which the
        plugin therefore does not implement: one hook call less per enqueue). A workflow
        step that waits for an earlier one is published later, by the worker that settles
        that one, so its span ends here rather than never."""
        span = self.sending.pop(record.uuid, None)
        if span is not None:
            span.end()

    @hookimpl
    def qtasks_task_enqueue_failed(self, record: TaskRecord, exc: BaseException) -> None:
        """End the enqueue span with the error: no confirmation will come."""
        span = self.sending.pop(record.uuid, None)
        if span is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()

    @hookimpl
    def qtasks_task_deduplicated(self, record: TaskRecord, existing: TaskRecord) -> None:
        """End the enqueue span: the unique key was held by ``existing``, nothing was sent."""
        span = self.sending.pop(record.uuid, None)
        if span is not None:
            span.add_event("qtasks.deduplicated", {"qtasks.task.existing_id": existing.uuid})
            span.end()


class Runs(Follower):
    """The events and end of the recording run spans kept in ``running`` (``id(record)`` ->
    span; the record object lives as long as the run)."""

    def __init__(self, running: dict[int, Span]) -> None:
        super().__init__("runs")
        self.running = running

    @hookimpl
    def qtasks_executor_error(self, record: TaskRecord, exc: BaseException) -> None:
        span = self.running.get(id(record))
        if span is not None:
            span.record_exception(exc)

    @hookimpl
    def qtasks_worker_task_retry(self, record: TaskRecord, delay: float) -> None:
        span = self.running.get(id(record))
        if span is not None:
            span.add_event(
                "qtasks.retry", {"qtasks.retry.delay": delay, "qtasks.task.attempt": record.attempt}
            )

    @hookimpl
    def qtasks_task_cancelled(self, record: TaskRecord, reason: str) -> None:
        span = self.running.get(id(record))
        if span is not None:
            span.add_event("qtasks.cancelled", {"qtasks.cancel.reason": reason})

    @hookimpl
    def qtasks_task_dead_lettered(self, record: TaskRecord, reason: str) -> None:
        span = self.running.get(id(record))
        if span is not None:
            span.add_event("qtasks.dead_lettered", {"qtasks.dead_letter.reason": reason})

    @hookimpl
    def qtasks_worker_execute_after(self, record: TaskRecord) -> None:
        """End the run span with the task's outcome: ``ERROR`` status for an error (and for
        a failed attempt that is retried), else unset (the API's advice to instrumentations:
        ``OK`` is the application's to set)."""
        span = self.running.pop(id(record), None)
        if span is None:
            return
        status = record.status
        span.set_attribute("qtasks.task.status", status.value)
        if status is TaskStatus.ERROR or status is TaskStatus.RETRY:
            span.set_status(Status(StatusCode.ERROR, record.error))
        span.end()


class Closes(Follower):
    """The detach of the context attached for a run (``run.state[TOKEN]``)."""

    def __init__(self) -> None:
        super().__init__("closes")

    @hookimpl
    def qtasks_executor_closed(self, run: TaskRun) -> None:
        """The code ended: the run's context stops being current (in the task that ran
        it)."""
        token = run.state.pop(TOKEN, None)
        if token is not None:
            detach(token)
