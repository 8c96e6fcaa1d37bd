"""Messages the worker cannot run: rejected at once (undecodable, unknown task, wrong
arguments), or handed back after a component or plugin failed on them, later each time, and
dead-lettered when that happened ``max_deliveries`` times; and the records of messages a
broker dead-lettered on its own (:func:`buried`).

A deliberate hand-back resets the broker's delivery count (see
:meth:`qtasks.components.Delivery.requeue`), so the failures are counted in the message itself
(header :data:`FAILURES_HEADER`): without that count, a message on which a component fails
every time (a stored record nothing can read, a storage bug) would come back every second
forever.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from qtasks.components import delivery_limit
from qtasks.config import is_default
from qtasks.errors import SerializationError
from qtasks.messages import Message, new_uuid
from qtasks.record import TaskRecord, TaskStatus, record_of
from qtasks.workflows import runtime as workflows

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.components import Delivery

log = logging.getLogger("qtasks.worker")

FAILURES_HEADER = "worker_failures"
"""Message header: how many times a worker failed (not an outage) while handling it."""


def without_failures(headers: dict[str, object]) -> dict[str, object]:
    """``headers`` without the failure count (a message that got through starts afresh)."""
    if FAILURES_HEADER not in headers:
        return headers
    return {key: value for key, value in headers.items() if key != FAILURES_HEADER}


def tell_limit(app: AsyncQueueTasks) -> bool:
    """Warn when ``config.max_deliveries`` was set to another value than the broker's delivery
    limit (:func:`~qtasks.components.delivery_limit`), which is the one that holds; a default
    ``config.max_deliveries`` is not a choice: no word. Whether it warned."""
    limit, configured = delivery_limit(app.broker, app.config), app.config.max_deliveries
    if configured == limit or is_default("max_deliveries", configured):
        return False
    log.warning(
        "the delivery limit of the broker (%s, max_deliveries=%d) is used, not "
        "config.max_deliveries (%d): messages are dead-lettered after %d deliveries or "
        "failures; set only one of the two",
        type(app.broker).__name__,
        limit,
        configured,
        limit,
    )
    return True


async def reject(
    app: AsyncQueueTasks, delivery: Delivery, reason: str, record: TaskRecord | None
) -> None:
    """Dead-letter ``delivery`` with ``reason``; its record, when given, says ``error``."""
    log.error("rejected message %s: %s", delivery.id, reason)
    if record is not None:
        await _record_rejection(app, record, reason)
    await _dead_letter(app, delivery, reason)


async def _record_rejection(app: AsyncQueueTasks, record: TaskRecord, reason: str) -> None:
    """``record`` says ``error`` with ``reason``; its workflow, if any, learns it."""
    record.status = TaskStatus.ERROR
    record.error = reason
    record.updated_at = time.time()
    await app.storage.save(record)
    if record.workflow is not None:
        await workflows.member_ended(app, record)


async def _dead_letter(app: AsyncQueueTasks, delivery: Delivery, reason: str) -> None:
    await delivery.nack(reason)
    await app.hooks.notify("qtasks_broker_nacked", app=app, delivery=delivery, reason=reason)
    await app.hooks.notify("qtasks_task_rejected", app=app, delivery=delivery, reason=reason)


async def failed(app: AsyncQueueTasks, delivery: Delivery, exc: Exception) -> None:
    """A component or plugin raised ``exc`` while the worker handled ``delivery``: hand it
    back with its failures counted, due after ``retry_backoff * 2**(n-1)`` seconds (capped
    at ``retry_backoff_max``); the failure that reaches the broker's delivery limit
    (:func:`~qtasks.components.delivery_limit`) dead-letters it instead."""
    limit = delivery_limit(app.broker, app.config)
    error = f"{type(exc).__name__}: {exc}"
    try:
        message: Message | None = app.codec.decode(delivery.body)
    except Exception:  # the codec itself fails: no count can be kept in the message
        message = None
    failures = 1
    body: bytes | None = None
    if message is not None:
        count = message.headers.get(FAILURES_HEADER)
        failures += count if type(count) is int and count > 0 else 0
        if failures < limit:
            headers = {**message.headers, FAILURES_HEADER: failures}
            try:
                body = app.codec.encode(dataclasses.replace(message, headers=headers)).body
            except SerializationError:  # no room for the count: dead-lettered now
                body = None
    if body is None:
        log.error(
            "worker failed while handling message %s (failure %d of %d): dead-lettered",
            delivery.id,
            failures,
            limit,
            exc_info=exc,
        )
        await _give_up(app, delivery, message, f"worker failed {failures} times: {error}")
        return
    delay = min(app.config.retry_backoff * 2 ** (failures - 1), app.config.retry_backoff_max)
    log.error(
        "worker failed while handling message %s (failure %d of %d, handed back for %.3g s)",
        delivery.id,
        failures,
        limit,
        delay,
        exc_info=exc,
    )
    await delivery.requeue(delay=delay, body=body)
    if "qtasks_broker_requeued" in app.hooks.active:
        await app.hooks.notify("qtasks_broker_requeued", app=app, delivery=delivery, delay=delay)


async def _give_up(
    app: AsyncQueueTasks, delivery: Delivery, message: Message | None, reason: str
) -> None:
    """Dead-letter ``delivery`` with ``reason``, saying so in its record when the storage
    lets that be read and written (it may be what fails)."""
    record: TaskRecord | None = None
    if message is not None:
        try:
            record = await app.storage.get(message.uuid)
        except Exception:  # unreadable: replaced by one made from the message
            record = None
        if record is None:
            record = record_of(message)
        elif record.status.final:
            record = None  # finished or cancelled meanwhile: it stays as it is
    log.error("rejected message %s: %s", delivery.id, reason)
    if record is not None:
        try:
            await _record_rejection(app, record, reason)
        except Exception:  # the storage may be what fails: the message is given up all the same
            log.exception("could not store the record of message %s", delivery.id)
    await _dead_letter(app, delivery, reason)


DEAD_LETTER_TOKEN = "dead-letter"
"""The token of a record ended because its message was dead-lettered past its delivery limit:
no delivery holds it, so a late result of the message's last holder is refused."""


async def buried(app: AsyncQueueTasks, id: str, reason: str) -> bool:
    """The broker dead-lettered message ``id`` past ``max_deliveries`` without a worker
    seeing it (a :class:`~qtasks.components.BuryNotice` broker): its record, unless final,
    says ``error`` with ``"dead-lettered: <reason>"`` and the token
    :data:`DEAD_LETTER_TOKEN`, its waiters are woken, and its workflow learns it, as a
    :class:`~qtasks.components.BeginOnClaim` broker's claim does in its own round trip; then
    ``qtasks_task_dead_lettered`` fires, as for a dead letter the worker decides itself.
    Never raises: the storage may be what fails, and the consumer goes on. Returns False
    when the record could not be read or written (the storage failed: telling the notice
    again later may end it), else True (ended, or nothing to end; or a record that cannot be
    decoded, which telling again would not change).

    Safe to call again, and at once, for the same ``id`` (a broker may tell a notice again
    from another consumer, see :class:`~qtasks.components.BuryNotice`): the record is ended
    by one call only, and the hook fires once. A record read final is left as it is; the
    ending save is fenced by the token read, which the first ending save replaces. A record
    read without a token (never begun: a fenced save would not be refused) is first taken
    with a token of this call, fenced by it (refused once another call took it), then
    ended fenced by that token (a call that failed after taking it leaves that token, which
    the next call reads and fences by)."""
    try:
        record = await app.storage.get(id)
        if record is None or record.status.final:
            return True
        fence = record.token
        if fence is None:
            fence = record.token = f"{DEAD_LETTER_TOKEN}:{new_uuid()}"
            if not await app.storage.save(record, fence=fence):
                return True  # another call took it (or it ended meanwhile)
        if record.status is TaskStatus.PROCESS:  # its last run began (then), and was lost
            record.started_at = record.updated_at
        record.status = TaskStatus.ERROR
        record.error = f"dead-lettered: {reason}"
        record.token = DEAD_LETTER_TOKEN
        record.updated_at = time.time()
        # Fenced by the token read: a newer delivery's write in between (the message
        # published again) is not overwritten.
        if not await app.storage.save(record, fence=fence):
            return True  # a newer delivery's record: not this dead letter's
    except SerializationError:
        log.exception("could not end the record of dead-lettered message %s", id)
        return True
    except Exception:
        log.exception("could not end the record of dead-lettered message %s", id)
        return False
    try:
        if record.workflow is not None:
            await workflows.member_ended(app, record)
    except Exception:  # the record is ended: told again, it would be found final
        log.exception("could not tell the workflow of dead-lettered message %s", id)
        return True
    await dead_lettered(app, record)
    return True


async def dead_lettered(app: AsyncQueueTasks, record: TaskRecord) -> None:
    """The broker dead-lettered the message of ``record`` on its own and the record was ended
    (``error``, ``"dead-lettered: <reason>"``, token :data:`DEAD_LETTER_TOKEN`), by
    :func:`buried` or by a :class:`~qtasks.components.BeginOnClaim` claim in its own round
    trip (the worker's ``ended``): ``qtasks_task_dead_lettered`` fires. Never raises (errors
    are logged by ``notify``)."""
    if "qtasks_task_dead_lettered" in app.hooks.active:
        await app.hooks.notify(
            "qtasks_task_dead_lettered", app=app, record=record, reason=record.error or ""
        )
