"""The W3C trace context as :class:`~qtasks_web.tracing.TracingPlugin` reads and writes it
itself, with the API's default propagator: a canonical version-00 ``traceparent``, what the
W3C propagator would make of it, at a fraction of its cost (the hot path's budget, issue 20);
and the current context read, attached and detached as the API's default runtime context does
it, without the calls around its ``ContextVar``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from opentelemetry import context, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("qtasks.web")

TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
"""A ``traceparent`` of version 00 in its canonical form, of a valid span context (neither id
all zeros: the propagator ignores those): the only one the plugin reads itself (anything else
goes to the propagator). The ids' zero test is in the pattern: a third less than slicing them
out to compare."""

FLAGS = {f"{flags:02x}": TraceFlags(flags) for flags in range(256)}
"""The trace flags of each two-digit lower-case hex value of a ``traceparent``."""


def traceparent(trace_id: int, span_id: int, flags: int) -> str:
    """A ``traceparent`` header of version 00, as the W3C propagator writes it."""
    return "00-%032x-%016x-%02x" % (trace_id, span_id, flags)  # noqa: UP031 - a third faster than the f-string


def template(flags: int) -> str:
    """The ``%``-format of a ``traceparent`` with ``flags``: ``template(f) % (trace_id,
    span_id) == traceparent(trace_id, span_id, f)``, with one value less to format."""
    return "00-%%032x-%%016x-%02x" % flags  # noqa: UP031 - see traceparent


class RemoteParent(trace.NonRecordingSpan):
    """The span a canonical ``traceparent`` names, as the W3C propagator extracts it (a
    non-recording span of a remote span context), with its span context built only when
    something asks for it: a task under an unsampled trace that neither traces nor enqueues
    never does, so its two ids are never parsed. An enqueue under it writes the header it
    came with (:attr:`header`)."""

    def __init__(self, header: str) -> None:  # no super().__init__: no span context yet
        self.header = header
        """The ``traceparent`` it was read from."""
        self.flags = FLAGS[header[53:]]
        """Its trace flags."""
        self._made: SpanContext | None = None

    def get_span_context(self) -> SpanContext:
        made = self._made
        if made is None:
            header, flags = self.header, self.flags
            made = self._made = SpanContext(
                int(header[3:35], 16), int(header[36:52], 16), is_remote=True, trace_flags=flags
            )
        return made

    def __repr__(self) -> str:
        return f"NonRecordingSpan({self.get_span_context()!r})"


def read(headers: dict[str, Any]) -> RemoteParent | None:
    """The parent ``headers`` carry when they hold a canonical version-00 ``traceparent`` of a
    valid span context alone (neither ``tracestate`` nor ``baggage``), else ``None`` (the
    propagator reads them: another version, spaces, a trace state, all-zero ids)."""
    if "tracestate" in headers or "baggage" in headers:
        return None
    value = headers.get("traceparent")
    if type(value) is str and TRACEPARENT.fullmatch(value) is not None:
        return RemoteParent(value)
    return None


def _span_key() -> str | None:
    """The key under which the API keeps the current span in a context (a private name,
    made at import: read here from a context made by ``set_span_in_context``)."""
    made = trace.set_span_in_context(trace.INVALID_SPAN, context.Context())
    keys = list(made)
    if len(keys) == 1 and made[keys[0]] is trace.INVALID_SPAN:
        return keys[0]
    return None  # pragma: no cover - another API's contexts


SPAN_KEY = _span_key()


def in_context(span: Span) -> context.Context:
    """A context holding ``span`` alone: ``set_span_in_context(span, Context())`` made in
    one step (that copies the empty context, then the copy)."""
    if SPAN_KEY is None:  # pragma: no cover - another API's contexts
        return trace.set_span_in_context(span, context.Context())
    return context.Context({SPAN_KEY: span})


def _context_var() -> ContextVar[context.Context] | None:
    """The ``ContextVar`` holding the current context, when the API's runtime context is its
    default, ``ContextVarsRuntimeContext`` (``OTEL_PYTHON_CONTEXT`` unset), exactly: else
    ``None``, and the runtime's own methods are called."""
    runtime = getattr(context, "_RUNTIME_CONTEXT", None)  # private: gone means "no"
    if type(runtime) is not ContextVarsRuntimeContext:
        return None  # pragma: no cover - another runtime context
    var = getattr(runtime, "_current_context", None)
    return var if isinstance(var, ContextVar) else None


_CURRENT = _context_var()

get_current: Callable[[], context.Context] = (
    context.get_current if _CURRENT is None else _CURRENT.get
)
"""``context.get_current``: with the default runtime, the ``ContextVar``'s own ``get`` (what
the API's function calls through two of its own, on the path of every enqueue)."""

attach: Callable[[context.Context], Token[context.Context]] = (
    context.attach if _CURRENT is None else _CURRENT.set
)
"""``context.attach``, as :data:`get_current` (the ``ContextVar``'s ``set``): for every run
the plugin makes current, in a trace or not."""


def detach(token: Token[context.Context]) -> None:
    """``context.detach(token)`` of a token :data:`attach` made: a failure (another task's
    token, or one used already) is logged, as the API logs it."""
    if _CURRENT is None:  # pragma: no cover - another runtime context
        context.detach(token)
        return
    try:
        _CURRENT.reset(token)
    except (ValueError, RuntimeError):
        log.exception("tracing: failed to detach the run's context")


def is_w3c(textmap: Any) -> bool:
    """Whether ``textmap`` is the API's default propagator (``OTEL_PROPAGATORS`` unset or
    ``tracecontext,baggage``), or W3C trace context alone: exactly these classes, in this
    order, not subclasses."""
    if type(textmap) is TraceContextTextMapPropagator:
        return True
    if type(textmap) is not CompositePropagator:
        return False
    parts = getattr(textmap, "_propagators", None)  # its list, private: gone means "no"
    return isinstance(parts, list | tuple) and [type(p) for p in parts] in (
        [TraceContextTextMapPropagator, W3CBaggagePropagator],
        [TraceContextTextMapPropagator],
    )
