"""A generator task's stream: the marker it holds besides its steps (:class:`StepsRestarted`)
and the worker's fenced write of a step (:func:`add_step`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qtasks.components import takes_keyword
from qtasks.errors import LeaseLostError

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
    for a run with no delivery); return its index. Raises :class:`LeaseLostError` when the
    storage refused it: a newer delivery owns the task, so this run must stop (its worker drops
    its result, as for any lost lease)."""
    if fence is None or not takes_keyword(storage, "add_step", "fence"):
        index = await storage.add_step(uuid, value)
    else:
        index = await storage.add_step(uuid, value, fence=fence)
    if index is None:
        raise LeaseLostError(
            f"a step of task {uuid} was refused: a newer delivery owns the task, "
            "so this run stops and its result is dropped"
        )
    return index
