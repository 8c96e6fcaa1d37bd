"""The settle step: everything after a task's code ran. The final record is stored (fenced by
the delivery's token, retried through a storage outage while the lease holds), the message is
acked, requeued for a retry or handed back, and the hooks after the run fire.

Succeeded tasks of a :class:`~qtasks.components.SharedServer` broker are settled in batches
(:meth:`SharedServer.ack_finals`, one round trip for every task that finished while the
previous call was in flight, see :mod:`qtasks.settle_batch`, which also carries the begin
step with a :class:`~qtasks.components.SettleBegin` broker); every other outcome is settled
by the runner itself. What both do once the final record is written is in
:mod:`qtasks.finals`. A batched call that fails otherwise than for want of a connection is
made again task by task (:meth:`Settlement.settle_alone`), so that a record the server refuses
(:class:`~qtasks.errors.UnstorableRecordError`) ends only its own task, as a runner's does.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from qtasks import poison
from qtasks.cancels import culprit, is_error, is_stray, shielded, stray_error
from qtasks.components import Delivery, delivery_limit, requeue_counting
from qtasks.errors import (
    LeaseLostError,
    PermanentError,
    PluginError,
    TaskCancelledError,
    UnstorableRecordError,
)
from qtasks.executor import TaskRun
from qtasks.finals import refused, stored_final, succeeded
from qtasks.flow import FlowGate
from qtasks.masking import mask_text
from qtasks.messages import Message
from qtasks.outage import Outage, retrying
from qtasks.poison import DEAD_LETTER_TOKEN, without_failures
from qtasks.record import TaskRecord, TaskStatus
from qtasks.settle_batch import SettleBatch
from qtasks.stopping import bounded
from qtasks.teardowns import Teardowns
from qtasks.tracebacks import error_line, failure_summary, task_traceback
from qtasks.workflows import runtime as workflows
from qtasks.workflows.canvas import RETRY_HEADER

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks.worker")


class Settlement:
    """Settles the runs of one worker (see the module docstring)."""

    def __init__(self, outage: Outage, flow: FlowGate) -> None:
        self._outage = outage
        self._flow = flow
        self.give_up_at = math.inf
        """When a stopping worker stops retrying final saves through an outage."""
        self._batch: SettleBatch | None = None
        self.teardowns = Teardowns()
        """What runs registered with :meth:`TaskRun.on_close`, torn down as they settle."""
        self.noticing = False
        """Whether the worker's consumer tells it of the records ended by the dead letters the
        broker makes itself (:class:`~qtasks.components.BuryNotice`, or a
        :class:`~qtasks.components.BeginOnClaim` claim's ``ended``): then a dead letter whose
        record another consumer ended has had its ``qtasks_task_dead_lettered`` there
        (:func:`qtasks.poison.buried`, :func:`qtasks.poison.dead_lettered`)."""

    def open_batch(self, app: AsyncQueueTasks, concurrency: int) -> SettleBatch | None:
        """The batch settler of a worker serving ``concurrency`` tasks at once, when the app
        has a shared server (``None`` otherwise); its ``serve`` must run while the worker
        serves."""
        shared = app.shared_server
        self._batch = (
            None
            if shared is None
            else SettleBatch(
                app,
                shared,
                2 * concurrency,
                self._outage,
                lambda: time.monotonic() > self.give_up_at,
                self.settle_alone,
            )
        )
        self.give_up_at = math.inf
        return self._batch

    def close_batch(self) -> None:
        self._batch = None

    @property
    def folding(self) -> SettleBatch | None:
        """The open batch when it carries the begin step too (a remote
        :class:`~qtasks.components.SettleBegin` broker), else ``None``."""
        batch = self._batch
        return batch if batch is not None and batch.folds_begins else None

    def held(self) -> list[TaskRun]:
        """Runs whose code ended and whose settling waits in the batch (leases to renew)."""
        return [] if self._batch is None else self._batch.held()

    async def settle(
        self,
        app: AsyncQueueTasks,
        run: TaskRun,
        delivery: Delivery,
        result: Any,
        outcome: BaseException | None,
        *,
        cancelled: bool,
    ) -> None:
        """Everything after the task's code: teardown hook, final record, ack, after-hook."""
        record = run.record
        hooks = app.hooks
        # On every path (lease lost and shutdown requeue too): task-scoped resources
        # (Depends) are torn down here, so it must never be skipped (later, for a sync thread
        # given up on that still runs: see qtasks.teardowns).
        if run.closers is not None:
            run.ended_by = _ended_by(run, outcome, cancelled)
            await self.teardowns.close(run)
        if "qtasks_executor_closed" in hooks.active:
            await hooks.notify("qtasks_executor_closed", app=app, record=record, run=run)
        if run.lease_lost:
            log.warning(
                "task %s (%s): its lease was lost, its result dropped: its message is "
                "delivered again (to this worker or another)",
                record.task_name,
                record.uuid,
            )
        elif cancelled:
            await self._settle_cancelled(app, run, delivery)
        elif outcome is None and self._batch is not None:
            if not await self._dead_lettered(app, run, delivery):
                # Succeeded: the batch stores the result and acks with other tasks' in one
                # call and fires the remaining hooks; the runner's slot is free meanwhile.
                succeeded(record, result)
                await self._batch.put(run, delivery)
                return
        else:
            # Not shielded: if the worker is torn down here, the message is simply not acked
            # and comes back after its lease (at-least-once), so no extra cancel scope per task.
            await self._finish(app, run, delivery, result, outcome)
        if "qtasks_worker_execute_after" in hooks.active:
            await hooks.notify("qtasks_worker_execute_after", app=app, record=run.record, run=run)

    async def settle_shielded(
        self,
        app: AsyncQueueTasks,
        run: TaskRun,
        delivery: Delivery,
        result: Any,
        outcome: BaseException | None,
        *,
        cancelled: bool,
    ) -> None:
        """:meth:`settle` shielded (:func:`~qtasks.cancels.shielded`), for a run whose
        runner's scope is cancelled (``app.cancel`` of the running task, the stop's hand-back,
        a cancel as it finished). A component's own ``CancelledError`` in there is raised as a
        :class:`~qtasks.errors.StrayCancellationError` naming the component: a failure of the
        settle step as any other (the worker hands the message back, counted, see
        :mod:`qtasks.poison`). Let through, it was taken for the runner's cancellation: the
        settle ended without a word and the message waited for its lease."""
        # Bounded within the shield by a stop's deadline (none otherwise): a backend that
        # does not answer by then leaves the run's message to its lease.
        with shielded(), bounded("settles of cancelled running tasks"):
            try:
                await self.settle(app, run, delivery, result, outcome, cancelled=cancelled)
            except BaseException as exc:
                if not is_stray(exc):
                    raise
                raise stray_error(_culprit(app, run, exc), exc) from exc

    async def _settle_cancelled(
        self, app: AsyncQueueTasks, run: TaskRun, delivery: Delivery
    ) -> None:
        """The task's code was cancelled: hand it back (worker stopping) or store ``cancel``."""
        reason = run.cancel_reason or "cancelled"
        if reason != "__shutdown__":
            await self._finish(app, run, delivery, None, TaskCancelledError(reason))
            return
        record = run.record
        # Queued again, its token kept (as QueueWorker._give_back does): the fence holds until
        # the next delivery's begin replaces it, so a late result of an older holder whose
        # lease ran out is refused, not stored over a task that never ran again.
        record.status = TaskStatus.NEW
        if not await app.storage.save(record, fence=delivery.token):
            await refused(app, record, delivery, delivery)
            return
        await self._flow.hand_back(app, delivery.token, run.abandoned)
        # Counted: a message whose runs keep stopping their workers reaches its limit.
        await requeue_counting(delivery, "kept")
        await app.hooks.notify("qtasks_broker_requeued", app=app, delivery=delivery, delay=None)

    async def settle_alone(self, app: AsyncQueueTasks, run: TaskRun, delivery: Delivery) -> None:
        """Settle a succeeded ``run`` of a batch whose call failed (not an outage) as a runner
        settles its own, so that a record the server refuses ends only its own task. A failure
        here is a component's, as in :meth:`QueueWorker._process`: handed back, counted; a
        component's own ``CancelledError`` too (a :class:`~qtasks.errors.StrayCancellationError`
        naming it), so that the next tasks of the batch are still settled."""
        try:
            await self._finish(app, run, delivery, run.record.returning, None)
        except ConnectionError:
            pass  # an outage past the shutdown grace: not acked, back after its lease
        except BaseException as exc:
            if not is_error(exc):
                raise  # the worker is stopping
            error = exc if isinstance(exc, Exception) else stray_error(_culprit(app, run, exc), exc)
            try:
                await poison.failed(app, delivery, error)
            except BaseException as failed:
                if not is_error(failed):
                    raise
                log.error("could not hand message %s back", delivery.id, exc_info=failed)

    async def _finish(
        self,
        app: AsyncQueueTasks,
        run: TaskRun,
        delivery: Delivery,
        result: Any,
        outcome: BaseException | None,
    ) -> None:
        """Store the record ``outcome`` leaves (final, or a retry's) and ack or requeue the
        message. A record the storage refuses for what it holds (:class:`UnstorableRecordError`,
        see :meth:`_store`) ends the task ``error`` with the reason, without its result and not
        retried, instead of running it again to meet the same refusal.

        ``qtasks_executor_error`` fires once a run: with what the task raised, before the
        retry decision; the refusal of its retry or error record that follows does not fire it
        again (``qtasks_task_failed`` gets the refusal). A task that raised nothing (a refused
        result, a refused ``cancel`` record) fires it with the refusal."""
        try:
            await self._finish_once(app, run, delivery, result, outcome)
        except UnstorableRecordError as exc:
            if isinstance(outcome, UnstorableRecordError):
                raise  # even that record is refused: handed back, counted (qtasks.poison)
            log.warning("task %s: %s; it ends as error", run.record.uuid, exc)
            run.record.returning = None
            noted = outcome is not None and not isinstance(outcome, TaskCancelledError)
            await self._finish_once(app, run, delivery, None, exc, noted=noted)

    async def _finish_once(
        self,
        app: AsyncQueueTasks,
        run: TaskRun,
        delivery: Delivery,
        result: Any,
        outcome: BaseException | None,
        *,
        noted: bool = False,
    ) -> None:
        """:meth:`_finish` once; ``noted``: ``qtasks_executor_error`` fired for this run
        already."""
        record, hooks, task = run.record, app.hooks, run.task
        if outcome is None:
            succeeded(record, result)
            saved = await self._save_final(app, run, delivery)
            if saved and "qtasks_task_succeeded" in hooks.active:
                await hooks.notify("qtasks_task_succeeded", app=app, record=record)
            return
        record.updated_at = time.time()
        if isinstance(outcome, TaskCancelledError):
            record.status = TaskStatus.CANCEL
            record.cancel_reason = outcome.reason
            if await self._save_final(app, run, delivery):
                await hooks.notify(
                    "qtasks_task_cancelled", app=app, record=record, reason=outcome.reason
                )
            return
        record.traceback = task_traceback(outcome)
        record.error = error_line(outcome)
        if not noted:
            await hooks.notify("qtasks_executor_error", app=app, record=record, exc=outcome)
        delay: float | None = None
        if not isinstance(outcome, PermanentError):
            headers = run.message.headers
            if headers and RETRY_HEADER in headers:  # a signature's own retry=
                task = task.with_options(retry=headers[RETRY_HEADER])
            try:
                delay = hooks.decide(
                    "qtasks_task_retry_delay", app=app, task=task, record=record, exc=outcome
                )
            except PluginError as exc:
                log.error("%s", exc)
        if delay is not None:
            record.status = TaskStatus.RETRY
            due, record.eta = record.eta, time.time() + delay
            try:
                stored = await self._store(
                    app, run, lambda: app.storage.save(record, fence=delivery.token)
                )
            except UnstorableRecordError:
                record.eta = due  # not due again: the error record _finish stores says so
                raise
            if not stored:
                await refused(app, record, delivery, delivery)
                return
            next_message = Message(
                uuid=run.message.uuid,
                task_name=run.message.task_name,
                args=run.message.args,
                kwargs=run.message.kwargs,
                priority=run.message.priority,
                created_at=run.message.created_at,
                attempt=record.attempt,
                headers=without_failures(run.message.headers),
            )
            body = app.codec.encode(next_message).body
            await self._flow.hand_back(app, delivery.token, run.abandoned)
            await delivery.requeue(delay=delay, body=body)
            log.info(
                "task %s (%s) failed on attempt %d, retrying in %.3f s: %s",
                record.task_name,
                record.uuid,
                record.attempt,
                delay,
                mask_text(record.error or ""),
            )
            await hooks.notify(
                "qtasks_worker_task_retry", app=app, record=record, exc=outcome, delay=delay
            )
            await hooks.notify("qtasks_broker_requeued", app=app, delivery=delivery, delay=delay)
            return
        record.status = TaskStatus.ERROR
        if await self._save_final(app, run, delivery):
            # What a person running the worker looks for first; masked as qtasks masks what
            # it did not write itself (an exception's text often quotes a URL with a password).
            why, frames = failure_summary(outcome)
            log.error(
                "task %s (%s) failed: %s%s%s",
                record.task_name,
                record.uuid,
                mask_text(record.error or ""),
                mask_text(why),
                "\n" + mask_text(frames).rstrip() if frames else "",
            )
            await hooks.notify("qtasks_task_failed", app=app, record=record, exc=outcome)

    async def _save_final(self, app: AsyncQueueTasks, run: TaskRun, delivery: Delivery) -> bool:
        record, storage, shared = run.record, app.storage, app.shared_server
        if await self._dead_lettered(app, run, delivery):
            return False
        # A workflow member of a shared server: the ids of the steps its settle enqueued,
        # for the hook.
        hook = record.workflow is not None and "qtasks_task_enqueued" in app.hooks.active
        enqueued: list[str] | None = [] if hook and shared is not None else None
        if shared is None:
            saved = await self._store(app, run, lambda: storage.save(record, fence=delivery.token))
        elif enqueued is None:
            saved = await self._store(app, run, lambda: shared.ack_final(delivery, storage, record))
        else:
            saved = await self._store(
                app, run, lambda: shared.ack_final(delivery, storage, record, enqueued=enqueued)
            )
        if enqueued:
            await workflows.announce(app, enqueued)
        return await stored_final(app, record, saved, delivery, None if shared else delivery)

    async def _dead_lettered(self, app: AsyncQueueTasks, run: TaskRun, delivery: Delivery) -> bool:
        """Whether ``delivery`` was the message's last allowed one and its lease is gone: the
        broker dead-letters the message at its next claim, so the record says so (fenced by
        the delivery's token) instead of taking a result that contradicts it. Costs a lease
        renewal, on the last allowed delivery only. The limit is the broker's
        (:func:`~qtasks.components.delivery_limit`), the one its claim dead-letters by."""
        limit = delivery_limit(app.broker, app.config)
        if delivery.attempt < limit or await self._durable(run, delivery.extend):
            return False
        record = run.record
        log.warning(
            "lease of task %s was lost on its last allowed delivery: it is dead-lettered and "
            "its result dropped",
            record.uuid,
        )
        record.status, record.returning, record.token = TaskStatus.ERROR, None, DEAD_LETTER_TOKEN
        record.error = (
            "dead-lettered: delivery limit reached: the lease of its last allowed delivery ran "
            f"out (max_deliveries={limit})"
        )
        record.updated_at = time.time()
        saved = await self._store(app, run, lambda: app.storage.save(record, fence=delivery.token))
        if saved and record.workflow is not None:
            # ``again``: the message's lease is gone, so another worker's claim may have
            # dead-lettered it meanwhile and counted the member already (publishing the error
            # step, which may be running by now): what is sent here must not replace it.
            await workflows.member_ended(app, record, again=True)
        # Once per message: a refused save under a notice or a begun claim (the consumer that
        # dead-lettered the message ended the record and fired it) fires nothing here.
        if (saved or not self.noticing) and "qtasks_task_dead_lettered" in app.hooks.active:
            await app.hooks.notify(
                "qtasks_task_dead_lettered", app=app, record=record, reason=record.error
            )
        return True

    async def _store(
        self, app: AsyncQueueTasks, run: TaskRun, call: Callable[[], Awaitable[bool]]
    ) -> bool:
        """A write of ``run``'s record (final, a retry's, a dead letter's) by ``call``, made
        :meth:`_durable`. The one place that tells a refusal of the record itself from an
        outage: an error that is not an ``OSError`` (Redis: a value over
        ``proto-max-bulk-len``, an error reply; a value the storage cannot encode) is raised
        as :class:`UnstorableRecordError`, since the same save fails again."""
        try:
            return await self._durable(run, call)
        except OSError:
            raise  # an outage (past its retries), not the record's fault
        except Exception as exc:
            raise _unstorable(app, run.record, exc) from None

    async def _durable(self, run: TaskRun, call: Callable[[], Awaitable[bool]]) -> bool:
        """A final write of ``run``, retried through a storage outage while its lease holds
        (the renewal pass marks it lost) and, once the worker stops, within the shutdown
        grace: a result already computed is not thrown away for a few seconds of outage."""
        return await retrying(
            call, self._outage, lambda: run.lease_lost or time.monotonic() > self.give_up_at
        )


def _unstorable(app: AsyncQueueTasks, record: TaskRecord, exc: Exception) -> UnstorableRecordError:
    """The error a task ends with when the storage refused its ``record`` with ``exc``:
    what was refused (a result's encoded size, which is the usual cause), and the server's
    reason, masked (:func:`~qtasks.masking.mask_text`)."""
    if record.status is TaskStatus.SUCCESS:
        try:
            size = len(app.codec.serializer.dumps(record.returning))
        except Exception:
            what = "the result"
        else:
            what = f"the result ({size:,} bytes encoded)"
    else:
        what = f"its {record.status.value} record"
    return UnstorableRecordError(record.uuid, what, mask_text(error_line(exc)))


def _culprit(app: AsyncQueueTasks, run: TaskRun, exc: BaseException) -> str:
    """Who raised the stray cancellation ``exc`` while ``run`` was settled (see
    :func:`~qtasks.cancels.culprit`: the settle calls nothing else but components and
    hooks, which log their own)."""
    uuid = run.record.uuid
    return culprit(
        app, exc, run.delivery, f"settling task {uuid}", f"a component settling task {uuid}"
    )


def _ended_by(run: TaskRun, outcome: BaseException | None, cancelled: bool) -> BaseException | None:
    """:attr:`TaskRun.ended_by`: what a task-scoped teardown is told."""
    if run.lease_lost:
        return LeaseLostError(f"the lease of task {run.record.uuid} was lost: result dropped")
    if cancelled:
        reason = run.cancel_reason or "cancelled"
        if reason == "__shutdown__":
            reason = "the worker stopped: the task is handed back and runs again"
        return TaskCancelledError(reason)
    return outcome
