"""The settle step: everything after a task's code ran. The final record is stored (fenced by
the delivery's token, retried through a storage outage while the lease holds), the message is
acked, requeued for a retry or handed back, and the hooks after the run fire.

Succeeded tasks of a :class:`~qtasks.components.SharedServer` broker are settled in batches
(:meth:`SharedServer.ack_finals`, one round trip for every task that finished while the
previous call was in flight); every other outcome is settled by the runner itself. A broker
that is also a :class:`~qtasks.components.SettleBegin`, and not a local one (see
:mod:`qtasks.components`), takes the begin step of the tasks that start meanwhile into the
same call (:meth:`_Batch.begin`): a busy runner settles one task and begins the next in one
round trip.
"""

from __future__ import annotations

import logging
import math
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any

import anyio

from qtasks.begin import BEGIN_BATCH
from qtasks.components import Delivery, SettleBegin, SharedServer
from qtasks.errors import PluginError, SerializationError, TaskCancelledError
from qtasks.executor import TaskRun
from qtasks.memory import EventFactory, _Signal
from qtasks.messages import Message
from qtasks.outage import RETRY_CAP, Outage, retrying
from qtasks.record import TaskRecord, TaskStatus
from qtasks.workflows import runtime as workflows
from qtasks.workflows.canvas import RETRY_HEADER

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks.worker")

SETTLE_BATCH = 256
"""Most tasks settled in one :meth:`SharedServer.ack_finals` call, so that one call never
holds the server (a Redis script runs alone) for long."""


class Settlement:
    """Settles the runs of one worker (see the module docstring)."""

    def __init__(self, outage: Outage) -> None:
        self._outage = outage
        self.give_up_at = math.inf
        """When a stopping worker stops retrying final saves through an outage."""
        self._batch: _Batch | None = None

    def open_batch(self, app: AsyncQueueTasks, concurrency: int) -> _Batch | None:
        """The batch settler of a worker serving ``concurrency`` tasks at once, when the app
        has a shared server (``None`` otherwise); its ``serve`` must run while the worker
        serves."""
        shared = app.shared_server
        self._batch = (
            None
            if shared is None
            else _Batch(
                app,
                shared,
                2 * concurrency,
                self._outage,
                lambda: time.monotonic() > self.give_up_at,
            )
        )
        self.give_up_at = math.inf
        return self._batch

    def close_batch(self) -> None:
        self._batch = None

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
        # Fired on every path (lease lost and shutdown requeue too): task-scoped resources
        # (Depends) are torn down here, so it must never be skipped.
        if "qtasks_executor_closed" in hooks.active:
            await hooks.notify("qtasks_executor_closed", app=app, record=record, run=run)
        if run.lease_lost:
            log.warning(
                "lease of task %s was lost; another worker owns it now, result dropped",
                record.uuid,
            )
        elif cancelled:
            await self._settle_cancelled(app, run, delivery)
        elif outcome is None and self._batch is not None:
            if not await self._dead_lettered(app, run, delivery):
                # Succeeded: the batch stores the result and acks with other tasks' in one
                # call and fires the remaining hooks; the runner's slot is free meanwhile.
                _succeeded(record, result)
                await self._batch.put(run, delivery)
                return
        else:
            # Not shielded: if the worker is torn down here, the message is simply not acked
            # and comes back after its lease (at-least-once), so no extra cancel scope per task.
            await self._finish(app, run, delivery, result, outcome)
        if "qtasks_worker_execute_after" in hooks.active:
            await hooks.notify("qtasks_worker_execute_after", app=app, record=run.record, run=run)

    async def _settle_cancelled(
        self, app: AsyncQueueTasks, run: TaskRun, delivery: Delivery
    ) -> None:
        """The task's code was cancelled: hand it back (worker stopping) or store ``cancel``."""
        reason = run.cancel_reason or "cancelled"
        if reason != "__shutdown__":
            await self._finish(app, run, delivery, None, TaskCancelledError(reason))
            return
        record = run.record
        record.status = TaskStatus.NEW
        record.token = None
        if not await app.storage.save(record, fence=delivery.token):
            await _refused(app, record, delivery, delivery)
            return
        await delivery.requeue()
        await app.hooks.notify("qtasks_broker_requeued", app=app, delivery=delivery, delay=None)

    async def _finish(
        self,
        app: AsyncQueueTasks,
        run: TaskRun,
        delivery: Delivery,
        result: Any,
        outcome: BaseException | None,
    ) -> None:
        record, hooks, task = run.record, app.hooks, run.task
        if outcome is None:
            _succeeded(record, result)
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
        record.traceback = "".join(traceback.format_exception(outcome))
        record.error = f"{type(outcome).__name__}: {outcome}"
        await hooks.notify("qtasks_executor_error", app=app, record=record, exc=outcome)
        delay: float | None = None
        if not isinstance(outcome, PluginError | SerializationError):
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
            record.eta = time.time() + delay
            if not await self._durable(run, lambda: app.storage.save(record, fence=delivery.token)):
                await _refused(app, record, delivery, delivery)
                return
            next_message = Message(
                uuid=run.message.uuid,
                task_name=run.message.task_name,
                args=run.message.args,
                kwargs=run.message.kwargs,
                priority=run.message.priority,
                created_at=run.message.created_at,
                attempt=record.attempt,
                headers=run.message.headers,
            )
            body = app.codec.encode(next_message).body
            await delivery.requeue(delay=delay, body=body)
            await hooks.notify(
                "qtasks_worker_task_retry", app=app, record=record, exc=outcome, delay=delay
            )
            await hooks.notify("qtasks_broker_requeued", app=app, delivery=delivery, delay=delay)
            return
        record.status = TaskStatus.ERROR
        if await self._save_final(app, run, delivery):
            await hooks.notify("qtasks_task_failed", app=app, record=record, exc=outcome)

    async def _save_final(self, app: AsyncQueueTasks, run: TaskRun, delivery: Delivery) -> bool:
        record, storage, shared = run.record, app.storage, app.shared_server
        if await self._dead_lettered(app, run, delivery):
            return False
        if shared is not None:
            if record.workflow is None or "qtasks_task_enqueued" not in app.hooks.active:
                saved = await self._durable(
                    run, lambda: shared.ack_final(delivery, storage, record)
                )
                return await _stored_final(app, record, saved, delivery, None)
            # A workflow member: the ids of the steps its settle enqueued, for the hook.
            enqueued: list[str] = []
            saved = await self._durable(
                run, lambda: shared.ack_final(delivery, storage, record, enqueued=enqueued)
            )
            await workflows.announce(app, enqueued)
            return await _stored_final(app, record, saved, delivery, None)
        saved = await self._durable(run, lambda: storage.save(record, fence=delivery.token))
        return await _stored_final(app, record, saved, delivery, delivery)

    async def _dead_lettered(self, app: AsyncQueueTasks, run: TaskRun, delivery: Delivery) -> bool:
        """Whether ``delivery`` was the message's last allowed one and its lease is gone: the
        broker dead-letters the message at its next claim, so the record says so (fenced by
        the delivery's token) instead of taking a result that contradicts it. Costs a lease
        renewal, on the last allowed delivery only."""
        limit = app.config.max_deliveries
        if delivery.attempt < limit or await self._durable(run, delivery.extend):
            return False
        record = run.record
        log.warning(
            "lease of task %s was lost on its last allowed delivery: it is dead-lettered and "
            "its result dropped",
            record.uuid,
        )
        record.status, record.returning, record.token = TaskStatus.ERROR, None, "dead-letter"
        record.error = (
            "dead-lettered: delivery limit reached: the lease of its last allowed delivery ran "
            f"out (max_deliveries={limit})"
        )
        record.updated_at = time.time()
        if (
            await self._durable(run, lambda: app.storage.save(record, fence=delivery.token))
            and record.workflow is not None
        ):
            await workflows.member_ended(app, record)
        if "qtasks_task_dead_lettered" in app.hooks.active:
            await app.hooks.notify(
                "qtasks_task_dead_lettered", app=app, record=record, reason=record.error
            )
        return True

    async def _durable(self, run: TaskRun, call: Callable[[], Awaitable[bool]]) -> bool:
        """A final write of ``run``, retried through a storage outage while its lease holds
        (the renewal pass marks it lost) and, once the worker stops, within the shutdown
        grace: a result already computed is not thrown away for a few seconds of outage."""
        return await retrying(
            call, self._outage, lambda: run.lease_lost or time.monotonic() > self.give_up_at
        )


async def _refused(
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
        # The member ended otherwise (cancelled while it ran): its workflow learns it here.
        await workflows.member_ended(app, stored)
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


async def _stored_final(
    app: AsyncQueueTasks,
    record: TaskRecord,
    saved: bool,
    delivery: Delivery,
    ack: Delivery | None,
) -> bool:
    """After the final save of ``record`` by ``delivery``'s run: its hooks, and the ack of
    ``ack`` (``None`` when the save already acked). Returns ``saved``."""
    if not saved:
        await _refused(app, record, delivery, ack)
        return False
    hooks = app.hooks
    if "qtasks_storage_saved" in hooks.active:
        await hooks.notify("qtasks_storage_saved", app=app, record=record)
    if ack is not None:
        if record.workflow is not None:
            # Not folded into the save by a shared server: the next step is published (and
            # confirmed) before the ack, so a worker dying in between leaves the message to
            # be redelivered and continued by whoever gets it (workflows.found_final).
            await workflows.member_ended(app, record)
        await ack.ack()
    if "qtasks_broker_acked" in hooks.active:
        await hooks.notify("qtasks_broker_acked", app=app, record=record)
    return True


def _succeeded(record: TaskRecord, result: Any) -> None:
    record.updated_at = time.time()
    record.status = TaskStatus.SUCCESS
    record.returning = result
    record.error = None


class _Batch:
    """Stores the results of succeeded tasks and acks their messages, many per round trip
    (:meth:`SharedServer.ack_finals`): tasks that finish while one call is in flight go
    together in the next. At most ``limit`` tasks (twice the concurrency: one call in flight,
    the next one filling) wait here; a runner that finds it full waits before its next task.

    With a :class:`SettleBegin` broker (``folds_begins``) the call also begins the records of
    the tasks that start meanwhile (:meth:`begin`), so a busy runner's settle and its next
    begin are one round trip."""

    __slots__ = (
        "_app",
        "_busy",
        "_calling",
        "_done",
        "_give_up",
        "_inflight",
        "_limit",
        "_new_event",
        "_outage",
        "_queue",
        "_ready",
        "_rounds",
        "_settle_begin",
        "_shared",
        "folds_begins",
    )

    def __init__(
        self,
        app: AsyncQueueTasks,
        shared: SharedServer,
        limit: int,
        outage: Outage,
        give_up: Callable[[], bool],
    ) -> None:
        self._app = app
        self._outage = outage
        self._give_up = give_up
        self._inflight: list[tuple[TaskRun, Delivery]] = []
        self._shared = shared
        self._limit = max(limit, 1)
        self._queue: list[tuple[TaskRun, Delivery]] = []
        self._busy = 0
        """Tasks queued or in the call in flight."""
        self._calling = False
        """Whether a call is in flight (made by the serving task or by a beginning runner)."""
        self._ready = _Signal()
        self._done = _Signal()
        self._rounds: list[_Round] = []
        """Begins waiting for a call, in rounds of at most ``BEGIN_BATCH`` (one per call)."""
        self._new_event = EventFactory()
        # Only for a remote broker: folding saves a round trip, and a local one (in memory)
        # makes none, so the hand-over between tasks would be all it added.
        local = getattr(shared, "local", False)
        self._settle_begin = shared if isinstance(shared, SettleBegin) and not local else None
        self.folds_begins = self._settle_begin is not None
        """Whether :meth:`begin` may be used: the broker settles and begins in one call."""

    async def put(self, run: TaskRun, delivery: Delivery) -> None:
        while self._busy >= self._limit:
            await self._done.wait(None)
        self._queue.append((run, delivery))
        self._busy += 1
        self._ready.fire()

    async def begin(self, claim: TaskRecord) -> TaskRecord:
        """:meth:`Storage.begin` of ``claim`` in a call with the settles and begins queued
        meanwhile (only when ``folds_begins``). When no call is in flight the caller makes it
        itself (no hand-over to the serving task: a busy runner settles its task and begins
        its next in one call of its own); else it waits for the next. A record the call could
        not return is begun alone, which raises what ``begin`` raises."""
        rounds = self._rounds
        if not self._calling and not rounds:
            round_ = _Round(self._new_event())
            round_.claims.append(claim)
            rounds.append(round_)
            with anyio.CancelScope(shield=True):  # other tasks' settles ride in this call
                await self._one_call()
            at = 0
        else:
            if not rounds or len(rounds[-1].claims) >= BEGIN_BATCH:
                rounds.append(_Round(self._new_event()))
                self._ready.fire()
            round_ = rounds[-1]
            at = len(round_.claims)
            round_.claims.append(claim)
            try:
                await round_.done.wait()
            except BaseException:
                if not round_.done.is_set():
                    round_.claims[at] = None  # withdrawn: its record is left as it is
                raise
        if round_.error is not None:
            raise round_.error
        record = round_.results[at] if round_.results else None
        if record is None:
            return await self._app.storage.begin(claim)
        return record

    def held(self) -> list[TaskRun]:
        """The runs handed over and not settled yet: their leases are still renewed."""
        return [run for run, _ in self._queue] + [run for run, _ in self._inflight]

    async def drained(self) -> None:
        """Until every task handed over is settled."""
        while self._busy:
            await self._done.wait(None)

    async def serve(self) -> None:
        while True:
            while self._calling or not (self._queue or self._rounds):
                await self._ready.wait(None)
            await self._one_call()

    async def _one_call(self) -> None:
        """One call: the queued settles (up to ``SETTLE_BATCH``) and the first round of
        begins, then the settled tasks' hooks. One call at a time (``_calling``)."""
        self._calling = True
        batch = self._inflight = self._queue[:SETTLE_BATCH]
        del self._queue[:SETTLE_BATCH]
        round_ = self._rounds.pop(0) if self._rounds else None
        try:
            await self._settle(batch, round_)
        except Exception as exc:
            # A bug in a component or plugin must not kill the worker (see _process).
            log.exception("worker failed while settling %d finished tasks", len(batch))
            if round_ is not None and not round_.done.is_set():
                round_.fail(exc)
        finally:
            if round_ is not None:
                round_.done.set()  # without results: each begins alone
            self._calling = False
            self._inflight = []
            self._busy -= len(batch)
            self._done.fire()
            if self._queue or self._rounds:
                self._ready.fire()  # what queued meanwhile goes in the serving task's call

    async def _settle(self, batch: list[tuple[TaskRun, Delivery]], round_: _Round | None) -> None:
        app = self._app
        failures = 0
        # The ids of the workflow steps the call enqueues, when a plugin wants them and the
        # batch holds a workflow member (else the plain call, as before workflows).
        enqueued: list[str] | None = None
        if "qtasks_task_enqueued" in app.hooks.active and any(
            run.record.workflow is not None for run, _ in batch
        ):
            enqueued = []
        claims = [] if round_ is None else round_.take()
        while True:
            # Through an outage, retried while the leases hold (the renewal pass keeps them,
            # or marks them lost: those are another worker's now) and the worker is not past
            # its shutdown grace; one warning for the whole outage. Begins are not retried:
            # their tasks are handed back (see QueueWorker._process).
            batch = [(run, delivery) for run, delivery in batch if not run.lease_lost]
            if not batch and not claims:
                return
            finals = [(delivery, run.record) for run, delivery in batch]
            try:
                saved, begun = await self._call(finals, claims, enqueued)
                break
            except ConnectionError as exc:
                if round_ is not None:
                    round_.fail(exc)
                    round_, claims = None, []
                if not batch:
                    return
                self._outage.failed(exc)
                if self._give_up():
                    return  # not acked: each comes back after its lease (at-least-once)
                failures += 1
                await anyio.sleep(min(RETRY_CAP, 0.05 * 2**failures) * (0.5 + random.random() / 2))
            except Exception as exc:
                if round_ is not None:
                    round_.fail(exc)
                if batch:
                    # Not acked: each message comes back after its lease (at-least-once).
                    log.exception("could not store the results of %d finished tasks", len(batch))
                return
        if round_ is not None:
            round_.finish(begun)  # their tasks start now, not after the hooks below
        if not batch:
            return
        self._outage.ok()
        if enqueued:
            await workflows.announce(app, enqueued)
        hooks = app.hooks
        for (run, _), ok in zip(batch, saved, strict=True):
            record = run.record
            if (
                await _stored_final(app, record, ok, run.delivery, None)
                and "qtasks_task_succeeded" in hooks.active
            ):
                await hooks.notify("qtasks_task_succeeded", app=app, record=record)
            if "qtasks_worker_execute_after" in hooks.active:
                await hooks.notify("qtasks_worker_execute_after", app=app, record=record, run=run)

    async def _call(
        self,
        finals: list[tuple[Delivery, TaskRecord]],
        claims: list[TaskRecord],
        enqueued: list[str] | None,
    ) -> tuple[list[bool], list[TaskRecord | None]]:
        storage = self._app.storage
        if claims:
            assert self._settle_begin is not None  # claims are queued only then
            return await self._settle_begin.ack_finals_begin(
                storage, finals, claims, enqueued=enqueued
            )
        if enqueued is None:
            return await self._shared.ack_finals(storage, finals), []
        return await self._shared.ack_finals(storage, finals, enqueued=enqueued), []


class _Round:
    """The begins that go in one settle call: their claims (``None`` for one withdrawn, its
    task cancelled meanwhile), then their results or the call's error, and one event for all
    of them, not one per task."""

    __slots__ = ("_sent", "claims", "done", "error", "results")

    def __init__(self, done: anyio.Event) -> None:
        self.claims: list[TaskRecord | None] = []
        self.done = done
        self.error: BaseException | None = None
        self.results: list[TaskRecord | None] = []
        self._sent: list[int] = []

    def take(self) -> list[TaskRecord]:
        """The claims to send (those not withdrawn), as the call takes them."""
        self._sent = [at for at, claim in enumerate(self.claims) if claim is not None]
        return [claim for claim in self.claims if claim is not None]

    def finish(self, begun: list[TaskRecord | None]) -> None:
        """The call returned ``begun`` for the claims it took: each waiter gets its own
        (checked: one result per claim sent)."""
        results: list[TaskRecord | None] = [None] * len(self.claims)
        for at, record in zip(self._sent, begun, strict=True):
            results[at] = record
        self.results = results
        self.done.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.done.set()
