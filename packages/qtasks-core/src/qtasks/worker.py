"""The default worker: bounded prefetch, a local priority queue, a concurrency limit, leases
renewed while tasks run, fenced result writes, and acks only after the final record is stored.

Settling lives in :mod:`qtasks.settle` and :mod:`qtasks.settle_batch`, leases in
:mod:`qtasks.leases`. Over ~500 lines: the serving loop (runners, receiving, shutdown and
hand-back) and the begin step (decode, check, then begin by the route that applies: with the
claim, in the settle call, or in a begin batch) stay together, since each reads the other's
state (free runners, waiting deliveries, recent cancels).
"""

from __future__ import annotations

import copy
import heapq
import itertools
import logging
import os
import socket
import time
import uuid as uuid_mod
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from types import CodeType
from typing import TYPE_CHECKING, Any, cast

import anyio
from anyio.abc import SocketStream
from anyio.abc import TaskStatus as AnyioTaskStatus
from anyio.streams.stapled import MultiListener

from qtasks import health, poison
from qtasks.begin import BeginBatch
from qtasks.cancels import culprit, is_stray, stray_error
from qtasks.components import (
    BeginOnClaim,
    BuryNotice,
    CancelFeed,
    ConsumeHealth,
    Delivery,
    HeartbeatEnd,
    delivery_lease,
    provides,
    requeue_counting,
    takes_keyword,
)
from qtasks.errors import (
    MessageTooLargeError,
    SerializationError,
    TaskArgumentsError,
    UnknownTaskError,
    WorkflowInputError,
)
from qtasks.executor import TaskExecutor, TaskRun
from qtasks.flow import ADMIT_HEADERS, FlowGate
from qtasks.health import Health
from qtasks.hold import Hold
from qtasks.leases import LeaseKeeper
from qtasks.memory import EventFactory, _Signal
from qtasks.outage import Outage
from qtasks.record import TaskRecord, TaskStatus, record_of
from qtasks.settle import Settlement
from qtasks.stopping import STOP_MARGIN, StopClock, shield
from qtasks.stopping import serving as _clock_of
from qtasks.watchdog import LoopWatchdog
from qtasks.workflows import runtime as workflows

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.config import QueueConfig

log = logging.getLogger("qtasks.worker")

BEGIN_LEFT = 1 / 3
"""The part of its lease a waiting delivery must have left (as its broker last confirmed,
:class:`~qtasks.components.LeaseDeadline`) to be begun without renewing it first: its
renewal pass leaves it two thirds or more."""

LEASE_SKEW = 0.01
"""The part of a lease kept back for the drift between this host's clock and the broker's."""

HEARTBEAT_FRESH = 0.5
"""Seconds within which a change of a worker's figures (running, waiting, processed) reaches
the global config, however long ``heartbeat_interval`` is."""

RECENT_CANCELS = 1024
"""Uuids of the latest cancels a worker heard of (see :class:`CancelFeed`): a delivery of one
of them that was begun with its claim is begun again before it starts (and found final)."""


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
        self._beginning: dict[str, Delivery] = {}
        """Deliveries taken by a runner and not started yet (renewed too)."""
        """Tokens of waiting deliveries whose lease could not be renewed."""
        self._recent_cancels: dict[str, str] = {}
        """Reasons of the latest cancels heard of, by uuid (at most ``RECENT_CANCELS``)."""
        self._free = 0
        """Runners not processing a delivery (waiting for one, or about to take one)."""
        self._begins: BeginBatch | None = None
        """The begin step's calls, many per round trip (for the app's storage)."""
        self._start_at_once: set[str] = set()
        """Tokens of deliveries begun with their claim that went to a free runner, nothing
        waiting before them (see :meth:`_starts`)."""
        self._outage = Outage(log, "task storage")
        self._gc_outage = Outage(log, "global config (worker heartbeats)")
        self._flow = FlowGate()
        self._settlement = Settlement(self._outage, self._flow)
        self._leases = LeaseKeeper(self._held_now, self._lost, self._flow)
        self._limit_told = False
        """Whether the broker's delivery limit overruling the configuration's was told."""
        self._seq = itertools.count()
        self._stopping = anyio.Event()
        self._serving = False
        self._state = "starting"
        """What the health probe says the worker does: ``starting``, ``serving``, ``stopping``."""
        self.health_port: int | None = None
        """The port of this worker's health probe while it serves one (``health_port``)."""
        self._probe_first = False
        """Whether :meth:`serve_probe` answers the probe: :meth:`run` then answers through
        it rather than listen itself."""
        self._stopped = anyio.Event()
        self._hurried = False
        """Whether :meth:`hurry` cut the grace of this run's stop short."""
        self._graces: set[anyio.CancelScope] = set()
        """The waits of the stop that the grace period bounds (cancelled by :meth:`hurry`)."""
        self._clock = StopClock()
        """The stop's deadline, which every wait of the stop on a backend ends by."""
        self._hold = Hold(0, adaptive=False)
        """How many messages this run holds beyond its free slots (:mod:`qtasks.hold`)."""

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._local)

    def health(self, app: AsyncQueueTasks) -> Health:
        """What the health probe answers now (:mod:`qtasks.health`): the worker's state,
        how long the broker's consumer has been stalled (``None`` for a broker without
        :class:`~qtasks.components.ConsumeHealth`), and its counts."""
        return Health(
            state=self._state,
            consume_stalled=_consume_stalled(app),
            stall_limit=app.config.health_stall_limit,
            running=self.running,
            waiting=self.waiting,
            worker=self.id,
        )

    def cancel_local(self, uuid: str, reason: str) -> bool:
        """Cancel the run of ``uuid`` on this worker, if it runs here; ``True`` if it did."""
        recent = self._recent_cancels
        recent[uuid] = reason
        if len(recent) > RECENT_CANCELS:
            del recent[next(iter(recent))]
        found = False
        for run in list(self._running.values()):
            if run.record.uuid == uuid:
                run.cancel(reason)
                found = True
        return found

    def _held_now(self) -> tuple[list[Delivery], list[TaskRun]]:
        """The deliveries waiting in the local queue or being begun, and the running tasks
        (for renewal)."""
        running = [*self._running.values(), *self._settlement.held()]
        return [*(delivery for _, _, delivery in self._local), *self._beginning.values()], running

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

    def _starts(self) -> int:
        """How many deliveries claimed now would start at once: free runners with nothing
        waiting locally before them. A :class:`BeginOnClaim` broker begins only these with
        the claim (see :meth:`_process_inner`)."""
        return max(0, self._free - len(self._local))

    def forked(self) -> QueueWorker:
        """This worker for a forked child of the process it served in: the same options
        (and subclass), none of the parent's runs or deliveries, and an id of its own."""
        fresh = copy.copy(self)
        QueueWorker.__init__(
            fresh,
            max_tasks_process=self._max_tasks,
            prefetch=self._prefetch,
            executor=self.executor,
        )
        return fresh

    @property
    def stopping(self) -> anyio.Event:
        """Set once the worker was asked to stop (``ctx.sleep`` wakes on it)."""
        return self._stopping

    @asynccontextmanager
    async def _serving_now(self) -> AsyncIterator[None]:
        """:attr:`_serving` while :meth:`run` serves (not while a runner of its own calls
        :meth:`process`)."""
        self._serving = True
        try:
            yield
        finally:
            self._serving = False

    async def serve_probe(
        self,
        app: AsyncQueueTasks,
        *,
        task_status: AnyioTaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer the health probe (when ``health_port`` is set) until cancelled, from before
        the app's components start: see :class:`~qtasks.components.EarlyProbe`."""
        config = app.config
        if config.health_port is None or self._probe_first:
            task_status.started()
            return
        if not self._serving:
            self._state = "starting"  # not a previous run's "stopping"
        async with self._probe_listening(config) as listener:
            assert listener is not None
            self._probe_first = True
            try:
                task_status.started()
                await _loud("health probe", health.serve, partial(self.health, app), listener)
            finally:
                self._probe_first = False

    @asynccontextmanager
    async def _probe_listening(
        self, config: QueueConfig
    ) -> AsyncIterator[MultiListener[SocketStream] | None]:
        """The health probe's listener while :meth:`run` serves, when ``health_port`` is set
        and :meth:`serve_probe` does not answer it already (bound before serving starts: a
        port taken fails the start with a :class:`~qtasks.errors.ConfigError`)."""
        if config.health_port is None or self._probe_first:
            yield None
            return
        async with health.listening(config.health_host, config.health_port) as listener:
            self.health_port = health.bound_port(listener)
            try:
                yield listener
            finally:
                self.health_port = None

    def stop(self) -> None:
        """Ask the worker to stop: no new messages; running tasks get the grace period."""
        self._stopping.set()

    def hurry(self) -> None:
        """Cut the grace period of this worker's stop short, the stop under way or the next
        one of this run (it does not stop the worker): running tasks are cancelled and handed
        back to the broker at once, to run again (at-least-once), final saves are no longer
        retried through a storage outage, and the stop waits on its backends at most
        :data:`~qtasks.stopping.STOP_MARGIN` more (what they did not take comes back after
        its lease). What
        a second SIGINT/SIGTERM does, through ``app.stop(now=True)``. On the worker's loop."""
        self._hurried = True
        if self._stopping.is_set():
            self._settlement.give_up_at = min(self._settlement.give_up_at, time.monotonic())
            self._clock.hurry()
        for scope in self._graces:
            scope.cancel()

    @contextmanager
    def _within_grace(self, grace: float) -> Iterator[None]:
        """Bound a wait of the stop by ``grace`` seconds, or by none once hurried."""
        with anyio.move_on_after(grace) as scope:
            if self._hurried:
                scope.cancel()
            self._graces.add(scope)
            try:
                yield
            finally:
                self._graces.discard(scope)

    async def run(
        self,
        app: AsyncQueueTasks,
        *,
        task_status: AnyioTaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        config = app.config
        self._state = "starting"
        self._flow.check(app)
        self._limit_told = self._limit_told or poison.tell_limit(app)
        concurrency = self._max_tasks or config.max_tasks_process
        if app.thread_limiter.total_tokens < concurrency:
            # Sized from the app's config when the app was made: a worker serving more at
            # once (its own max_tasks_process) must not have its sync tasks wait for threads.
            app.thread_limiter.total_tokens = concurrency
        prefetch = (
            self._prefetch if self._prefetch is not None else config.prefetch_for(concurrency)
        )
        # With the default prefetch it is held only while runs are short (qtasks.hold).
        hold = Hold(prefetch, adaptive=self._prefetch is None and config.prefetch is None)
        self._hold = hold

        def wanted() -> int:
            """How many messages the worker would take now: its free slots, and what it holds
            beyond them (see :meth:`qtasks.components.Broker.consume`)."""
            return concurrency + hold.now - self._held

        def demand(method: str) -> dict[str, Any]:
            """``wanted=`` for the broker's consume ``method`` if it takes it, when the hold
            adapts."""
            adapts = hold.adaptive and takes_keyword(app.broker, method, "wanted")
            return {"wanted": wanted} if adapts else {}

        self._held = 0
        self._free = concurrency
        slot_freed = _Signal()
        item_ready = _WakeOne()
        self._stopping = anyio.Event()
        self._hurried = False
        self._clock.reset()
        self._begins = BeginBatch(app.storage)  # per run: its events belong to this loop
        broker = app.broker
        shared = app.shared_server
        announcer: workflows.Announcer | None = None
        # Whether the consumer tells the worker of the records of the messages it
        # dead-letters itself (the hook fires then, once per message; see Settlement).
        consumer_tells = True
        if shared is not None and provides(broker, BeginOnClaim):
            if "qtasks_task_enqueued" in app.hooks.active:
                announcer = workflows.Announcer(app)
            # ``ended`` came after the capability did: a broker written before it is called
            # without it (its claims' dead letters then fire the hook from the settle step).
            told: dict[str, Any] = {}
            if takes_keyword(broker, "consume_begun", "ended"):
                told["ended"] = partial(poison.dead_lettered, app)
            else:
                consumer_tells = False
            told.update(demand("consume_begun"))
            consumer = cast(BeginOnClaim, broker).consume_begun(
                prefetch=prefetch,
                storage=app.storage,
                worker=self.id,
                starts=self._starts,
                published=None if announcer is None else announcer.published,
                **told,
            )
        elif provides(broker, BuryNotice):
            # The broker dead-letters on its own: the worker ends those records.
            buried = partial(poison.buried, app)
            consumer = cast(BuryNotice, broker).consume_noticing(
                prefetch=prefetch, buried=buried, **demand("consume_noticing")
            )
        else:
            consumer = broker.consume(prefetch=prefetch, **demand("consume"))
            consumer_tells = False
        settler = self._settlement.open_batch(app, concurrency)
        self._settlement.noticing = consumer_tells
        async with (
            self._probe_listening(config) as probe,
            self._serving_now(),
            _clock_of(self._clock),
            consumer as deliveries,
            anyio.create_task_group() as serving,
        ):
            runners: set[anyio.CancelScope] = set()

            async def serve_in(scope: anyio.CancelScope) -> None:
                # The deliveries this runner takes in turn, until one of them is cancelled or
                # the worker stops (what waits locally is then handed back).
                with scope:
                    while not scope.cancel_called:
                        while not self._local and not self._stopping.is_set():
                            await item_ready.wait()
                        if self._stopping.is_set():
                            return
                        _, _, delivery = heapq.heappop(self._local)
                        try:
                            if delivery.token in self._lost:
                                self._lost.discard(delivery.token)
                                self._start_at_once.discard(delivery.token)
                                log.warning(
                                    "lease of waiting message %s was lost; another "
                                    "worker owns it now",
                                    delivery.id,
                                )
                                continue
                            self._free -= 1
                            took = time.monotonic() if hold.adaptive else 0.0
                            try:
                                await self._process(app, delivery, scope)
                            finally:
                                self._free += 1
                                if took:
                                    hold.ran(time.monotonic() - took)
                        finally:
                            self._held -= 1
                            slot_freed.fire()

            async def runner() -> None:
                # One cancel scope serves the tasks this runner runs in turn, until one of
                # them is cancelled; then the runner takes a fresh scope.
                while not self._stopping.is_set():
                    scope = anyio.CancelScope()
                    runners.add(scope)
                    try:
                        await serve_in(scope)
                    except BaseException as exc:
                        if not is_stray(exc):
                            raise
                        # Mostly a cancelled task that raised a CancelledError of its own in
                        # place of its cancellation, which the scope does not take for its
                        # own: the task is settled already. Either way the runner goes on.
                        if not scope.cancel_called:
                            log.error("a runner's code raised CancelledError", exc_info=exc)
                    runners.discard(scope)

            async def receive() -> None:
                iterator = deliveries.__aiter__()
                while True:
                    while self._held >= concurrency + hold.now:
                        await slot_freed.wait(None)
                    delivery = await iterator.__anext__()
                    self._held += 1
                    if getattr(delivery, "begun", None) is not None and self._starts() > 0:
                        self._start_at_once.add(delivery.token)
                    heapq.heappush(self._local, (delivery.priority, next(self._seq), delivery))
                    item_ready.wake_one()

            for _ in range(concurrency):
                serving.start_soon(runner)
            receiving = anyio.CancelScope()
            received_all = anyio.Event()

            async def receive_until_stopped() -> None:
                try:
                    with receiving:
                        await receive()
                finally:
                    received_all.set()

            serving.start_soon(_loud, "receiving", receive_until_stopped)
            # Wait for the sync threads given up on: their slots, their task-scoped teardowns.
            self._flow.aside = self._settlement.teardowns.aside = serving
            if settler is not None:
                serving.start_soon(_loud, "settling", settler.serve)
            if announcer is not None:
                serving.start_soon(_loud, "announcing", announcer.serve)
            storage = app.storage
            if provides(storage, CancelFeed):
                # Cancels made by other processes reach running tasks at once.
                follow = partial(
                    cast(CancelFeed, storage).follow_cancels, self._cancelled_elsewhere
                )
                await serving.start(partial(_loud, "following cancels", follow))
            if config.loop_stall_warning is not None:
                watchdog = LoopWatchdog(config.loop_stall_warning, self._suspects)
                await serving.start(watchdog.run)
            if not app.tasks:
                log.warning(
                    "worker %s serves with no task registered: it dead-letters every message "
                    "it takes as an unknown task. A process that only enqueues needs no "
                    "worker: `await app.start()` (the sync app's `app.start()`), or just "
                    "add_task, instead of `async with app:` (the sync app's `with app:`)",
                    self.id,
                )
            if probe is not None:
                answer = partial(self.health, app)
                serving.start_soon(_loud, "health probe", health.serve, answer, probe)
            serving.start_soon(_loud, "heartbeats", self._heartbeat, app, concurrency)
            serving.start_soon(_loud, "lease renewals", self._leases.keep, app)
            await app.hooks.notify("qtasks_broker_listening", app=app, worker=self)
            await app.hooks.notify(
                "qtasks_component_started", app=app, kind="worker", component=self
            )
            self._state = "serving"
            task_status.started()
            try:
                await self._stopping.wait()
            finally:
                self._state = "stopping"
                grace = 0.0 if self._hurried else config.shutdown_grace
                self._settlement.give_up_at = time.monotonic() + grace
                # Every wait below on a backend ends by the stop's deadline (the grace and
                # STOP_MARGIN; a second signal moves it closer): a stalled server cannot hold
                # the stop for its client's retries. What it cuts short is left to the leases.
                clock = self._clock
                clock.start(grace)
                grace_end = anyio.current_time() + grace  # counted from now, not after the
                # hand-back below: running tasks run on meanwhile
                with anyio.CancelScope(shield=True):
                    receiving.cancel()
                    item_ready.wake_all()
                    # Handed back once receiving ended: a claim woken in the turn the worker
                    # began stopping still hands its delivery over (a cancel reaches a woken
                    # task at its next wait), begun with the claim; left in the local queue,
                    # it went back to the broker at the consumer's exit with its record
                    # ``process``.
                    with clock.bound("the end of the consumer's claim"):
                        await received_all.wait()
                    with clock.bound() as cut:
                        await self._hand_back(app)
                    if cut.cancelled_caught:  # the one it was at, and those after it
                        clock.gave_up["hand-backs of waiting messages"] += len(self._local) + 1
                    with self._within_grace(max(grace_end - anyio.current_time(), 0.0)):
                        while self._running:
                            await self._wait_idle()
                    for run in list(self._running.values()):
                        run.cancel("__shutdown__")
                    with clock.bound():  # each run's own settle ends by the deadline too
                        while self._running:
                            await self._wait_idle()
                    await self._name_unstoppable()
                    if settler is not None:
                        # Before the consumer closes: it hands back what is not settled.
                        with clock.bound():
                            await settler.drained()
                        if settler.held():  # cut short by the deadline, or by the loop's end
                            left = clock.settler_ended if settler.ended else clock.gave_up
                            left["results of finished tasks"] += len(settler.held())
                    self._settlement.close_batch()
                    for scope in runners:
                        scope.cancel()
                    # Slots of sync threads still running are left to their leases; what
                    # they were given is torn down now, before the worker's own dependencies.
                    self._flow.aside = None
                    await self._settlement.teardowns.stop()
                    serving.cancel_scope.cancel()
                    await app.hooks.notify(
                        "qtasks_component_stopped", app=app, kind="worker", component=self
                    )

    async def _name_unstoppable(self) -> None:
        """Name the runs still going past the stop's deadline, their settles cut by it: a task
        whose code catches the cancellation and goes on (``except BaseException:``,
        ``except CancelledError:`` without ``raise``). The worker cannot end while one runs,
        and said nothing: a stop that hung for ever without a word."""
        with anyio.move_on_after(STOP_MARGIN):  # a settle cut by the deadline ends at once
            while self._running:
                await self._wait_idle()
        if self._running:
            log.error(
                "the worker cannot stop: %s did not end when cancelled (its code catches the "
                "cancellation and goes on: re-raise it); what it holds is handed back or left "
                "to its lease; end the process (SIGKILL)",
                ", ".join(
                    f"task {run.task.name} ({run.record.uuid})" for run in self._running.values()
                ),
            )

    async def _wait_idle(self) -> None:
        self._idle = anyio.Event()
        await self._idle.wait()

    async def _hand_back(self, app: AsyncQueueTasks) -> None:
        while self._local:
            _, _, delivery = heapq.heappop(self._local)
            begun: TaskRecord | None = getattr(delivery, "begun", None)
            if delivery.token not in self._start_at_once or begun is None:
                begun = None  # not begun with its claim: its record stayed queued
            self._start_at_once.discard(delivery.token)
            await self._give_back(app, delivery, begun)

    async def _give_back(
        self, app: AsyncQueueTasks, delivery: Delivery, begun: TaskRecord | None
    ) -> None:
        """Hand ``delivery`` back to the broker unstarted as the worker stops; ``begun``: its
        record if it was begun (queued again, as the flow gate's hand-back does; fenced, so
        a newer delivery's begin wins)."""
        if begun is not None and not begun.status.final:
            # Its token stays: the fence of a newer delivery's begin still holds.
            begun.status, begun.worker, begun.updated_at = TaskStatus.NEW, None, time.time()
            try:
                await app.storage.save(begun, fence=delivery.token)
            except Exception as exc:  # stopping: the next delivery's begin redoes it
                log.warning("could not requeue the record of %s: %r", delivery.id, exc)
        try:
            await self._flow.hand_back(app, delivery.token)  # its slot, before it comes back
            # Never begun: this delivery is not charged, those lost before it still count.
            await requeue_counting(delivery, "earlier")
        except Exception as exc:
            # The broker is out (a Redis requeue retries until the lease ends): the
            # message comes back after its lease, and the shutdown goes on, running tasks
            # still get their grace period.
            log.warning(
                "could not hand message %s back (its lease brings it back): %r",
                delivery.id,
                exc,
            )
            return
        await app.hooks.notify("qtasks_broker_requeued", app=app, delivery=delivery, delay=None)

    async def _heartbeat(self, app: AsyncQueueTasks, concurrency: int) -> None:
        # Every heartbeat_interval, and within HEARTBEAT_FRESH of a change of the figures, so
        # that `qtasks inspect` shows what the worker just did; gone when it stops.
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
            with shield("the heartbeat's removal", HEARTBEAT_FRESH):
                await self._last_beat(app, concurrency, interval)

    async def _last_beat(self, app: AsyncQueueTasks, concurrency: int, interval: float) -> None:
        """As the worker stops: its heartbeat removed, so that it is listed as gone at once;
        with a global config that cannot, a last beat (it expires after three intervals)."""
        global_config = app.global_config
        if not provides(global_config, HeartbeatEnd):
            await self._beat(app, concurrency, interval)
            return
        try:
            await cast(HeartbeatEnd, global_config).end_heartbeat(self.id)
        except Exception as exc:  # stopping: the heartbeat expires instead
            log.warning(
                "could not remove the heartbeat of worker %s (it expires within %g s): %r",
                self.id,
                interval * 3,
                exc,
            )

    def _stalled_for_beat(self, app: AsyncQueueTasks) -> float | None:
        """The heartbeat's ``consume_stalled`` (see :meth:`health`); ``None`` when the broker
        cannot tell, or its check fails (logged; the probe answers 500 then)."""
        try:
            return _consume_stalled(app)
        except Exception as exc:
            log.warning("the broker's consume_stalled failed: %r", exc)
            return None

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
            "beat_at": time.time(),
            "consume_stalled": self._stalled_for_beat(app),
            "stall_limit": app.config.health_stall_limit,
            "ttl": interval * 3,
        }
        try:
            await app.global_config.heartbeat(self.id, info, ttl=interval * 3)
        except ConnectionError as exc:
            self._gc_outage.failed(exc)  # one warning per outage, then the next beat tries
            return
        except Exception:
            log.warning("heartbeat to the global config failed", exc_info=True)
            return
        self._gc_outage.ok()
        try:
            await app.hooks.notify(
                "qtasks_global_config_status", app=app, worker_id=self.id, info=info
            )
        except Exception:
            log.warning("a qtasks_global_config_status hook failed", exc_info=True)

    # --- one delivery ---------------------------------------------------------------------

    async def process(self, app: AsyncQueueTasks, delivery: Delivery) -> None:
        """Handle one delivery to the end exactly as the serving loop does (decode, run, store
        the final record, settle), renewing its lease meanwhile. For runners that take
        deliveries themselves, such as the inline runner of ``qtasks_testing``."""
        if not self._serving and self._stopping.is_set():
            # The stop of an earlier run is over: a task run here must not take it for a
            # stop under way (``ctx.sleep`` would hand it back at once, again and again).
            self._stopping = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._leases.keep, app)
            try:
                with anyio.CancelScope() as scope:
                    await self._process(app, delivery, scope)
            except BaseException as exc:
                # Raised by a cancelled task in place of its cancellation (as in run's runners)
                if not is_stray(exc):
                    raise
            tg.cancel_scope.cancel()

    async def _process(
        self, app: AsyncQueueTasks, delivery: Delivery, scope: anyio.CancelScope
    ) -> None:
        """Handle ``delivery`` inside ``scope``, the runner's cancel scope (cancelled only
        through :meth:`TaskRun.cancel`, and only while that run executes)."""
        token = delivery.token
        self._beginning[token] = delivery  # renewed until it runs (a begin may be slow)
        try:
            await self._process_inner(app, delivery, scope)
        except ConnectionError as exc:
            # An outage: one warning for all of it (not a traceback per task); the message
            # comes back after a second, or after its lease if the hand-back fails too.
            self._outage.failed(exc)
            with anyio.CancelScope(shield=True):
                try:
                    # Not charged (the outage is not the message's), earlier losses kept.
                    await requeue_counting(delivery, "earlier", delay=1.0)
                except Exception:  # its lease brings it back
                    pass
        except Exception as exc:
            # A bug in a component or plugin must not kill the worker: hand back, counted,
            # later each time; dead-lettered once it failed max_deliveries times.
            await self._failed(app, delivery, exc)
        except BaseException as exc:
            if not is_stray(exc):
                raise  # the worker is torn down
            # A hook's or a component's own cancellation (a client library letting an inner
            # one escape): its failure, as above, not the worker's stop.
            who = culprit(app, exc, delivery, f"handling task {delivery.id}", "a hook or component")
            await self._failed(app, delivery, stray_error(who, exc))
        finally:
            if self._beginning.pop(token, None) is not None:
                self._lost.discard(token)  # marked by a renewal pass while it was begun
            flow = self._flow
            if delivery.token in flow.slots or delivery.token in flow.unique:
                # Admitted by flow control, then not run (found final, rejected, an error).
                with anyio.CancelScope(shield=True):
                    await flow.release(app, delivery.token, None)

    async def _failed(self, app: AsyncQueueTasks, delivery: Delivery, exc: Exception) -> None:
        """A component or plugin failed on ``delivery``: see :func:`qtasks.poison.failed`."""
        with anyio.CancelScope(shield=True):
            try:
                await self._flow.hand_back(app, delivery.token)  # before it comes back
                await poison.failed(app, delivery, exc)
            except Exception:
                log.exception("could not hand message %s back", delivery.id)

    async def _begin_leased(
        self, app: AsyncQueueTasks, delivery: Delivery, claim: TaskRecord, generation: int
    ) -> TaskRecord | None:
        """Begin ``claim`` in the app's storage (with the tasks that start together, or alone
        for a ``generation``), fenced by ``delivery``'s lease: ``None`` when the lease was lost,
        and the task must not start. Another worker may hold the delivery by then (this one's
        lease ran out while it waited here unrenewed, or while the loop stalled), and no
        storage knows the broker's leases: begun, it would take the record from the delivery
        that runs the task, and run it twice.

        A :class:`~qtasks.components.LeaseDeadline` delivery says until when its lease
        surely holds: a begin sent with more than a third of the lease left, whose reply comes
        before that time, landed while no other delivery could be handed out, and costs no
        call to the broker; otherwise the lease is renewed (:meth:`Delivery.extend`, one
        round trip) before the begin, or after it, before the task starts. Any other delivery
        is renewed before the begin (a local check for RabbitMQ)."""
        until: float | None = getattr(delivery, "held_until", None)
        if until is None:
            if not await delivery.extend():
                return None
            return await self._begin(app, claim, generation)
        lease = delivery_lease(app.broker, app.config)
        if time.monotonic() >= until - lease * BEGIN_LEFT and not await delivery.extend():
            return None
        record = await self._begin(app, claim, generation)
        until = getattr(delivery, "held_until", until)  # renewed meanwhile, maybe
        if time.monotonic() >= until - lease * LEASE_SKEW and not await delivery.extend():
            # The reply came too late to tell that the begin landed within the lease, and the
            # broker says it is lost: the begin may have taken the record from the delivery
            # that holds the task, whose result is then refused and the task runs again (at
            # least once), but never here.
            return None
        return record

    async def _begin(self, app: AsyncQueueTasks, claim: TaskRecord, generation: int) -> TaskRecord:
        """:meth:`Storage.begin` of ``claim``: alone for a ``generation``, else shared with
        the tasks starting meanwhile (:class:`~qtasks.begin.BeginBatch`)."""
        if generation:
            return await app.storage.begin(claim, generation=generation)
        begins = self._begins
        if begins is None or begins.storage is not app.storage:
            # Made on first use: qtasks-testing's harness processes deliveries without ``run``.
            begins = self._begins = BeginBatch(app.storage)
        return await begins.begin(claim)

    async def _process_inner(
        self, app: AsyncQueueTasks, delivery: Delivery, scope: anyio.CancelScope
    ) -> None:
        at_once = delivery.token in self._start_at_once
        self._start_at_once.discard(delivery.token)
        hooks = app.hooks
        if "qtasks_broker_message_received" in hooks.active:
            await hooks.notify("qtasks_broker_message_received", app=app, delivery=delivery)
        try:
            message = app.codec.decode(delivery.body)
        except SerializationError as exc:
            # Refused by its size before any decoding: not "undecodable", what an operator
            # would look for in its body.
            what = (
                "message too large"
                if isinstance(exc, MessageTooLargeError)
                else "undecodable message"
            )
            stored = await app.storage.get(delivery.id)
            await poison.reject(app, delivery, f"{what}: {exc}", stored)
            return
        task = app.tasks.get(message.task_name)
        problem: str | None = None
        if task is None:
            problem = str(UnknownTaskError(message.task_name, app.tasks))
        else:
            try:
                task.check_arguments(message.args, message.kwargs)
            except TaskArgumentsError as exc:
                problem = f"wrong arguments: {exc}"
        if problem is not None or task is None:
            stored = await app.storage.get(message.uuid)
            if stored is not None and stored.status.final:
                if stored.workflow is not None:
                    await workflows.found_final(app, stored)
                await delivery.ack()  # cancelled while queued, or already finished
                return
            await poison.reject(app, delivery, problem or "", stored or record_of(message))
            return
        if "qtasks_worker_task_received" in hooks.active:
            await hooks.notify("qtasks_worker_task_received", app=app, message=message)
        headers = message.headers
        step_input: tuple[Any] | None = None  # read by a concurrency key: given to the run
        if task.flow is not None or (headers and not ADMIT_HEADERS.isdisjoint(headers)):
            # Expiry, rate, concurrency, unique keys (qtasks.flow).
            try:
                admitted, step_input = await self._flow.admit(app, task, message, delivery)
                if not admitted:
                    return
            except (TaskArgumentsError, WorkflowInputError) as exc:
                # A concurrency key function that fails, or a workflow step whose input (the
                # key may be of it) cannot be read: rejected, its record (and workflow) failed.
                await poison.reject(app, delivery, str(exc), await app.storage.get(message.uuid))
                return
        # Deliveries of a BeginOnClaim broker that went straight to a free runner carry the
        # record begun with their claim: the task started, as far as the storage knows, when
        # it was claimed, so a cancel made after the claim is the cancel of a running task (the
        # feed or the lease keeper's check brings it to the run). The others stayed queued in
        # storage while they waited here and are begun now: a cancel made while they waited
        # is seen, and the task never runs. Decided by state, not by time.
        begun: TaskRecord | None = getattr(delivery, "begun", None)
        if begun is not None and at_once and delivery.id not in self._recent_cancels:
            record = begun
            record.attempt = message.attempt + 1
        else:
            claim = record_of(message)
            claim.status = TaskStatus.PROCESS
            claim.attempt = message.attempt + 1
            claim.token = delivery.token
            claim.worker = self.id
            try:
                generation = workflows.generation(message.headers) if message.headers else 0
                folding = self._settlement.folding
                if folding is not None and not generation:
                    # A remote SettleBegin broker: the begin rides the settle calls, which
                    # fence it themselves (see below).
                    record = await folding.begin(claim)
                else:
                    # A workflow step published again (rare) is begun alone, checked.
                    leased = await self._begin_leased(app, delivery, claim, generation)
                    if leased is None:
                        log.warning("lease of message %s was lost before it started", delivery.id)
                        return
                    record = leased
            except SerializationError as exc:
                # The stored record cannot be read (written by something else): poison too.
                await poison.reject(app, delivery, f"stored task record unreadable: {exc}", None)
                return
        if record.status.final:
            # Cancelled while queued, or finished by an attempt whose ack got lost.
            if record.workflow is not None:
                await workflows.found_final(app, record)
            await delivery.ack()
            if (
                record.status is TaskStatus.CANCEL
                and begun is not None
                and not begun.status.final
                and record.token == delivery.token
            ):
                # Cancelled after this delivery's claim began it: the canceller saw it
                # ``process`` and left the hook to this worker, which drops it unstarted.
                reason = record.cancel_reason or "cancelled"
                log.info("task %s was cancelled before it started (%s)", record.uuid, reason)
                await hooks.notify("qtasks_task_cancelled", app=app, record=record, reason=reason)
            return
        if record.token != delivery.token and record.workflow is not None:
            # Not begun: a stale copy of a workflow step published again since (see
            # WorkflowStore.republish); the copy published last runs, this one is dropped.
            log.info("dropped a stale copy of workflow step %s", delivery.id)
            await delivery.ack()
            return
        if record.token != delivery.token and self._settlement.folding is not None:
            # Not begun: its lease ran out before its begin (the worker stalled) and another
            # delivery holds the task now (see SettleBegin); that one runs it.
            log.warning("lease of message %s was lost before it started", delivery.id)
            return
        if self._serving and self._stopping.is_set():
            # The serving worker began stopping while this task was being begun: it does not
            # start now (shutdown finishes the running tasks only), it is handed back as the
            # waiting ones are. (Not for runners that process deliveries themselves.)
            await self._give_back(app, delivery, record)
            return
        del self._beginning[delivery.token]
        if delivery.token in self._lost:
            # Its lease ran out while it was begun (renewal failed): another worker owns it.
            self._lost.discard(delivery.token)
            log.warning("lease of message %s was lost before it started", delivery.id)
            return
        record.started_at = record.updated_at  # as begun: stored with the final record
        if "qtasks_storage_saved" in hooks.active:
            await hooks.notify("qtasks_storage_saved", app=app, record=record)
        run = TaskRun(
            app=app,
            task=task,
            message=message,
            record=record,
            delivery=delivery,
            cancel_scope=scope,
            step_input=step_input,
        )
        self._running[delivery.token] = run
        heard = self._recent_cancels.get(record.uuid)
        if heard is not None:
            run.cancel(heard)  # heard of while the record was begun: it never starts
        try:
            if "qtasks_worker_execute_before" in hooks.active:
                await hooks.notify("qtasks_worker_execute_before", app=app, record=record, run=run)
            await self._execute(app, run, delivery)
        finally:
            del self._running[delivery.token]
            if self._flow.slots or self._flow.unique:
                with anyio.CancelScope(shield=True):
                    await self._flow.release(app, delivery.token, run.record, run.abandoned)
            self.processed += 1
            idle = getattr(self, "_idle", None)
            if idle is not None:
                idle.set()

    async def _execute(self, app: AsyncQueueTasks, run: TaskRun, delivery: Delivery) -> None:
        outcome: BaseException | None = None
        result: Any = None
        if run.cancel_requested:  # cancelled between begin and now: never start it
            await self._settlement.settle(app, run, delivery, None, None, cancelled=True)
            return
        run.executing = True
        try:
            result = await task_executor(run).execute(run)
        except Exception as exc:
            outcome = exc
        except BaseException as exc:
            if run.cancel_requested and isinstance(exc, anyio.get_cancelled_exc_class()):
                run.executing = False
                # The runner's scope is cancelled: settle shielded (a teardown's, a hook's or a
                # component's own CancelledError in there is still theirs, see shielded), then
                # let the cancellation end the scope (the runner takes a fresh one).
                await self._settlement.settle_shielded(
                    app, run, delivery, None, None, cancelled=True
                )
                raise
            if not is_stray(exc):
                raise  # the worker itself is torn down: not acked, comes back after its lease
            # A cancellation of the task's own (it awaited something that was cancelled): not
            # an order to stop, the task's failure, settled as any other.
            outcome = stray_error(f"task {run.task.name!r}", exc)
        finally:
            run.executing = False
        if run.cancel_requested:
            # Cancelled as it finished (or the task swallowed the cancellation): the scope is
            # cancelled, so only shielded awaits can still run in it.
            await self._settlement.settle_shielded(
                app, run, delivery, result, outcome, cancelled=False
            )
            return
        await self._settlement.settle(app, run, delivery, result, outcome, cancelled=False)


def task_executor(run: TaskRun) -> TaskExecutor:
    """The executor for ``run``: the task's own, else the worker's."""
    custom = run.task.options.executor
    if custom is not None:
        return custom() if isinstance(custom, type) else custom  # type: ignore[no-any-return]
    worker = run.app.worker
    executor: TaskExecutor = getattr(worker, "executor", None) or TaskExecutor()
    return executor


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


def _consume_stalled(app: AsyncQueueTasks) -> float | None:
    """The app's broker's :meth:`~qtasks.components.ConsumeHealth.consume_stalled`, to the
    millisecond; ``None`` for a broker without it. ``0.0`` while the components are not
    started (none consumes; the probe answers while they start): a broker is not asked
    before its start."""
    broker = app.broker
    if not provides(broker, ConsumeHealth):
        return None
    return round(cast(ConsumeHealth, broker).consume_stalled(), 3) if app.started else 0.0


async def _loud(
    what: str, func: Callable[..., Awaitable[object]], *args: Any, **kwargs: Any
) -> None:
    """Await ``func(*args, **kwargs)``, a task of the serving loop doing ``what``. A stray
    cancellation out of it (a client library's own, see :mod:`qtasks.cancels`) would end the
    loop as a stop does, without a word: it is raised as a
    :class:`~qtasks.errors.StrayCancellationError` instead, which ends the worker with that
    error, as any other exception of these tasks does."""
    try:
        await func(*args, **kwargs)
    except BaseException as exc:
        if not is_stray(exc):
            raise
        raise stray_error(f"the worker's {what}", exc) from exc
