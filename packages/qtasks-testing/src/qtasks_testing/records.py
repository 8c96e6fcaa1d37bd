"""What the harness records: the tasks the app enqueued (and assertions on them), and how a
failed task is reported."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qtasks.messages import Serializer
from qtasks.models import to_wire
from qtasks.record import TaskRecord
from qtasks.task import TaskDef
from qtasks.workflows.plan import WORKFLOW_TASK


@dataclass(frozen=True, slots=True)
class EnqueuedTask:
    """One task the app enqueued while the harness was installed (``add_task``, each task of
    ``add_tasks``, each member of a workflow), as stored (after enqueue hooks ran), its
    arguments as the task receives them (see :func:`as_received`)."""

    uuid: str
    task_name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    eta: float | None = None

    def matches(self, task_name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
        return (self.task_name, self.args, self.kwargs) == (task_name, list(args), kwargs)

    def describe(self) -> str:
        call = ", ".join([*map(repr, self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())])
        return f"{self.task_name}({call})"


def as_received(
    serializer: Serializer, args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """``args`` and ``kwargs`` as a task's message delivers them: through ``serializer``, the
    app's (with JSON a tuple comes as a list; a pydantic model is its dict, as the enqueue
    stores it, validated into the model only as the task is called). Arguments it cannot
    encode are returned as given: their enqueue fails on its own."""
    wire = [to_wire(value) for value in args], {k: to_wire(v) for k, v in kwargs.items()}
    try:
        received = serializer.loads(serializer.dumps(list(wire)))
    except Exception:  # any: a serializer of the user's may raise what it likes
        return list(args), dict(kwargs)
    return list(received[0]), dict(received[1])


def task_name_of(task: str | TaskDef[..., Any]) -> str:
    """The registered name of ``task`` (a name or a ``@app.task`` function)."""
    return task if isinstance(task, str) else task.name


def describe(record: TaskRecord) -> str:
    """``name(args) [uuid]`` of a record."""
    call = EnqueuedTask(record.uuid, record.task_name, list(record.args), dict(record.kwargs))
    return f"{call.describe()} [{record.uuid}]"


def failure_message(record: TaskRecord) -> str:
    """A message naming the failed task, its call and its traceback (and its workflow, for a
    member of one)."""
    text = f"task {describe(record)} failed: {record.error}"
    if record.traceback:
        text += "\n\nTask traceback:\n" + record.traceback.rstrip()
    if record.workflow is not None and record.task_name != WORKFLOW_TASK:
        text += (
            f"\n\nIt is a member of workflow {record.workflow} (app.get_workflow() reads its "
            "state); a step fed the result of the steps before it shows None in that "
            "argument's place until it ended."
        )
    return text


CHILD_NOTE = (
    "It was enqueued while another task ran. As in production, its failure did not reach "
    "the task that enqueued it: the harness reports it when the call of the test that ran "
    "both returns."
)


class EnqueuedLog:
    """The tasks enqueued while a harness is installed, in order, and assertions on them."""

    _enqueued: list[EnqueuedTask]

    def _received(
        self, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """``args`` and ``kwargs`` as the app's tasks receive them (see :func:`as_received`)."""
        return list(args), dict(kwargs)

    def enqueued(self, task: str | TaskDef[..., Any] | None = None) -> list[EnqueuedTask]:
        """Every task the app enqueued since the harness started (of ``task`` only, if given),
        in order: ``add_task``, each task of ``add_tasks``, each member of a workflow (when
        ``run_workflow`` stores it). An ``add_task`` that a unique key deduplicated enqueued
        nothing."""
        if task is None:
            return list(self._enqueued)
        name = task_name_of(task)
        self._check_name(name)
        return [item for item in self._enqueued if item.task_name == name]

    def assert_enqueued(
        self, task: str | TaskDef[..., Any], /, *args: Any, **kwargs: Any
    ) -> EnqueuedTask:
        """Assert ``task`` was enqueued (with exactly these arguments, if any are given,
        compared as the task receives them: ``(3, 4)`` and ``[3, 4]`` match alike with JSON)."""
        name, calls = self._calls(task, args, kwargs)
        if not calls:
            wanted = name
            if args or kwargs:
                wanted = EnqueuedTask("", name, list(args), kwargs).describe()
            raise AssertionError(
                f"{wanted} was not enqueued; enqueued: {self._summary()}{self._elsewhere(name)}"
            )
        return calls[-1]

    def assert_not_enqueued(
        self, task: str | TaskDef[..., Any], /, *args: Any, **kwargs: Any
    ) -> None:
        """Assert ``task`` was not enqueued (with these arguments, if any are given)."""
        _, calls = self._calls(task, args, kwargs)
        if calls:
            raise AssertionError(
                f"{calls[0].describe()} was enqueued {len(calls)} time(s); "
                f"enqueued: {self._summary()}"
            )

    def _calls(
        self, task: str | TaskDef[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[str, list[EnqueuedTask]]:
        """The task's name, and its enqueued calls (with these arguments, if any are given)."""
        name = task_name_of(task)
        calls = self.enqueued(name)
        if args or kwargs:
            wanted, named = self._received(args, kwargs)
            calls = [c for c in calls if c.matches(name, wanted, named)]
        return name, calls

    def _check_name(self, name: str) -> None:
        """Refuse a name that is likely a typo (see :meth:`Harness._check_name`)."""

    def _elsewhere(self, name: str) -> str:
        """What to add to a failed :meth:`assert_enqueued` of ``name`` when the app under test
        has no such task (see :meth:`Harness._elsewhere`)."""
        return ""

    def _summary(self) -> str:
        return ", ".join(item.describe() for item in self._enqueued) or "nothing"
