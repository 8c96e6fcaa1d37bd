"""Leases: a worker renews the lease of every delivery it holds, running or waiting, and
checks its running tasks for cancels the storage's cancel feed did not bring."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from qtasks.components import CancelCheck, Delivery, LeaseBatch
from qtasks.executor import TaskRun
from qtasks.flow import FlowGate
from qtasks.record import TaskStatus

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks.worker")


class LeaseKeeper:
    """The renewal pass of one worker. ``held()`` returns the deliveries waiting in its local
    queue and its running tasks; the tokens of waiting deliveries whose lease was lost are
    added to ``lost`` (the worker skips them), running tasks whose lease was lost are marked
    and cancelled. The concurrency slots of ``flow`` are renewed in the same pass."""

    def __init__(
        self,
        held: Callable[[], tuple[list[Delivery], list[TaskRun]]],
        lost: set[str],
        flow: FlowGate | None = None,
    ) -> None:
        self._held = held
        self._lost = lost
        self._flow = flow

    async def keep(self, app: AsyncQueueTasks) -> None:
        """Renew the lease of every delivery this worker holds, and notice cancels made
        elsewhere that the storage's cancel feed did not bring.

        Prefetched deliveries waiting for a free slot are renewed too: otherwise a long task
        ahead of them lets their lease run out and another worker runs them while this one
        still holds them (a duplicate run). A pass is one batched renewal and one batched
        cancel check, made concurrently (with :class:`LeaseBatch` and :class:`CancelCheck`
        components: two calls whatever the number of tasks), and passes start every
        ``lease / 3`` seconds however long the previous one took."""
        interval = max(app.config.lease / 3, 0.05)
        next_pass = anyio.current_time() + interval
        while True:
            await anyio.sleep(max(next_pass - anyio.current_time(), 0))
            next_pass = max(next_pass + interval, anyio.current_time())
            waiting, runs = self._held()
            # A pass stuck on a dead link gives up at the lease: by then its answer is moot.
            with anyio.move_on_after(app.config.lease) as stuck:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._renew, app, waiting, runs)
                    if runs:
                        tg.start_soon(self._check_cancels, app, runs)
                    if self._flow is not None and (self._flow.slots or self._flow.lingering):
                        # Another component (the global config): its own call, concurrently.
                        tg.start_soon(self._flow.extend, app)
            if stuck.cancelled_caught:
                log.warning("lease renewal got no answer within the lease (%ss)", app.config.lease)

    async def _renew(
        self, app: AsyncQueueTasks, waiting: list[Delivery], runs: list[TaskRun]
    ) -> None:
        deliveries = [*waiting, *(run.delivery for run in runs)]
        if not deliveries:
            return
        broker = app.broker
        try:
            if isinstance(broker, LeaseBatch):
                renewed = await broker.extend_many(deliveries)
            else:
                renewed = [False] * len(deliveries)

                async def extend(i: int, delivery: Delivery) -> None:
                    renewed[i] = await delivery.extend()

                async with anyio.create_task_group() as tg:
                    for i, delivery in enumerate(deliveries):
                        tg.start_soon(extend, i, delivery)
        except Exception as exc:
            # Not lost yet: the next pass tries again well before the lease runs out.
            log.warning("lease renewal of %d deliveries failed: %s", len(deliveries), exc)
            return
        for delivery, ok in zip(waiting, renewed, strict=False):
            if not ok:
                self._lost.add(delivery.token)
        for run, ok in zip(runs, renewed[len(waiting) :], strict=True):
            if not ok:
                run.lease_lost = True
                run.cancel()

    async def _check_cancels(self, app: AsyncQueueTasks, runs: list[TaskRun]) -> None:
        storage = app.storage
        uuids = [run.record.uuid for run in runs]
        try:
            if isinstance(storage, CancelCheck):
                cancelled = await storage.cancelled(uuids)
            else:
                cancelled = {}
                for uuid in uuids:
                    stored = await storage.get(uuid)
                    if stored is not None and stored.status is TaskStatus.CANCEL:
                        cancelled[uuid] = stored.cancel_reason or "cancelled"
        except Exception as exc:
            log.warning("cancel check of %d running tasks failed: %s", len(uuids), exc)
            return
        for run in runs:
            reason = cancelled.get(run.record.uuid)
            if reason is not None:
                run.cancel(reason)
