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

Over ~500 lines: one plugin whose hooks share its per-task spans and the fast paths of the
unsampled trace (the hot path's budget, issue 20), each next to the general path it mirrors;
the root sampling it mirrors is in :mod:`qtasks_web.sampling`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from opentelemetry import baggage, context, propagate, trace
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from qtasks import hookimpl
from qtasks_web.sampling import LOW_64, Roots, drops_unsampled
from qtasks_web.span_ends import TOKEN, Closes, Runs, Sends
from qtasks_web.w3c import (
    RemoteParent,
    attach,
    get_current,
    in_context,
    is_w3c,
    read,
    traceparent,
)

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
        """Enqueue spans by task uuid, until the task is stored and published."""
        self._running: dict[int, Span] = {}
        """Recording run spans by ``id(record)`` (the record object lives as long as the
        run)."""
        self._sends, self._runs = Sends(self._sending), Runs(self._running)
        self._closes = Closes()
        """The hooks that end what the plugin made, registered in an app the first time it
        made something there (:mod:`qtasks_web.span_ends`)."""
        self._sampling_for: Any = None
        self._skip = False
        self._roots: Roots | None = None
        """What the plugin knows of the sampler of ``_sampling_for`` (the provider last
        asked, see :meth:`_sampling`): whether it drops every span under an unsampled remote
        parent (:meth:`_skips`), and how it samples root spans when the plugin can decide it
        itself (:meth:`_root_sampling`)."""
        self._textmap: Any = None
        self._fields: frozenset[str] = frozenset()
        """The header names the global propagator reads (cached per propagator)."""
        self._w3c = False
        """Whether that propagator is the API's default, W3C trace context and baggage."""

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

    def _skips(self, parent: Span) -> bool:
        """Whether no span need be made under ``parent``: a span of a valid, remote, unsampled
        span context (a :class:`~qtasks_web.w3c.RemoteParent` tells its flags without
        building its span context), under which the provider's sampler is the SDK's
        ``ParentBased`` (its ``should_sample`` not overridden) dropping every span whose
        parent is unsampled, remote or local (``AlwaysOff``, its defaults).

        Such a sampler's answer is known without asking: ``DROP``, whatever the span. The SDK
        would then make a non-recording span (the parent's trace id and trace state,
        unsampled, an id of its own) that no exporter sees, at ~3 us (with the SDK's own span
        metrics on, which count it, the SDK is asked). The plugin makes none and passes the parent's
        context on as it is: what the task's code and the tasks it enqueues see is that
        trace, unsampled, so their spans are dropped too. Their parent is then the remote
        one rather than the SDK's local non-recording span, which is why the local rule
        must drop as well: the decision is the same either way. Any other sampler, a local
        parent (another instrumentation's span in this process) or a sampled one: the
        sampler is asked, through the tracer."""
        if type(parent) is RemoteParent:
            if parent.flags & 0x01:
                return False
        else:
            made = parent.get_span_context()
            if made.trace_flags & 0x01 or not made.is_remote or not made.is_valid:
                return False
        self._sampling()
        return self._skip

    def _root_sampling(self) -> Roots | None:
        """How the provider samples root spans, when the plugin can decide it without the
        SDK (:class:`~qtasks_web.sampling.Roots`: the ratio sampler
        docs/metrics-and-tracing.md recommends, under ``ParentBased`` or alone): a root span
        it drops (99 % of them at 1 %) then costs a trace id, a span id and a header, not a
        tracer's ``start_span``."""
        self._sampling()
        return self._roots

    def _sampling(self) -> None:
        """Refresh what the plugin knows of the provider's sampler when the provider is not
        the one last asked (the global one may be set after the plugin was made)."""
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        if provider is not self._sampling_for:
            self._sampling_for = provider
            self._skip = drops_unsampled(provider)
            self._roots = Roots.of(provider, "qtasks_web.tracing")

    def _propagation(self) -> bool:
        """Refresh the cached facts about the global propagator; whether it is the API's
        default (see :meth:`_inject`)."""
        textmap = propagate.get_global_textmap()
        if textmap is not self._textmap:
            self._textmap, self._fields = textmap, frozenset(textmap.fields)
            self._w3c = is_w3c(textmap)
        return self._w3c

    def _plain_w3c(self, current: context.Context) -> bool:
        """Whether a span's context is injected as ``traceparent`` (and ``tracestate``)
        alone: the API's default propagator, and no baggage in ``current`` (an empty
        context, an enqueue outside any trace, holds none: not looked up)."""
        return self._propagation() and (not current or not baggage.get_all(current))

    def _inject(self, headers: dict[str, Any], span: Span, current: context.Context) -> None:
        """Write ``span``'s context (a valid one) and the baggage of ``current`` (the current
        context) into ``headers`` through the global propagator.

        With the API's default propagator and no baggage that is ``traceparent`` (and
        ``tracestate`` when the trace has one), written here as the W3C propagator writes
        them: a third of its cost, which is mostly the context it is handed and the calls
        between the composite and its parts. A remote parent read from a ``traceparent``
        (:class:`~qtasks_web.w3c.RemoteParent`: the enqueue of a task whose run made no span
        under an unsampled trace) is written as it came."""
        if self._plain_w3c(current):
            if type(span) is RemoteParent:
                headers["traceparent"] = span.header
                return
            span_context = span.get_span_context()
            headers["traceparent"] = traceparent(
                span_context.trace_id, span_context.span_id, span_context.trace_flags
            )
            if span_context.trace_state:
                headers["tracestate"] = span_context.trace_state.to_header()
            return
        propagate.inject(headers, context=trace.set_span_in_context(span, current))

    def _inject_dropped(
        self, headers: dict[str, Any], roots: Roots, trace_id: int, current: context.Context
    ) -> None:
        """Write the context of a root span ``roots`` drops, of ``trace_id``, as
        :meth:`_inject` writes a span's: what the SDK's non-recording span would carry."""
        span_id = roots.span_id()
        if self._plain_w3c(current):
            headers["traceparent"] = roots.template % (trace_id, span_id)
            return
        dropped = SpanContext(
            trace_id, span_id, is_remote=False, trace_flags=TraceFlags(roots.flags)
        )
        self._inject(headers, trace.NonRecordingSpan(dropped), current)

    def _parent(self, headers: dict[str, Any]) -> tuple[context.Context, Span]:
        """The context ``headers`` carry, as the global propagator extracts it, and its span
        (the API's invalid one when there is none).

        With the API's default propagator, a canonical version-00 ``traceparent`` alone is
        read here (:func:`~qtasks_web.w3c.read`): the same context, at a fraction of the
        propagator's cost, its span context built only when asked for. Anything else goes to
        the propagator."""
        if self._w3c:
            remote = read(headers)
            if remote is not None:
                return in_context(remote), remote
        extracted = propagate.extract(headers)
        return extracted, trace.get_current_span(extracted)

    # --- producer -----------------------------------------------------------------------

    @hookimpl
    def qtasks_task_enqueue(self, app: AsyncQueueTasks, message: Message) -> Message | None:
        """Start the enqueue span (a child of the current span) and write its context into
        the message headers. Without an SDK nor a trace to continue there is nothing to
        write (the span is the API's invalid no-op one)."""
        # The current context, read once and handed on (the SDK would read it three times).
        current = get_current()
        if not current:
            # An enqueue outside any trace (the usual one): a root span, or nothing. A root
            # the plugin samples itself, with the default propagator, is decided here with
            # nothing else looked up or built (the path of 99 % of tasks at a 1 % ratio):
            # with the SDK's default id generator, its ids drawn as that generator draws
            # them, and kept() written out (no call around either).
            if self._maybe_idle and self._idle():
                return None  # the API's no-op tracer
            # What _root_sampling() answers, when the global propagator is the API's default
            # (a root's context, in an empty context, is then a traceparent alone): both
            # caches checked here, without a call around them.
            provider = self._provider
            if provider is None:
                provider = trace.get_tracer_provider()
            if provider is not self._sampling_for:
                self._sampling()
            if propagate.get_global_textmap() is not self._textmap:
                self._propagation()
            plain = self._roots if self._w3c else None
            if plain is not None:
                bits = plain.bits
                trace_id = plain.draw() if bits is None else bits(128) or plain.draw()
                if trace_id & LOW_64 >= plain.bound:  # dropped: as _inject_dropped writes it
                    span_id = plain.span_id() if bits is None else bits(64) or plain.span_id()
                    message.headers["traceparent"] = plain.template % (trace_id, span_id)
                    return message
                return self._send_root(app, message, plain, trace_id, current)
        parent = trace.get_current_span(current)
        roots: Roots | None = None
        if self._skips(parent):
            self._inject(message.headers, parent, current)  # the unsampled trace goes on
            return message
        if not parent.get_span_context().is_valid:
            if self._idle():
                return None  # the API's no-op tracer and no trace to continue
            roots = self._root_sampling()
        name = message.task_name
        # Only what a sampler may decide on is built before it has decided.
        attributes = _for_sampler("send", name)
        if roots is None:
            span = self._tracer.start_span(
                f"send {name}", context=current, kind=SpanKind.PRODUCER, attributes=attributes
            )
        else:
            trace_id = roots.draw()
            if not roots.kept(trace_id):  # a root the sampler drops: no span, its context
                self._inject_dropped(message.headers, roots, trace_id, current)
                return message
            span = roots.start(trace_id, f"send {name}", current, SpanKind.PRODUCER, attributes)
        return self._sending_span(app, message, span, current)

    def _send_root(
        self,
        app: AsyncQueueTasks,
        message: Message,
        roots: Roots,
        trace_id: int,
        current: context.Context,
    ) -> Message | None:
        """Start the enqueue span of a root ``roots`` keeps, of ``trace_id``."""
        name = message.task_name
        attributes = _for_sampler("send", name)
        span = roots.start(trace_id, f"send {name}", current, SpanKind.PRODUCER, attributes)
        return self._sending_span(app, message, span, current)

    def _sending_span(
        self, app: AsyncQueueTasks, message: Message, span: Span, current: context.Context
    ) -> Message | None:
        """Keep ``span`` (just started) until the task is stored, and write its context into
        the message headers."""
        if span.is_recording():
            span.set_attributes(  # one call: the SDK cleans them under a lock
                {
                    "messaging.operation": "publish",
                    "messaging.message.id": message.uuid,
                    "qtasks.task.priority": message.priority,
                }
            )
            self._sends.follow(app.hooks)
            sending = self._sending
            if len(sending) >= MAX_UNCONFIRMED:
                oldest = sending.pop(next(iter(sending)))
                oldest.add_event("qtasks.unconfirmed")
                oldest.end()
            sending[message.uuid] = span
        elif not span.get_span_context().is_valid:
            return None
        self._inject(message.headers, span, current)
        return message

    # --- worker -------------------------------------------------------------------------

    @hookimpl
    def qtasks_worker_execute_before(
        self, app: AsyncQueueTasks, record: TaskRecord, run: TaskRun
    ) -> None:
        """Start the run span as a child of the producer's, current while the code runs."""
        headers = run.message.headers
        if propagate.get_global_textmap() is not self._textmap:
            self._propagation()
        # Headers without a propagated field (most, when nobody traces) cost no extraction.
        if self._fields.isdisjoint(headers):
            if self._idle():
                return  # the API's no-op tracer and no trace to continue
            parent = None
        else:
            remote = read(headers) if self._w3c else None
            if remote is not None:
                # _parent() and _skips() written out for a plain traceparent, the path of
                # every run under a trace the producer did not sample (99 % at a 1 % ratio).
                parent = in_context(remote)
                if not remote.flags & 0x01:
                    provider = self._provider
                    if provider is None:
                        provider = trace.get_tracer_provider()
                    if provider is not self._sampling_for:
                        self._sampling()
                    skip = self._skip
                else:
                    skip = False
            else:
                parent, parent_span = self._parent(headers)
                skip = self._skips(parent_span)
            if skip:
                # An unsampled trace this run's span would not be recorded in: no span, the
                # trace (and its baggage) goes on in what the task does and enqueues.
                self._closes.follow(app.hooks)
                run.state[TOKEN] = attach(parent)
                return
        name = record.task_name
        attributes = _for_sampler("process", name)
        if record.worker is not None:
            attributes["messaging.consumer.group.name"] = record.worker
        span = self._tracer.start_span(
            f"process {name}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        if span.is_recording():
            span.set_attributes(
                {
                    "messaging.operation": "process",
                    "messaging.message.id": record.uuid,
                    "qtasks.task.priority": record.priority,
                    "qtasks.task.attempt": record.attempt,
                }
            )
            self._runs.follow(app.hooks)
            self._running[id(record)] = span
        elif not span.get_span_context().is_valid:
            return  # the API's invalid no-op span: nothing to make current
        self._closes.follow(app.hooks)
        run.state[TOKEN] = attach(trace.set_span_in_context(span, parent))

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
            attributes=_for_sampler("process", name),
        )
        span.set_attributes({"messaging.operation": "process", "messaging.message.id": delivery.id})
        span.add_event("qtasks.rejected", {"qtasks.reject.reason": reason})
        span.set_status(Status(StatusCode.ERROR, f"rejected: {reason}"))
        span.end()


def _for_sampler(operation: str, task_name: str) -> dict[str, Any]:
    """The messaging semantic-convention attributes of a ``send`` or ``process`` span that a
    sampler may decide on, given when the span starts (the rest is set once it records)."""
    return {
        "messaging.system": SYSTEM,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": task_name,
    }
