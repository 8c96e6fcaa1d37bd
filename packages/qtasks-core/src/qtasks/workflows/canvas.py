"""What a workflow is built of: signatures (a task call not made yet) and the three ways to
combine them, :func:`chain`, :func:`group` and :func:`chord`.

They are plain values: building one checks it (an unknown task is refused here, not when the
workflow runs) and runs nothing; ``app.run_workflow(wf)`` runs it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeAlias, overload

from qtasks.checks import FAR_AHEAD, check_delay, check_priority, far_ahead
from qtasks.errors import QTasksError, TaskDeclarationError, UnknownTaskError, WorkflowError

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks


RETRY_HEADER = "retry"
"""Message header: the call's own ``retry`` (a signature's option), over the task's."""


_CELERY_OPTIONS = {
    "countdown": "Celery's countdown is delay=seconds",
    "max_retries": "Celery's max_retries is retry=N",
    "eta": "a workflow step takes delay=seconds, counted from when it is enqueued",
    "queue": "a workflow's steps go to the app's broker queue",
}


def _run_it_with_the_app(what: str) -> WorkflowError:
    """Celery's ``apply_async()``/``delay()`` of a canvas: qtasks runs a workflow through
    the app, which knows the broker and storage."""
    return WorkflowError(
        f"{what}: a workflow (a signature included) runs with app.run_workflow(flow), which "
        "returns a Workflow to wait on (Celery's apply_async()/delay() of a canvas)"
    )


@dataclass(frozen=True, slots=True)
class Signature:
    """One task call, not made yet: ``task.s(*args, **kwargs)`` or
    ``app.signature(name, args, kwargs)``. In a chain, the previous step's result is passed as
    the first argument, before ``args``, unless the signature is ``immutable``
    (``task.si(...)``): it is then called with its own arguments only (as an error callback,
    without the workflow id). ``priority``, ``delay`` (seconds, counted from when the step is
    enqueued) and ``retry`` (retries after a failure, instead of the task's own ``retry``) are
    options of the call, set with :meth:`set` or ``app.signature(...)``; the ``delay`` option
    is kept as :attr:`delay_seconds`, since ``sig.delay()`` is Celery's call (refused here, as
    :meth:`apply_async`)."""

    task_name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    priority: int | None = None
    delay_seconds: float | None = None
    retry: int | None = None
    immutable: bool = False

    def __post_init__(self) -> None:
        name = self.task_name
        if self.priority is not None:
            priority = check_priority(
                self.priority, f"signature of {name!r}: priority", TaskDeclarationError
            )
            if priority is not self.priority:  # an IntEnum member, as its int
                object.__setattr__(self, "priority", priority)
        if self.delay_seconds is not None:
            what = f"signature of {name!r}: delay"
            seconds = check_delay(self.delay_seconds, what, TaskDeclarationError)
            if seconds > FAR_AHEAD:  # a workflow's steps are enqueued without add_task's check
                raise far_ahead(what, seconds, seconds, "seconds", TaskDeclarationError)
        if self.retry is not None and (
            not isinstance(self.retry, int) or isinstance(self.retry, bool) or self.retry < 0
        ):
            raise TaskDeclarationError(f"signature of {name!r}: retry must be an int >= 0")
        if not isinstance(self.immutable, bool):
            raise TaskDeclarationError(f"signature of {name!r}: immutable must be a bool")

    def set(
        self,
        *,
        priority: int | None = None,
        delay: float | None = None,
        retry: int | None = None,
        immutable: bool | None = None,
        **unknown: Any,
    ) -> Signature:
        """A copy with these options changed; an option it does not have raises
        :class:`~qtasks.errors.TaskDeclarationError` (Celery's ``countdown`` is ``delay``)."""
        if unknown:
            option = next(iter(unknown))
            hint = _CELERY_OPTIONS.get(option)
            raise TaskDeclarationError(
                f"signature of {self.task_name!r}: unknown option {option!r}"
                + (f" ({hint})" if hint else "")
                + "; its options are priority, delay, retry and immutable"
            )
        changes: dict[str, Any] = {}
        for option, value in (
            ("priority", priority),
            ("delay_seconds", delay),
            ("retry", retry),
            ("immutable", immutable),
        ):
            if value is not None:
                changes[option] = value
        return replace(self, **changes)

    def __or__(self, other: Node) -> Chain:
        """``a.s() | b.s()`` is ``chain(a.s(), b.s())``."""
        return chain(self, other)

    def apply_async(self, *args: Any, **options: Any) -> None:
        """Refused: ``app.run_workflow(sig)`` runs it."""
        raise _run_it_with_the_app(f"{self.task_name}.s(...).apply_async()")

    def delay(self, *args: Any, **kwargs: Any) -> None:
        """Refused, as Celery's call: ``app.run_workflow(sig)`` runs it (the ``delay``
        option is ``sig.set(delay=seconds)``, read back as :attr:`delay_seconds`)."""
        raise _run_it_with_the_app(f"{self.task_name}.s(...).delay()")


@dataclass(slots=True)
class Chain:
    """Steps run one after the other; each gets the previous step's result first."""

    tasks: list[Node]

    def __or__(self, other: Node) -> Chain:
        """``chain(...) | b.s()``: this chain, then ``b``."""
        return chain(self, other)

    def apply_async(self, *args: Any, **options: Any) -> None:
        """Refused, as Celery's canvas call: ``app.run_workflow(...)`` runs it."""
        raise _run_it_with_the_app("chain(...).apply_async()")

    def delay(self, *args: Any, **kwargs: Any) -> None:
        """Refused, as Celery's canvas call: ``app.run_workflow(...)`` runs it."""
        raise _run_it_with_the_app("chain(...).delay()")


@dataclass(slots=True)
class Group:
    """Members run in parallel; the group's result is the list of their results, in input
    order."""

    tasks: list[Node]

    def __or__(self, other: Node) -> Chain:
        """``group(...) | cb.s()``: ``cb`` gets the group's results (a chord)."""
        return chain(self, other)

    def apply_async(self, *args: Any, **options: Any) -> None:
        """Refused, as Celery's canvas call: ``app.run_workflow(...)`` runs it."""
        raise _run_it_with_the_app("group(...).apply_async()")

    def delay(self, *args: Any, **kwargs: Any) -> None:
        """Refused, as Celery's canvas call: ``app.run_workflow(...)`` runs it."""
        raise _run_it_with_the_app("group(...).delay()")


@dataclass(slots=True)
class Chord:
    """A group, then ``callback`` with the list of the group's results once every member
    succeeded."""

    header: Group
    callback: Node

    def __or__(self, other: Node) -> Chain:
        """``chord(...) | b.s()``: ``b`` gets the callback's result."""
        return chain(self, other)

    def apply_async(self, *args: Any, **options: Any) -> None:
        """Refused, as Celery's canvas call: ``app.run_workflow(...)`` runs it."""
        raise _run_it_with_the_app("chord(...).apply_async()")

    def delay(self, *args: Any, **kwargs: Any) -> None:
        """Refused, as Celery's canvas call: ``app.run_workflow(...)`` runs it."""
        raise _run_it_with_the_app("chord(...).delay()")


Node: TypeAlias = Signature | Chain | Group | Chord
"""Anything a workflow is built of."""


@dataclass(frozen=True, slots=True)
class ChordHeader:
    """``chord(header)`` without its callback (Celery's ``chord(header)(callback)`` form):
    not a workflow yet; called with the callback, it is the :class:`Chord`."""

    header: Group

    def __call__(self, callback: Node) -> Chord:
        """``chord(header)(cb.s())``: the same chord as ``chord(header, cb.s())``."""
        return Chord(self.header, as_node(callback))


def as_signature(value: Any, what: str, error: type[QTasksError] = WorkflowError) -> Signature:
    """``value`` when it is a :class:`Signature`, else ``error`` saying that ``what`` takes
    one (the usual mistake: a task itself, ``alert`` for ``alert.s()``)."""
    if isinstance(value, Signature):
        return value
    raise error(f"{what} expects a signature (task.s(...)), not {value!r:.80}")


def as_node(value: Any) -> Node:
    """``value`` when a workflow can be built of it, else a :class:`WorkflowError` saying why."""
    if isinstance(value, Signature | Chain | Group | Chord):
        return value
    if isinstance(value, ChordHeader):
        raise WorkflowError(
            "chord(header) has no callback yet: call it with one, chord(header)(cb.s()), or "
            "write chord(header, cb.s())"
        )
    raise WorkflowError(
        f"a workflow is built of signatures (task.s(...)), chain, group and chord, not {value!r}"
    )


def _nodes(items: tuple[Node | Iterable[Node], ...]) -> list[Node]:
    """The nodes of ``chain(...)``'s or ``group(...)``'s arguments, an iterable of nodes
    (a list, a generator) standing for its items, as in Celery."""
    nodes: list[Node] = []
    for item in items:
        if isinstance(item, Signature | Chain | Group | Chord):
            nodes.append(item)
        elif isinstance(item, Iterable):
            nodes.extend(as_node(t) for t in item)
        else:
            nodes.append(as_node(item))
    return nodes


def chain(*tasks: Node | Iterable[Node]) -> Chain:
    """``chain(a.s(1), b.s(), c.s())``: ``c(b(a(1)))``, each step enqueued by the worker that
    finished the previous one. Celery's ``chain([a.s(1), b.s()])`` is the same chain."""
    steps = _nodes(tasks)
    if not steps:
        raise WorkflowError("a chain needs at least one step")
    return Chain(steps)


def group(*tasks: Node | Iterable[Node]) -> Group:
    """``group(a.s(1), a.s(2))`` or ``group(a.s(i) for i in range(10))``: run in parallel;
    the result is the list of the members' results."""
    members = _nodes(tasks)
    if not members:
        raise WorkflowError("a group needs at least one member")
    return Group(members)


@overload
def chord(header: Group | Iterable[Node], callback: Node) -> Chord: ...


@overload
def chord(header: Group | Iterable[Node]) -> ChordHeader: ...


def chord(header: Group | Iterable[Node], callback: Node | None = None) -> Chord | ChordHeader:
    """``chord(group(...), cb.s())``: ``cb(results)`` once every member succeeded; Celery's
    ``chord(group(...))(cb.s())`` builds the same chord."""
    members = header if isinstance(header, Group) else group(header)
    if callback is None:
        return ChordHeader(members)
    return Chord(members, as_node(callback))


def signature(
    app: AsyncQueueTasks,
    task_name: str,
    args: Iterable[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    priority: int | None = None,
    delay: float | None = None,
    retry: int | None = None,
    immutable: bool = False,
) -> Signature:
    """A signature of the task registered as ``task_name`` on ``app``; an unknown name raises
    :class:`~qtasks.errors.UnknownTaskError` here, a bad option
    :class:`~qtasks.errors.TaskDeclarationError`."""
    if task_name not in app.tasks:
        raise UnknownTaskError(task_name, app.tasks)
    return Signature(task_name, tuple(args), dict(kwargs or {}), priority, delay, retry, immutable)
