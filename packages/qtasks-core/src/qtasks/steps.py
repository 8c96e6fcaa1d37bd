"""A generator task's stream: the marker it holds besides its steps (:class:`StepsRestarted`)
and the worker's fenced write of a step (:func:`add_step`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qtasks.components import takes_keyword
from qtasks.errors import LeaseLostError, TaskCancelledError
from qtasks.record import TaskStatus

if TYPE_CHECKING:
    from qtasks.components import Storage


@dataclass(frozen=True, slots=True)
class StepsRestarted:
    """In a generator task's stream (``task.stream()``, :meth:`Storage.steps
    <qtasks.components.Storage.steps>`), right before the first step of a run of the task
    that followed steps stored by an earlier run: the task ran again (its worker was lost,
    its lease ran out, or it failed and was retried), and a generator cannot resume, so the
    new run starts over from its first step.

    The steps before the marker were stored by the earlier run (work really done, and not
    undone); those after it are the new run's. A reader that builds something from the steps
    (a progress bar, a running total) resets it here. Every reader sees the same stream, in
    the same order, whenever it starts reading."""

    run: int
    """Which run of the task's code stores the steps that follow: 2 for the first run that
    started over, then 3, 4... Counted over the runs that stored steps (one that stored none
    is not counted). Not :attr:`TaskRecord.attempt <qtasks.record.TaskRecord.attempt>`, which
    counts retries: a redelivery after a lost worker does not raise it."""


async def add_step(storage: Storage, uuid: str, value: Any, fence: str | None) -> int:
    """Store one step of the run of ``uuid`` whose delivery holds the token ``fence`` (``None``
    for a run with no delivery); return its index. When the storage refuses it, this run must
    stop: raises :class:`TaskCancelledError` when the task is over (its record turned final,
    a cancel made as the generator yielded: the worker then settles it as cancelled, which the
    stored final record decides), else :class:`LeaseLostError` (a newer delivery owns the
    task, or its record is gone: the worker drops its result, as for any lost lease)."""
    if fence is None or not takes_keyword(storage, "add_step", "fence"):
        index = await storage.add_step(uuid, value)
    else:
        index = await storage.add_step(uuid, value, fence=fence)
    if index is not None:
        return index
    # Refused: read why, only on this rare path (no cost per step).
    stored = await storage.get(uuid)
    if stored is None:
        raise LeaseLostError(
            f"a step of task {uuid} was refused: its record is not stored (flushed or "
            "expired), so this run stops and its result is dropped"
        )
    if stored.status.final and stored.token in (None, fence):
        raise TaskCancelledError(
            stored.cancel_reason
            if stored.status is TaskStatus.CANCEL and stored.cancel_reason
            else f"the task had already ended ({stored.status.value}): a step after the end "
            "is not stored"
        )
    raise LeaseLostError(
        f"a step of task {uuid} was refused: a newer delivery owns the task, "
        "so this run stops and its result is dropped"
    )
