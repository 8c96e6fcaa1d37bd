"""What every settle path does once a final record was written or refused: the hooks after
the save, the ack, the workflow's continuation, and the case of a refused write (another
attempt owns the task, or it ended meanwhile). Used by :mod:`qtasks.settle` (a runner's own
settle) and :mod:`qtasks.settle_batch` (the batched one)."""

from __future__ import annotations

import logging
import time
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any

from qtasks.components import Delivery
from qtasks.record import TaskRecord, TaskStatus
from qtasks.workflows import runtime as workflows

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks.worker")


async def refused(
    app: AsyncQueueTasks, record: TaskRecord, delivery: Delivery, ack: Delivery | None
) -> None:
    """A write of ``record`` by ``delivery``'s run was refused: either a newer attempt owns
    the task (nothing to do), or the stored record is already final, e.g. cancelled from
    another process while the task ran. Then the task is over: ``record`` takes the stored
    state, ``ack`` (``None`` when the refusing call acked already) is acked, and a cancel
    fires ``qtasks_task_cancelled`` once, here."""
    stored = await app.storage.get(record.uuid)
    if stored is None or not stored.status.final or stored.token not in (None, delivery.token):
        log.warning("result of %s refused: a newer attempt owns the task", record.uuid)
        return
    if stored.workflow is not None:
        # The member ended otherwise (cancelled while it ran): its workflow learns it here,
        # unless app.cancel told it first (``again``: what that published is not sent twice).
        await workflows.member_ended(app, stored, again=True)
    if ack is not None:
        await ack.ack()
    for name in _RECORD_FIELDS:
        setattr(record, name, getattr(stored, name))
    if stored.status is TaskStatus.CANCEL:
        reason = stored.cancel_reason or "cancelled"
        log.info(
            "task %s was cancelled while it ran (%s): its result is dropped", record.uuid, reason
        )
        await app.hooks.notify("qtasks_task_cancelled", app=app, record=record, reason=reason)
    else:
        log.warning(
            "result of %s dropped: the task had already ended (%s)",
            record.uuid,
            stored.status.value,
        )


_RECORD_FIELDS = tuple(f.name for f in dataclass_fields(TaskRecord))


async def stored_final(
    app: AsyncQueueTasks,
    record: TaskRecord,
    saved: bool,
    delivery: Delivery,
    ack: Delivery | None,
) -> bool:
    """After the final save of ``record`` by ``delivery``'s run: its hooks, and the ack of
    ``ack`` (``None`` when the save already acked). Returns ``saved``."""
    if not saved:
        await refused(app, record, delivery, ack)
        return False
    hooks = app.hooks
    if "qtasks_storage_saved" in hooks.active:
        await hooks.notify("qtasks_storage_saved", app=app, record=record)
    if ack is not None:
        if record.workflow is not None:
            # Not folded into the save by a shared server: the next step is published (and
            # confirmed) before the ack, so a worker dying in between leaves the message to
            # be redelivered and continued by whoever gets it (workflows.found_final). A
            # cancelled member's workflow was told by app.cancel already (it published the
            # error step with a new generation): this save of the same cancel is a repeat,
            # whose publish must not replace that copy with an older-generation one.
            await workflows.member_ended(app, record, again=record.status is TaskStatus.CANCEL)
        await ack.ack()
    if "qtasks_broker_acked" in hooks.active:
        await hooks.notify("qtasks_broker_acked", app=app, record=record)
    return True


def succeeded(record: TaskRecord, result: Any) -> None:
    record.updated_at = time.time()
    record.status = TaskStatus.SUCCESS
    record.returning = result
    record.error = None
