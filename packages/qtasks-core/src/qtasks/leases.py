"""Leases: a worker renews the lease of every delivery it holds, running or waiting, and
checks its running tasks for cancels the storage's cancel feed did not bring."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

import anyio

from qtasks.components import CancelCheck, Delivery, LeaseBatch, delivery_lease, provides
from qtasks.config import is_default
from qtasks.executor import TaskRun
from qtasks.flow import FlowGate
from qtasks.record import TaskStatus

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks.worker")


class LeaseKeeper:
    """The lease pass of one worker. ``held()`` returns the deliveries waiting in its local
    queue and its running tasks; the tokens of waiting deliveries whose lease was lost are
    added to ``lost`` (the worker skips them), running tasks whose lease was lost are marked
    and cancelled. The concurrency slots of ``flow`` are renewed by the pass too."""

    def __init__(
        self,
        held: Callable[[], tuple[list[Delivery], list[TaskRun]]],
        lost: set[str],
        flow: FlowGate | None = None,
    ) -> None:
        self._held = held
        self._lost = lost
        self._flow = flow
        self._told = False

    async def keep(self, app: AsyncQueueTasks) -> None:
        """Renew the lease of every delivery this worker holds, and notice cancels made
        elsewhere that the storage's cancel feed did not bring.

        Prefetched deliveries waiting for a free slot are renewed too: otherwise a long task
        ahead of them lets their lease run out and another worker runs them while this one
        still holds them (a duplicate run). The lease is the broker's (:func:`delivery_lease`:
        its own ``lease=`` option wins over ``config.lease``, said once in a warning when both
        were set), read at every pass. Every ``lease / 3`` seconds the pass starts three calls,
        each on its own, so one component that stalls delays none of the others: the broker's
        renewal of every held delivery, the storage's cancel check of the running
        tasks and the global config's renewal of the concurrency slots (with
        :class:`LeaseBatch` and :class:`CancelCheck` components, one call each whatever the
        number of tasks). A call still on its way is not started again (skipped, not piled
        up), and one with no answer within the lease is given up: by then its answer is moot.
        Only the broker's answer decides that a lease was lost."""
        lease = delivery_lease(app.broker, app.config)
        self._tell(app, lease)
        renewal = _Call("lease renewal", lease)
        check = _Call("cancel check", lease)
        slots = _Call("concurrency slot renewal", lease)
        next_pass = anyio.current_time() + max(lease / 3, 0.05)
        async with anyio.create_task_group() as tg:
            while True:
                await anyio.sleep(max(next_pass - anyio.current_time(), 0))
                # A broker shared with an app started since may have taken its lease.
                lease = delivery_lease(app.broker, app.config)
                renewal.bound = check.bound = slots.bound = lease
                next_pass = max(next_pass + max(lease / 3, 0.05), anyio.current_time())
                waiting, runs = self._held()
                renewal.start(tg, self._renew, app, waiting, runs)
                if runs:
                    check.start(tg, self._check_cancels, app, runs)
                if self._flow is not None and (self._flow.slots or self._flow.lingering):
                    slots.start(tg, self._flow.extend, app)

    def _tell(self, app: AsyncQueueTasks, lease: float) -> None:
        """Warn once when ``config.lease`` was set to another value than the broker's lease,
        which is the one that holds (a default ``config.lease`` is not a choice: no word)."""
        configured = app.config.lease
        if self._told or configured == lease or is_default("lease", configured):
            return
        self._told = True
        log.warning(
            "the lease of the broker (%s, %ss) is used, not config.lease (%ss): deliveries "
            "are renewed every %ss; set only one of the two",
            type(app.broker).__name__,
            lease,
            configured,
            round(max(lease / 3, 0.05), 3),
        )

    async def _renew(
        self, app: AsyncQueueTasks, waiting: list[Delivery], runs: list[TaskRun]
    ) -> None:
        deliveries = [*waiting, *(run.delivery for run in runs)]
        if not deliveries:
            return
        broker = app.broker
        try:
            if provides(broker, LeaseBatch):
                renewed = await cast(LeaseBatch, broker).extend_many(deliveries)
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
            if provides(storage, CancelCheck):
                cancelled = await cast(CancelCheck, storage).cancelled(uuids)
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


class _Call:
    """One kind of call of the lease pass: at most one on its way, given up after ``bound``
    seconds."""

    def __init__(self, what: str, bound: float) -> None:
        self.what = what
        self.bound = bound
        self.busy = False

    def start(self, tg: TaskGroup, func: Callable[..., Awaitable[None]], *args: object) -> None:
        """Start ``func(*args)`` in ``tg``, unless the previous call is still on its way."""
        if not self.busy:
            self.busy = True
            tg.start_soon(self._run, func, args)

    async def _run(self, func: Callable[..., Awaitable[None]], args: tuple[object, ...]) -> None:
        try:
            with anyio.move_on_after(self.bound) as stuck:
                await func(*args)
            if stuck.cancelled_caught:
                log.warning("%s got no answer within the lease (%ss)", self.what, self.bound)
        finally:
            self.busy = False
