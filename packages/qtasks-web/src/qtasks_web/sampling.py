"""What :class:`~qtasks_web.tracing.TracingPlugin` knows of the OpenTelemetry SDK's samplers:
the decisions it can make without asking the SDK, because the answer is known beforehand.

A span the sampler drops is a non-recording span that no processor or exporter sees: only its
context (trace id, span id, flags) goes on, into the message headers. Making one through the
SDK costs a tracer's whole ``start_span`` (3-7 us, 2-3 times that among the event loop's
work); making its context here costs a third of that. Two cases are answered here:

- under a remote parent that is not sampled, a ``ParentBased`` sampler whose delegates for
  unsampled parents drop (the SDK's defaults) drops every span (:func:`drops_unsampled`);
- a root span (no parent) under a sampler whose root decision is a ratio of the trace id
  (``TraceIdRatioBased``, alone or as the root of ``ParentBased``, the sampler
  docs/metrics-and-tracing.md recommends) or ``ALWAYS_OFF``: :class:`Roots` draws the trace
  id with the provider's own id generator, decides as the sampler does, and makes the
  context of a dropped span itself; a kept one is started by the SDK with that same trace id.

The SDK is not imported here (only the API is needed at run time): a provider with an SDK
sampler has imported it already. Anything not exactly the SDK's own classes (a subclass that
overrides a decision, a sampler of the user's own) gets every decision from the SDK.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from typing import TYPE_CHECKING, Any

from opentelemetry import context

from qtasks_web.w3c import template

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.trace import Span, SpanKind, Tracer

LOW_64 = (1 << 64) - 1
"""The bits of a trace id ``TraceIdRatioBased`` decides on (``TRACE_ID_LIMIT``)."""


def drops_unsampled(provider: object) -> bool:
    """Whether ``provider``'s sampler is the SDK's ``ParentBased`` (or a subclass that keeps
    its ``should_sample``, such as ``ParentBasedTraceIdRatio``) whose delegates for an
    unsampled parent, remote and local, are the SDK's ``StaticSampler`` dropping (and the
    SDK's own span metrics are off)."""
    sampling = sys.modules.get("opentelemetry.sdk.trace.sampling")
    sampler = getattr(provider, "sampler", None)
    if sampling is None or not isinstance(sampler, sampling.ParentBased) or _counts_drops():
        return False
    if type(sampler).should_sample is not sampling.ParentBased.should_sample:
        return False  # a sampler of the user's own: it gets every decision
    return _drops(sampling, getattr(sampler, "_remote_parent_not_sampled", None)) and _drops(
        sampling, getattr(sampler, "_local_parent_not_sampled", None)
    )


def _counts_drops() -> bool:
    """Whether the SDK's own span metrics are on: they count the spans it drops too, so
    every span is left to the SDK."""
    flag = os.environ.get("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "")
    return flag.strip().lower() in ("true", "1")


def _drops(sampling: Any, sampler: object) -> bool:
    return (
        type(sampler) is sampling.StaticSampler
        and getattr(sampler, "_decision", None) is sampling.Decision.DROP
    )


def _root_bound(sampling: Any, sampler: object) -> int | None:
    """``B`` such that a root span whose trace id's low 64 bits are below ``B`` is kept and
    any other dropped, when that is exactly what ``sampler`` decides; else ``None``."""
    if isinstance(sampler, sampling.ParentBased):
        if type(sampler).should_sample is not sampling.ParentBased.should_sample:
            return None
        sampler = getattr(sampler, "_root", None)
    if type(sampler) is sampling.TraceIdRatioBased:
        bound = getattr(sampler, "bound", None)
        return bound if type(bound) is int else None
    if _drops(sampling, sampler):
        return 0
    return None


def _random_bits(ids: object) -> Callable[[int], int] | None:
    """``random.getrandbits`` when ``ids`` is exactly the SDK's ``RandomIdGenerator`` (whose
    ids are ``getrandbits(128)`` and ``getrandbits(64)``, drawn again while zero), else
    ``None``."""
    module = sys.modules.get("opentelemetry.sdk.trace.id_generator")
    if module is None or type(ids) is not getattr(module, "RandomIdGenerator", None):
        return None
    return random.getrandbits


class _Preset:
    """An id generator: ``inner``'s, except that the next trace id asked for in a thread may
    be chosen beforehand (:meth:`hand`, used once).

    Installed on a tracer of the provider, which newer SDKs share between every caller
    asking for the same instrumentation scope (every :class:`TracingPlugin` on one provider,
    in any thread): so it is installed once per tracer (:func:`_preset`), never wrapped
    again, and what is handed over stays in the thread that handed it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._next = threading.local()

    def hand(self, trace_id: int) -> None:
        """The next trace id this thread asks for is ``trace_id`` (``0``: the inner
        generator's again)."""
        self._next.trace_id = trace_id

    def generate_trace_id(self) -> int:
        trace_id = getattr(self._next, "trace_id", 0)
        if trace_id:
            self._next.trace_id = 0
            return int(trace_id)
        return int(self.inner.generate_trace_id())

    def generate_span_id(self) -> int:
        return int(self.inner.generate_span_id())

    def __getattr__(self, name: str) -> Any:  # is_trace_id_random, on newer SDKs
        return getattr(self.inner, name)


_PRESETTING = threading.Lock()


def _preset(tracer: Any) -> _Preset:
    """``tracer``'s id generator as a :class:`_Preset`, installed the first time."""
    with _PRESETTING:
        ids = tracer.id_generator
        if not isinstance(ids, _Preset):
            ids = tracer.id_generator = _Preset(ids)
        return ids


class Roots:
    """How root spans are sampled under one SDK tracer provider, made only when it can be
    answered here (:meth:`of`).

    :attr:`draw` draws a trace id as the SDK would (the provider's id generator); a trace id
    :meth:`kept` is started by :attr:`tracer` (a tracer of the plugin's own, whose id
    generator hands that trace id to the SDK once, in :meth:`start`); a dropped one's
    span id is :attr:`span_id`, and its context's flags :attr:`flags`, what the SDK gave a
    span it dropped when this was made (its ``traceparent`` is :attr:`template` ``%
    (trace_id, span_id)``)."""

    def __init__(self, tracer: Tracer, ids: _Preset, bound: int, flags: int) -> None:
        self.tracer = tracer
        self._ids = ids
        self.bound = bound
        self.flags = flags
        self.template = template(flags)
        # The generator's own methods, called without a method of this class around them
        # (one call less each, on the path of every root span).
        self.draw: Callable[[], int] = ids.inner.generate_trace_id
        """A new trace id, from the provider's id generator."""
        self.span_id: Callable[[], int] = ids.inner.generate_span_id
        """The span id of a dropped root span, from the provider's id generator."""
        self.bits: Callable[[int], int] | None = _random_bits(ids.inner)
        """``random.getrandbits`` when the provider's id generator is the SDK's
        ``RandomIdGenerator`` (its default), else ``None``: its ids are then drawn here
        without a call around the draw (``bits(128) or draw()``, ``bits(64) or
        span_id()``: the same numbers from the same generator, a zero one drawn again as
        it does)."""

    @classmethod
    def of(cls, provider: object, name: str) -> Roots | None:
        """The root sampling of ``provider`` for spans of the tracer ``name``, or ``None`` if
        the SDK must decide each one: not the SDK's provider, tracer and samplers, or its
        own span metrics on (they count the spans it drops too)."""
        sampling = sys.modules.get("opentelemetry.sdk.trace.sampling")
        sdk = sys.modules.get("opentelemetry.sdk.trace")
        if sampling is None or sdk is None or not isinstance(provider, sdk.TracerProvider):
            return None
        bound = _root_bound(sampling, getattr(provider, "sampler", None))
        if bound is None or bound > LOW_64:
            return None  # every root kept (a rate of 1): nothing to answer here
        if _counts_drops():
            return None
        tracer = provider.get_tracer(name)
        if type(tracer) is not sdk.Tracer or not hasattr(tracer, "id_generator"):
            return None
        ids = _preset(tracer)
        # What the SDK makes of a root it drops, asked once: the trace id handed over, a
        # non-recording span, its flags (a newer SDK sets 0x02, "random trace id") and no
        # trace state. Anything else (a disabled tracer's invalid span): the SDK decides.
        ids.hand((1 << 64) | LOW_64)  # low bits at the top: dropped, as bound <= them
        try:
            span = tracer.start_span("qtasks-web root sampling", context=context.Context())
        finally:
            ids.hand(0)  # not taken by a disabled tracer: not left for the next root
        made = span.get_span_context()
        if (
            span.is_recording()
            or made.trace_id != (1 << 64) | LOW_64
            or not made.is_valid
            or made.is_remote
            or made.trace_state
            or made.trace_flags & 0x01
        ):
            return None
        return cls(tracer, ids, bound, int(made.trace_flags))

    def kept(self, trace_id: int) -> bool:
        """Whether the sampler keeps a root span of ``trace_id``."""
        return trace_id & LOW_64 < self.bound

    def start(
        self,
        trace_id: int,
        name: str,
        parent: context.Context,
        kind: SpanKind,
        attributes: dict[str, Any],
    ) -> Span:
        """Start, through the SDK, a root span the sampler keeps, of ``trace_id``."""
        self._ids.hand(trace_id)
        try:
            return self.tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
        finally:
            self._ids.hand(0)
