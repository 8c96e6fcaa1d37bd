"""OpenTelemetry traces across the queue: the producer's span is the parent of the worker's.

:class:`TracingPlugin` writes the W3C trace context (through the configured propagators,
``traceparent``/``tracestate`` by default) into the message headers when a task is enqueued,
and the worker continues that trace: one span per enqueue (kind ``PRODUCER``, from the hook
to the broker's confirmation) and one per run (kind ``CONSUMER``, from the start to the
settling), both with the messaging semantic-convention attributes. The run's span is the
current span while the task's code runs, so spans the task makes, and tasks it enqueues,
are its children. Errors are recorded on the span (``record_exception``, status ``ERROR``);
retries, cancels and dead-lettering are span events.

Only ``opentelemetry-api`` is needed: without an SDK configured every span is a no-op. The
``tracing`` entry point builds it when the configuration says ``[extra.tracing] enabled = true``
(see :mod:`qtasks_web.plugins`); or register it in code with ``app.add_plugin(TracingPlugin())``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode

from qtasks import hookimpl
from qtasks.record import TaskStatus

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

    from qtasks.app import AsyncQueueTasks
    from qtasks.components import Delivery
    from qtasks.executor import TaskRun
    from qtasks.messages import Message
    from qtasks.record import TaskRecord

SYSTEM = "qtasks"
"""``messaging.system`` of every span."""

MAX_UNCONFIRMED = 10_000
"""Enqueue spans kept open waiting for the broker's confirmation; past this the oldest is ended
(a plugin's ``qtasks_task_enqueue`` after this one that raised, or a caller cancelled between
the publish and its notification, never confirms)."""

_NO_OP = (trace.NoOpTracerProvider, trace.ProxyTracerProvider)
"""Providers whose spans go nowhere (the proxy is the global one until an SDK is set)."""

_TOKEN = "qtasks_web.tracing.token"
"""``run.state`` key: the token of the context attached while the task's code runs."""


class TracingPlugin:
    """OpenTelemetry spans for enqueue and run (see the module docstring).

    ``tracer_provider``: where spans go (default: the global one, looked up when a span
    starts, so one configured after the app was built is used).
    """

    name = "qtasks-web.tracing"
    qtasks_unique = "qtasks-web tracing"
    """One per app (see :meth:`qtasks.plugins.Hooks.register`): the entry point enabled by the
    configuration and one added in code would open every span twice."""

    def __init__(self, *, tracer_provider: TracerProvider | None = None) -> None:
        self._provider = tracer_provider
        self._maybe_idle = True
        self._idle_until = 0.0
        self._tracer = trace.get_tracer(
            "qtasks_web.tracing", tracer_provider=tracer_provider, schema_url=None
        )
        self._sending: dict[str, Span] = {}
        """Enqueue spans by task uuid, until the broker confirmed."""
        self._running: dict[int, Span] = {}
        """Recording run spans by ``id(record)`` (the record object lives as long as the
        run)."""
        self._drops: tuple[Any, bool, bool] = (None, False, False)
        """``(provider, drops under a local unsampled parent, under a remote one)`` (see
        :meth:`_dropped`), for the provider last asked."""
        self._textmap: Any = None
        self._fields: frozenset[str] = frozenset()
        """The header names the global propagator reads (cached per propagator)."""

    def _idle(self) -> bool:
        """Whether spans go nowhere: no SDK configured (the API's no-op or proxy provider).

        Looking the global provider up costs as much as the rest of a hook, so an answer
        "idle" is kept for a second (a provider set later is used from then on); "not idle"
        is final, as a global provider is set only once."""
        if not self._maybe_idle:
            return False
        now = time.monotonic()
        if now < self._idle_until:
            return True
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        if isinstance(provider, _NO_OP):
            self._idle_until = now + 1.0
            return True
        self._maybe_idle = False
        return False

    def _dropped(self, parent: SpanContext, remote: bool) -> bool:
        """Whether the provider's sampler drops every child of ``parent``, an unsampled
        span: a ``ParentBased`` sampler (the SDK's default) with ``AlwaysOff`` for that kind
        of parent, its default too. Such a span is never recorded, so the plugin makes none
        (the SDK spends ~10 us on each); the trace goes on through the context as it is."""
        if not parent.is_valid or parent.trace_flags.sampled:
            return False
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        known, local, remote_ = self._drops
        if known is not provider:
            sampler = getattr(provider, "sampler", None)
            describe = getattr(sampler, "get_description", None)
            text = describe() if callable(describe) else ""
            parent_based = isinstance(text, str) and text.startswith("ParentBased{")
            local = parent_based and "localParentNotSampled:AlwaysOffSampler" in text
            remote_ = parent_based and "remoteParentNotSampled:AlwaysOffSampler" in text
            self._drops = (provider, local, remote_)
        return remote_ if remote else local

    # --- producer -----------------------------------------------------------------------

    @hookimpl
    def qtasks_task_enqueue(self, message: Message) -> Message | None:
        """Start the enqueue span (a child of the current span) and write its context into
        the message headers. Without an SDK nor a trace to continue there is nothing to
        write (the span is the API's invalid no-op one)."""
        current = trace.get_current_span().get_span_context()
        if self._idle() and not current.is_valid:
            return None  # the API's no-op tracer and no trace to continue
        if self._dropped(current, remote=current.is_remote):
            propagate.inject(message.headers)  # the unsampled trace goes on, no span of ours
            return message
        span = self._tracer.start_span(f"send {message.task_name}", kind=SpanKind.PRODUCER)
        if span.is_recording():
            attributes = _messaging("send", message.task_name, message.uuid)
            attributes["qtasks.task.priority"] = message.priority
            span.set_attributes(attributes)  # one call: the SDK cleans them under a lock
            sending = self._sending
            if len(sending) >= MAX_UNCONFIRMED:
                oldest = sending.pop(next(iter(sending)))
                oldest.add_event("qtasks.unconfirmed")
                oldest.end()
            sending[message.uuid] = span
        elif not span.get_span_context().is_valid:
            return None
        propagate.inject(message.headers, context=trace.set_span_in_context(span))
        return message

    @hookimpl
    def qtasks_storage_added(self, record: TaskRecord) -> None:
        """End the enqueue span once the task is stored (and, outside workflows, published):
        a workflow step that waits for an earlier one is published later, by the worker that
        settles that one, so its span ends here rather than never."""
        span = self._sending.pop(record.uuid, None)
        if span is not None:
            span.end()

    @hookimpl
    def qtasks_task_enqueued(self, record: TaskRecord) -> None:
        span = self._sending.pop(record.uuid, None)
        if span is not None:
            span.end()

    @hookimpl
    def qtasks_task_enqueue_failed(self, record: TaskRecord, exc: BaseException) -> None:
        """End the enqueue span with the error: no confirmation will come."""
        span = self._sending.pop(record.uuid, None)
        if span is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()

    # --- worker -------------------------------------------------------------------------

    @hookimpl
    def qtasks_worker_execute_before(self, record: TaskRecord, run: TaskRun) -> None:
        """Start the run span as a child of the producer's, current while the code runs."""
        headers = run.message.headers
        textmap = propagate.get_global_textmap()
        if textmap is not self._textmap:
            self._textmap, self._fields = textmap, frozenset(textmap.fields)
        # Headers without a propagated field (most, when nobody traces) cost no extraction.
        if self._fields.isdisjoint(headers):
            if self._idle():
                return  # the API's no-op tracer and no trace to continue
            parent = None
        else:
            parent = propagate.extract(headers)
            if self._dropped(trace.get_current_span(parent).get_span_context(), remote=True):
                # An unsampled trace this run's span would not be recorded in: no span, the
                # trace (and its baggage) goes on in what the task does and enqueues.
                run.state[_TOKEN] = context.attach(parent)
                return
        span = self._tracer.start_span(
            f"process {record.task_name}", context=parent, kind=SpanKind.CONSUMER
        )
        if span.is_recording():
            attributes = _messaging("process", record.task_name, record.uuid)
            attributes["qtasks.task.priority"] = record.priority
            attributes["qtasks.task.attempt"] = record.attempt
            if record.worker is not None:
                attributes["messaging.consumer.group.name"] = record.worker
            span.set_attributes(attributes)
            self._running[id(record)] = span
        elif not span.get_span_context().is_valid:
            return  # the API's invalid no-op span: nothing to make current
        run.state[_TOKEN] = context.attach(trace.set_span_in_context(span, parent))

    @hookimpl
    def qtasks_executor_closed(self, run: TaskRun) -> None:
        """The code ended: the run span stops being current (in the task that ran it)."""
        token = run.state.pop(_TOKEN, None)
        if token is not None:
            context.detach(token)

    @hookimpl
    def qtasks_executor_error(self, record: TaskRecord, exc: BaseException) -> None:
        span = self._running.get(id(record))
        if span is not None:
            span.record_exception(exc)

    @hookimpl
    def qtasks_worker_task_retry(self, record: TaskRecord, delay: float) -> None:
        span = self._running.get(id(record))
        if span is not None:
            span.add_event(
                "qtasks.retry", {"qtasks.retry.delay": delay, "qtasks.task.attempt": record.attempt}
            )

    @hookimpl
    def qtasks_task_cancelled(self, record: TaskRecord, reason: str) -> None:
        span = self._running.get(id(record))
        if span is not None:
            span.add_event("qtasks.cancelled", {"qtasks.cancel.reason": reason})

    @hookimpl
    def qtasks_task_dead_lettered(self, record: TaskRecord, reason: str) -> None:
        span = self._running.get(id(record))
        if span is not None:
            span.add_event("qtasks.dead_lettered", {"qtasks.dead_letter.reason": reason})

    @hookimpl
    def qtasks_worker_execute_after(self, record: TaskRecord) -> None:
        """End the run span with the task's outcome: ``ERROR`` status for an error (and for
        a failed attempt that is retried), else unset (the API's advice to instrumentations:
        ``OK`` is the application's to set)."""
        span = self._running.pop(id(record), None)
        if span is None:
            return
        status = record.status
        span.set_attribute("qtasks.task.status", status.value)
        if status is TaskStatus.ERROR or status is TaskStatus.RETRY:
            span.set_status(Status(StatusCode.ERROR, record.error))
        span.end()

    @hookimpl
    def qtasks_task_rejected(self, app: AsyncQueueTasks, delivery: Delivery, reason: str) -> None:
        """A message that cannot run gets a run span of its own, in its producer's trace
        when its headers can be read, with status ``ERROR``."""
        headers: dict[str, Any] = {}
        name = "(undecodable)"
        try:
            message = app.codec.decode(delivery.body)
            headers, name = message.headers, message.task_name
        except Exception:
            pass
        span = self._tracer.start_span(
            f"process {name}",
            context=propagate.extract(headers),
            kind=SpanKind.CONSUMER,
            attributes=_messaging("process", name, delivery.id),
        )
        span.add_event("qtasks.rejected", {"qtasks.reject.reason": reason})
        span.set_status(Status(StatusCode.ERROR, f"rejected: {reason}"))
        span.end()


def _messaging(operation: str, task_name: str, uuid: str) -> dict[str, Any]:
    """The messaging semantic-convention attributes of a ``send`` or ``process`` span (with
    the older ``messaging.operation``: ``publish`` or ``process``)."""
    return {
        "messaging.system": SYSTEM,
        "messaging.operation": "publish" if operation == "send" else operation,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": task_name,
        "messaging.message.id": uuid,
    }
