"""The batched settle step: the final records of succeeded tasks stored and their messages
acked many per round trip (:meth:`~qtasks.components.SharedServer.ack_finals`), and, with a
remote :class:`~qtasks.components.SettleBegin` broker, the begin step of the tasks that start
meanwhile in the same call (:meth:`SettleBatch.begin`): a busy runner settles one task and
begins the next in one round trip."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

import anyio

from qtasks.begin import BEGIN_BATCH
from qtasks.cancels import is_error, stray_error
from qtasks.components import Delivery, SettleBegin, SharedServer, provides
from qtasks.executor import TaskRun
from qtasks.finals import stored_final
from qtasks.masking import mask_text
from qtasks.memory import EventFactory, _Signal
from qtasks.outage import RETRY_CAP, Outage
from qtasks.record import TaskRecord
from qtasks.workflows import runtime as workflows

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks.worker")

SETTLE_BATCH = 256
"""Most tasks settled in one :meth:`SharedServer.ack_finals` call, so that one call never
holds the server (a Redis script runs alone) for long."""


class SettleBatch:
    """Stores the results of succeeded tasks and acks their messages, many per round trip
    (:meth:`SharedServer.ack_finals`): tasks that finish while one call is in flight go
    together in the next. At most ``limit`` tasks (twice the concurrency: one call in flight,
    the next one filling) wait here; a runner that finds it full waits before its next task.

    With a :class:`SettleBegin` broker (``folds_begins``) the call also begins the records of
    the tasks that start meanwhile (:meth:`begin`), so a busy runner's settle and its next
    begin are one round trip."""

    __slots__ = (
        "_alone",
        "_app",
        "_busy",
        "_done",
        "_ended",
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
    )

    def __init__(
        self,
        app: AsyncQueueTasks,
        shared: SharedServer,
        limit: int,
        outage: Outage,
        give_up: Callable[[], bool],
        alone: Callable[[AsyncQueueTasks, TaskRun, Delivery], Awaitable[None]],
    ) -> None:
        """``alone`` settles one run as its runner would (after a failed call)."""
        self._app = app
        self._alone = alone
        self._outage = outage
        self._give_up = give_up
        self._inflight: list[list[tuple[TaskRun, Delivery]]] = []
        """The settles of the calls in flight (two at most)."""
        self._shared = shared
        self._limit = max(limit, 1)
        self._queue: list[tuple[TaskRun, Delivery]] = []
        self._busy = 0
        """Tasks queued or in the call in flight."""
        self._ready = _Signal()
        self._done = _Signal()
        self._ended = False
        """:meth:`serve` is over: nothing queued here is settled any more."""
        self._rounds: list[_Round] = []
        """Begins waiting for a call, in rounds of at most ``BEGIN_BATCH`` (one per call)."""
        self._new_event = EventFactory()
        # Only for a remote broker: folding saves a round trip, and a local one (in memory)
        # makes none, so the hand-over between tasks would be all it added.
        local = getattr(shared, "local", False)
        folds = provides(shared, SettleBegin) and not local
        self._settle_begin = cast(SettleBegin, shared) if folds else None

    @property
    def folds_begins(self) -> bool:
        """Whether :meth:`begin` may be used: the broker settles and begins in one call."""
        return self._settle_begin is not None

    async def put(self, run: TaskRun, delivery: Delivery) -> None:
        while self._busy >= self._limit:
            await self._done.wait(None)
        self._queue.append((run, delivery))
        self._busy += 1
        self._ready.fire()

    async def begin(self, claim: TaskRecord) -> TaskRecord:
        """:meth:`Storage.begin` of ``claim`` in the next call, with the settles and begins
        queued meanwhile (only when ``folds_begins``); made by the serving task, which keeps
        the runners free during the round trip. A record the call could not return is begun
        alone, which raises what ``begin`` raises."""
        rounds = self._rounds
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
        return [run for run, _ in self._queue] + [
            run for batch in self._inflight for run, _ in batch
        ]

    @property
    def ended(self) -> bool:
        """Whether :meth:`serve` is over (cancelled with the loop's other tasks when the loop
        itself ends): nothing handed over is settled any more."""
        return self._ended

    async def drained(self) -> None:
        """Until every task handed over is settled, or :meth:`serve` ended without settling
        them (cancelled with the loop's other tasks when the loop itself ends): what is held
        then is left to its leases, not waited for until the stop's deadline."""
        while self._busy and not self._ended:
            await self._done.wait(None)

    async def serve(self) -> None:
        """Make the calls, until cancelled: one at a time, and a second one alongside only
        for tasks waiting to begin, with nothing else (they do not wait for the reply of a
        call they are not in, nor for settles; the server takes the two in turn)."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._calls)
                await self._calls()
        finally:
            self._ended = True
            self._done.fire()  # a drained() waiting

    async def _calls(self) -> None:
        while True:
            while not (self._rounds if self._inflight else self._queue or self._rounds):
                await self._ready.wait(None)
            if self._inflight:  # alongside a call in flight: the begins only, a short call
                batch = []
            else:
                batch = self._queue[:SETTLE_BATCH]
                del self._queue[:SETTLE_BATCH]
            self._inflight.append(batch)
            round_ = self._rounds.pop(0) if self._rounds else None
            try:
                await self._settle(batch, round_)
            except BaseException as exc:
                # A bug in a component or plugin must not kill the worker (see _process),
                # nor its own cancellation (a client library letting an inner one escape):
                # that one would end the settler without a word, the worker serving on with
                # nothing settled. The batch is left to its leases.
                if not is_error(exc):
                    raise  # the worker is stopping
                log.error(
                    "worker failed while settling %d finished tasks", len(batch), exc_info=exc
                )
                if round_ is not None and not round_.done.is_set():
                    round_.fail(exc if isinstance(exc, Exception) else stray_error("a settle", exc))
            finally:
                if round_ is not None:
                    round_.done.set()  # without results: each begins alone
                self._inflight = [b for b in self._inflight if b is not batch]
                self._busy -= len(batch)
                self._done.fire()
                self._ready.fire()  # the other may call now

    async def _settle(self, batch: list[tuple[TaskRun, Delivery]], round_: _Round | None) -> None:
        """Store ``batch``'s final records and ack them (the round's begins folded in), then
        fire every run's ``qtasks_worker_execute_after`` once, whatever became of its settle:
        stored, refused, its lease lost while it waited, or left to its lease by an outage
        or an error (as :meth:`qtasks.settle.Settlement.settle` does for a run it settles)."""
        after: set[int] = set()  # the runs whose execute_after has fired
        try:
            await self._store(batch, round_, after)
        finally:
            hooks = self._app.hooks
            if "qtasks_worker_execute_after" in hooks.active:
                with anyio.CancelScope(shield=True):
                    for run, _ in batch:
                        if id(run) not in after:
                            await hooks.notify(
                                "qtasks_worker_execute_after",
                                app=self._app,
                                record=run.record,
                                run=run,
                            )

    async def _store(
        self, batch: list[tuple[TaskRun, Delivery]], round_: _Round | None, after: set[int]
    ) -> None:
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
                # Not an outage: maybe one record the server refuses (a result over its size
                # limit, an error reply). Each begins and settles alone, so that only its own
                # task fails (as BeginBatch does with a record it cannot read).
                if round_ is not None:
                    round_.done.set()  # without results: each begins alone
                if batch:
                    log.warning(
                        "storing the results of %d finished tasks in one call failed (%s: %s): "
                        "storing them one at a time",
                        len(batch),
                        type(exc).__name__,
                        mask_text(str(exc)),
                    )
                for run, delivery in batch:
                    await self._alone(app, run, delivery)
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
            try:
                if (
                    await stored_final(app, record, ok, run.delivery, None)
                    and "qtasks_task_succeeded" in hooks.active
                ):
                    await hooks.notify("qtasks_task_succeeded", app=app, record=record)
            except Exception:  # e.g. reading a refused record in an outage: the others go on
                log.exception("could not finish settling task %s", record.uuid)
            after.add(id(run))
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
