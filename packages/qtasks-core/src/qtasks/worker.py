"""The default worker: bounded prefetch, a local priority queue, a concurrency limit, leases
renewed while tasks run, fenced result writes, and acks only after the final record is stored.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import socket
import time
import traceback
import uuid as uuid_mod
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import fields as dataclass_fields
from types import CodeType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus as AnyioTaskStatus

from qtasks.components import (
    BeginOnClaim,
    CancelCheck,
    CancelFeed,
    Delivery,
    LeaseBatch,
    SharedServer,
)
from qtasks.errors import (
    PluginError,
    SerializationError,
    TaskArgumentsError,
    TaskCancelledError,
    UnknownTaskError,
)
from qtasks.executor import TaskExecutor, TaskRun
from qtasks.memory import EventFactory, _Signal
from qtasks.messages import Message
from qtasks.outage import Outage, retrying
from qtasks.record import TaskRecord, TaskStatus
from qtasks.watchdog import LoopWatchdog

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks.worker")

HEARTBEAT_FRESH = 0.5
"""Seconds within which a change of a worker's figures (running, waiting, processed) reaches
the global config, however long ``heartbeat_interval`` is."""

BEGUN_FRESH = 0.005
"""Seconds for which a record begun at claim time (see
:class:`~qtasks.components.BeginOnClaim`) is trusted; a delivery that waited longer in the
local queue is begun again when it starts, so a cancel made meanwhile is seen."""


RECENT_CANCELS = 1024
"""Uuids of the latest cancels a worker heard of (see :class:`CancelFeed`): a delivery of one
of them is never trusted as begun at claim time, it is begun again (and found final)."""

SETTLE_BATCH = 256
"""Most tasks settled in one :meth:`SharedServer.ack_finals` call, so that one call never
holds the server (a Redis script runs alone) for long."""


class QueueWorker:
    """Serves tasks from the app's broker. See :class:`qtasks.components.Worker`."""

    def __init__(
        self,
        *,
        max_tasks_process: int | None = None,
        prefetch: int | None = None,
        executor: TaskExecutor | None = None,
    ) -> None:
        self._max_tasks = max_tasks_process
        self._prefetch = prefetch
        self.executor = executor or TaskExecutor()
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid_mod.uuid4().hex[:8]}"
        self.started_at = time.time()
        self.processed = 0
        self._running: dict[str, TaskRun] = {}
        """Runs by delivery token: a message whose lease was lost can be delivered here again
        while its old run is still winding down, so the uuid alone is not unique."""
        self._local: list[tuple[int, int, Delivery]] = []
        self._lost: set[str] = set()
        """Tokens of waiting deliveries whose lease could not be renewed."""
        self._recent_cancels: dict[str, None] = {}
        self._outage = Outage(log, "task storage")
        self._give_up_at = math.inf
        """When a stopping worker stops retrying final saves through an outage."""
        self._seq = itertools.count()
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        self._settler: _Settler | None = None

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._local)

    def cancel_local(self, uuid: str, reason: str) -> bool:
        """Cancel the run of ``uuid`` on this worker, if it runs here; ``True`` if it did."""
        recent = self._recent_cancels
        recent[uuid] = None
        if len(recent) > RECENT_CANCELS:
            del recent[next(iter(recent))]
        found = False
        for run in list(self._running.values()):
            if run.record.uuid == uuid:
                run.cancel(reason)
                found = True
        return found

    def _suspects(self) -> list[tuple[str, CodeType]]:
        """``(task name, code)`` of the running tasks (read by the loop watchdog's thread)."""
        out = []
        for run in list(self._running.values()):
            code = getattr(run.task.func, "__code__", None)
            if isinstance(code, CodeType):
                out.append((run.task.name, code))
        return out

    def _cancelled_elsewhere(self, uuid: str, reason: str) -> None:
        self.cancel_local(uuid, reason)

    @property
    def stopping(self) -> anyio.Event:
        """Set once the worker was asked to stop (``ctx.sleep`` wakes on it)."""
        return self._stopping

    def stop(self) -> None:
        """Ask the worker to stop: no new messages; running tasks get the grace period."""
        self._stopping.set()

    async def run(
        self,
        app: AsyncQueueTasks,
        *,
        task_status: AnyioTaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        config = app.config
        concurrency = self._max_tasks or config.max_tasks_process
        prefetch = (
            self._prefetch if self._prefetch is not None else config.prefetch_for(concurrency)
        )
        capacity = concurrency + prefetch
        self._held = 0
        self._give_up_at = math.inf
        slot_freed = _Signal()
        item_ready = _WakeOne()
        self._stopping = anyio.Event()
        broker = app.broker
        shared = app.shared_server
        consumer = (
            broker.consume_begun(prefetch=prefetch, storage=app.storage, worker=self.id)
            if shared is not None and isinstance(broker, BeginOnClaim)
            else broker.consume(prefetch=prefetch)
        )
        settler = self._settler = (
            None if shared is None else _Settler(app, shared, 2 * concurrency, self._outage)
        )
        async with (
            consumer as deliveries,
            anyio.create_task_group() as serving,
        ):
            runners: set[anyio.CancelScope] = set()

            async def runner() -> None:
                # One cancel scope serves the tasks this runner runs in turn, until one of
                # them is cancelled; then the runner takes a fresh scope.
                while not self._stopping.is_set():
                    scope = anyio.CancelScope()
                    runners.add(scope)
                    with scope:
                        while not scope.cancel_called:
                            while not self._local and not self._stopping.is_set():
                                await item_ready.wait()
                            if self._stopping.is_set():
                                return  # stopping: what waits locally is handed back
                            _, _, delivery = heapq.heappop(self._local)
                            try:
                                if delivery.token in self._lost:
                                    self._lost.discard(delivery.token)
                                    log.warning(
                                        "lease of waiting message %s was lost; another "
                                        "worker owns it now",
                                        delivery.id,
                                    )
                                    continue
                                await self._process(app, delivery, scope)
                            finally:
                                self._held -= 1
                                slot_freed.fire()
                    runners.discard(scope)

            async def receive() -> None:
                iterator = deliveries.__aiter__()
                while True:
                    while self._held >= capacity:
                        await slot_freed.wait(None)
                    delivery = await iterator.__anext__()
                    self._held += 1
                    heapq.heappush(self._local, (delivery.priority, next(self._seq), delivery))
                    item_ready.wake_one()

            for _ in range(concurrency):
                serving.start_soon(runner)
            receiving = anyio.CancelScope()

            async def receive_until_stopped() -> None:
                with receiving:
                    await receive()

            serving.start_soon(receive_until_stopped)
            if settler is not None:
                serving.start_soon(settler.serve)
            storage = app.storage
            if isinstance(storage, CancelFeed):
                # Cancels made by other processes reach running tasks at once.
                await serving.start(storage.follow_cancels, self._cancelled_elsewhere)
            if config.loop_stall_warning is not None:
                watchdog = LoopWatchdog(config.loop_stall_warning, self._suspects)
                await serving.start(watchdog.run)
            serving.start_soon(self._heartbeat, app, concurrency)
            serving.start_soon(self._keep_leases, app)
            await app.hooks.notify("qtasks_broker_listening", app=app, worker=self)
            await app.hooks.notify(
                "qtasks_component_started", app=app, kind="worker", component=self
            )
            task_status.started()
            try:
                await self._stopping.wait()
            finally:
                self._give_up_at = time.monotonic() + config.shutdown_grace
                with anyio.CancelScope(shield=True):
                    receiving.cancel()
                    item_ready.wake_all()
                    await self._hand_back(app)
                    with anyio.move_on_after(config.shutdown_grace):
                        while self._running:
                            await self._wait_idle()
                    for run in list(self._running.values()):
                        run.cancel("__shutdown__")
                    while self._running:
                        await self._wait_idle()
                    if settler is not None:
                        # Before the consumer closes: it hands back what is not settled.
                        await settler.drained()
                    self._settler = None
                    for scope in runners:
                        scope.cancel()
                    serving.cancel_scope.cancel()
                    await app.hooks.notify(
                        "qtasks_component_stopped", app=app, kind="worker", component=self
                    )

    async def _wait_idle(self) -> None:
        self._idle = anyio.Event()
        await self._idle.wait()

    async def _hand_back(self, app: AsyncQueueTasks) -> None:
        while self._local:
            _, _, delivery = heapq.heappop(self._local)
            await delivery.requeue()
            await app.hooks.notify("qtasks_broker_requeued", app=app, delivery=delivery, delay=None)

    async def _heartbeat(self, app: AsyncQueueTasks, concurrency: int) -> None:
        # Every heartbeat_interval, and within HEARTBEAT_FRESH of a change of the figures, so
        # that `qtasks inspect` shows what the worker just did; a last beat when it stops.
        interval = app.config.heartbeat_interval
        sent: tuple[int, int, int] | None = None
        last = -interval
        try:
            while True:
                figures = (self.running, self.waiting, self.processed)
                if figures != sent or anyio.current_time() - last >= interval:
                    sent, last = figures, anyio.current_time()
                    await self._beat(app, concurrency, interval)
                await anyio.sleep(min(interval, HEARTBEAT_FRESH))
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(HEARTBEAT_FRESH):
                await self._beat(app, concurrency, interval)

    async def _beat(self, app: AsyncQueueTasks, concurrency: int, interval: float) -> None:
        info = {
            "id": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "running": self.running,
            "waiting": self.waiting,
            "processed": self.processed,
            "concurrency": concurrency,
        }
        try:
            await app.global_config.heartbeat(self.id, info, ttl=interval * 3)
            await app.hooks.notify(
                "qtasks_global_config_status", app=app, worker_id=self.id, info=info
            )
        except Exception:
            log.warning("heartbeat to the global config failed", exc_info=True)

    # --- one delivery ---------------------------------------------------------------------

    async def _reject(
        self, app: AsyncQueueTasks, delivery: Delivery, reason: str, record: TaskRecord | None
    ) -> None:
        log.error("rejected message %s: %s", delivery.id, reason)
        if record is not None:
            record.status = TaskStatus.ERROR
            record.error = reason
            record.updated_at = time.time()
            await app.storage.save(record)
        await delivery.nack(reason)
        await app.hooks.notify("qtasks_broker_nacked", app=app, delivery=delivery, reason=reason)
        await app.hooks.notify("qtasks_task_rejected", app=app, delivery=delivery, reason=reason)

    async def process(self, app: AsyncQueueTasks, delivery: Delivery) -> None:
        """Handle one delivery to the end exactly as the serving loop does (decode, run, store
        the final record, settle), renewing its lease meanwhile. For runners that take
        deliveries themselves, such as the inline runner of ``qtasks_testing``."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_leases, app)
            with anyio.CancelScope() as scope:
                await self._process(app, delivery, scope)
            tg.cancel_scope.cancel()

    async def _process(
        self, app: AsyncQueueTasks, delivery: Delivery, scope: anyio.CancelScope
    ) -> None:
        """Handle ``delivery`` inside ``scope``, the runner's cancel scope (cancelled only
        through :meth:`TaskRun.cancel`, and only while that run executes)."""
        try:
            await self._process_inner(app, delivery, scope)
        except ConnectionError as exc:
            # An outage: one warning for all of it (not a traceback per task); the message
            # comes back after a second, or after its lease if the hand-back fails too.
            self._outage.failed(exc)
            with anyio.CancelScope(shield=True):
                try:
                    await delivery.requeue(delay=1.0)
                except Exception:  # its lease brings it back
                    pass
        except Exception:
            # A bug in a component or plugin must not kill the worker: log, hand back.
            log.exception("worker failed while handling message %s", delivery.id)
            with anyio.CancelScope(shield=True):
                try:
                    await delivery.requeue(delay=1.0)
                except Exception:
                    log.exception("could not hand message %s back", delivery.id)

    async def _process_inner(
        self, app: AsyncQueueTasks, delivery: Delivery, scope: anyio.CancelScope
    ) -> None:
        hooks = app.hooks
        if "qtasks_broker_message_received" in hooks.active:
            await hooks.notify("qtasks_broker_message_received", app=app, delivery=delivery)
        try:
            message = app.codec.decode(delivery.body)
        except SerializationError as exc:
            stored = await app.storage.get(delivery.id)
            await self._reject(app, delivery, f"undecodable message: {exc}", stored)
            return
        task = app.tasks.get(message.task_name)
        problem: str | None = None
        if task is None:
            problem = str(UnknownTaskError(message.task_name))
        else:
            try:
                task.check_arguments(message.args, message.kwargs)
            except TaskArgumentsError as exc:
                problem = f"wrong arguments: {exc}"
        if problem is not None or task is None:
            stored = await app.storage.get(message.uuid)
            if stored is not None and stored.status.final:
                await delivery.ack()  # cancelled while queued, or already finished
                return
            await self._reject(app, delivery, problem or "", stored or _record_of(message))
            return
        if "qtasks_worker_task_received" in hooks.active:
            await hooks.notify("qtasks_worker_task_received", app=app, message=message)
        # Deliveries of a BeginOnClaim broker carry the record begun with their claim.
        begun: TaskRecord | None = getattr(delivery, "begun", None)
        begun_at: float = getattr(delivery, "begun_at", 0.0)
        if (
            begun is not None
            and time.monotonic() - begun_at <= BEGUN_FRESH
            and delivery.id not in self._recent_cancels
        ):
            # Begun by the broker when it claimed the message, a moment ago (BeginOnClaim).
            record = begun
            record.attempt = message.attempt + 1
        else:
            claim = _record_of(message)
            claim.status = TaskStatus.PROCESS
            claim.attempt = message.attempt + 1
            claim.token = delivery.token
            claim.worker = self.id
            try:
                record = await app.storage.begin(claim)
            except SerializationError as exc:
                # The stored record cannot be read (written by something else): poison too.
                await self._reject(app, delivery, f"stored task record unreadable: {exc}", None)
                return
        if record.status.final:
            # Cancelled while queued, or finished by an attempt whose ack got lost.
            await delivery.ack()
            return
        if "qtasks_storage_saved" in hooks.active:
            await hooks.notify("qtasks_storage_saved", app=app, record=record)
        run = TaskRun(
            app=app,
            task=task,
            message=message,
            record=record,
            delivery=delivery,
            cancel_scope=scope,
        )
        self._running[delivery.token] = run
        try:
            if "qtasks_worker_execute_before" in hooks.active:
                await hooks.notify("qtasks_worker_execute_before", app=app, record=record)
            await self._execute(app, run, delivery)
        finally:
            del self._running[delivery.token]
            self.processed += 1
            idle = getattr(self, "_idle", None)
            if idle is not None:
                idle.set()

    async def _execute(self, app: AsyncQueueTasks, run: TaskRun, delivery: Delivery) -> None:
        outcome: BaseException | None = None
        result: Any = None
        if run.cancel_requested:  # cancelled between begin and now: never start it
            await self._settle(app, run, delivery, None, None, cancelled=True)
            return
        run.executing = True
        try:
            result = await task_executor(run).execute(run)
        except Exception as exc:
            outcome = exc
        except BaseException as exc:
            if not (run.cancel_requested and isinstance(exc, anyio.get_cancelled_exc_class())):
                raise  # the worker itself is torn down: not acked, comes back after its lease
            run.executing = False
            # The runner's scope is cancelled: settle shielded, then let the cancellation end
            # the scope (the runner takes a fresh one for the next task).
            with anyio.CancelScope(shield=True):
                await self._settle(app, run, delivery, None, None, cancelled=True)
            raise
        finally:
            run.executing = False
        if run.cancel_requested:
            # Cancelled as it finished (or the task swallowed the cancellation): the scope is
            # cancelled, so only shielded awaits can still run in it.
            with anyio.CancelScope(shield=True):
                await self._settle(app, run, delivery, result, outcome, cancelled=False)
            return
        await self._settle(app, run, delivery, result, outcome, cancelled=False)

    async def _settle(
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
        elif outcome is None and self._settler is not None:
            # Succeeded: the settler stores the result and acks with other tasks' in one call
            # and fires the remaining hooks; the runner's slot is free for the next task now.
            _succeeded(record, result)
            await self._settler.put(run, delivery)
            return
        else:
            # Not shielded: if the worker is torn down here, the message is simply not acked
            # and comes back after its lease (at-least-once), so no extra cancel scope per task.
            await self._finish(app, run, delivery, result, outcome)
        if "qtasks_worker_execute_after" in hooks.active:
            await hooks.notify("qtasks_worker_execute_after", app=app, record=run.record)

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

    async def _keep_leases(self, app: AsyncQueueTasks) -> None:
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
            waiting = [delivery for _, _, delivery in self._local]
            runs = list(self._running.values())
            # A pass stuck on a dead link gives up at the lease: by then its answer is moot.
            with anyio.move_on_after(app.config.lease) as stuck:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._renew, app, waiting, runs)
                    if runs:
                        tg.start_soon(self._check_cancels, app, runs)
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
        if shared is not None:
            saved = await self._durable(run, lambda: shared.ack_final(delivery, storage, record))
            return await _stored_final(app, record, saved, delivery, None)
        if delivery.attempt >= app.config.max_deliveries and not await self._durable(
            run, delivery.extend
        ):
            # The last delivery allowed, and its lease is gone: the broker dead-letters the
            # message at its next claim. Say so in the record (a shared-server broker does
            # this in its claim script) rather than store a result that contradicts it.
            log.warning(
                "lease of task %s was lost on its last allowed delivery: it is dead-lettered "
                "and its result dropped",
                record.uuid,
            )
            record.status, record.returning, record.token = TaskStatus.ERROR, None, "dead-letter"
            record.error = (
                "dead-lettered: delivery limit reached: the lease of its last allowed delivery "
                f"ran out (max_deliveries={app.config.max_deliveries})"
            )
            record.updated_at = time.time()
            await self._durable(run, lambda: storage.save(record, fence=delivery.token))
            return False
        saved = await self._durable(run, lambda: storage.save(record, fence=delivery.token))
        return await _stored_final(app, record, saved, delivery, delivery)

    async def _durable(self, run: TaskRun, call: Callable[[], Awaitable[bool]]) -> bool:
        """A final write of ``run``, retried through a storage outage while its lease holds
        (the renewal pass marks it lost) and, once the worker stops, within the shutdown
        grace: a result already computed is not thrown away for a few seconds of outage."""
        return await retrying(
            call, self._outage, lambda: run.lease_lost or time.monotonic() > self._give_up_at
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
    if stored is None or not stored.status.final or stored.token != delivery.token:
        log.warning("result of %s refused: a newer attempt owns the task", record.uuid)
        return
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
        await ack.ack()
    if "qtasks_broker_acked" in hooks.active:
        await hooks.notify("qtasks_broker_acked", app=app, record=record)
    return True


def _succeeded(record: TaskRecord, result: Any) -> None:
    record.updated_at = time.time()
    record.status = TaskStatus.SUCCESS
    record.returning = result
    record.error = None


class _Settler:
    """Stores the results of succeeded tasks and acks their messages, many per round trip
    (:meth:`SharedServer.ack_finals`): tasks that finish while one call is in flight go
    together in the next. At most ``limit`` tasks (twice the concurrency: one call in flight,
    the next one filling) wait here; a runner that finds it full waits before its next task."""

    __slots__ = ("_app", "_busy", "_done", "_limit", "_outage", "_queue", "_ready", "_shared")

    def __init__(
        self, app: AsyncQueueTasks, shared: SharedServer, limit: int, outage: Outage
    ) -> None:
        self._app = app
        self._outage = outage
        self._shared = shared
        self._limit = max(limit, 1)
        self._queue: list[tuple[TaskRun, Delivery]] = []
        self._busy = 0
        """Tasks queued or in the call in flight."""
        self._ready = _Signal()
        self._done = _Signal()

    async def put(self, run: TaskRun, delivery: Delivery) -> None:
        while self._busy >= self._limit:
            await self._done.wait(None)
        self._queue.append((run, delivery))
        self._busy += 1
        self._ready.fire()

    async def drained(self) -> None:
        """Until every task handed over is settled."""
        while self._busy:
            await self._done.wait(None)

    async def serve(self) -> None:
        while True:
            while not self._queue:
                await self._ready.wait(None)
            batch = self._queue[:SETTLE_BATCH]
            del self._queue[:SETTLE_BATCH]
            try:
                await self._settle(batch)
            except Exception:
                # A bug in a component or plugin must not kill the worker (see _process).
                log.exception("worker failed while settling %d finished tasks", len(batch))
            finally:
                self._busy -= len(batch)
                self._done.fire()

    async def _settle(self, batch: list[tuple[TaskRun, Delivery]]) -> None:
        app = self._app
        try:
            saved = await self._shared.ack_finals(
                app.storage, [(delivery, run.record) for run, delivery in batch]
            )
        except ConnectionError as exc:
            # The broker retried while the leases held: each message comes back after its
            # lease and runs again (at-least-once). One warning per outage.
            self._outage.failed(exc)
            return
        except Exception:
            # Not acked: each message comes back after its lease (at-least-once).
            log.exception("could not store the results of %d finished tasks", len(batch))
            return
        hooks = app.hooks
        for (run, _), ok in zip(batch, saved, strict=True):
            record = run.record
            if (
                await _stored_final(app, record, ok, run.delivery, None)
                and "qtasks_task_succeeded" in hooks.active
            ):
                await hooks.notify("qtasks_task_succeeded", app=app, record=record)
            if "qtasks_worker_execute_after" in hooks.active:
                await hooks.notify("qtasks_worker_execute_after", app=app, record=record)


def task_executor(run: TaskRun) -> TaskExecutor:
    """The executor for ``run``: the task's own, else the worker's."""
    custom = run.task.options.executor
    if custom is not None:
        return custom() if isinstance(custom, type) else custom  # type: ignore[no-any-return]
    worker = run.app.worker
    executor: TaskExecutor = getattr(worker, "executor", None) or TaskExecutor()
    return executor


def _record_of(message: Message) -> TaskRecord:
    """A record built from the message alone (when the producer stored none)."""
    return TaskRecord(
        uuid=message.uuid,
        task_name=message.task_name,
        priority=message.priority,
        args=message.args,
        kwargs=message.kwargs,
        created_at=message.created_at,
        parent_uuid=message.headers.get("parent_uuid"),
    )


class _WakeOne:
    """Idle runners wait here; each new item wakes one of them, not all (a herd of 100 idle
    runners per message costs more than the message)."""

    __slots__ = ("_new_event", "_waiting")

    def __init__(self) -> None:
        self._waiting: deque[anyio.Event] = deque()
        self._new_event = EventFactory()

    async def wait(self) -> None:
        event = self._new_event()
        self._waiting.append(event)
        try:
            await event.wait()
        finally:
            if not event.is_set():
                self._waiting.remove(event)

    def wake_one(self) -> None:
        if self._waiting:
            self._waiting.popleft().set()

    def wake_all(self) -> None:
        while self._waiting:
            self._waiting.popleft().set()
