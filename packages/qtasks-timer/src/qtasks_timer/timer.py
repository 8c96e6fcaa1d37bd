"""The async timer: scheduled enqueues that run inside the app, once per tick across replicas.

One anyio task computes each timer's next tick from its trigger and sleeps until the earliest
one. At a tick it claims ``timers/<timer id>:<tick>`` in the app's GlobalConfig with
``set_if_absent``; only the replica whose claim succeeds enqueues. The tick is the scheduled
time, not the time the replica woke up, so every replica (and every restart) competes for the
same key.

Over ~500 lines: one class, :class:`AsyncTimer`, whose loop, tick claims, admin calls (pause,
inspect) and lifecycle share its entries and its clock; triggers, settings, outages and the
sync facade are modules of their own.
"""

from __future__ import annotations

import logging
import signal
import warnings
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from enum import Enum
from typing import TYPE_CHECKING, Any, cast

import anyio
from anyio.abc import TaskGroup
from anyio.abc import TaskStatus as AnyioTaskStatus

from qtasks.checks import check_priority
from qtasks.compat.calls import UNSET, split_task_name
from qtasks.compat.config import QTasksCompatWarning
from qtasks.components import CompareDelete, provides
from qtasks.config import close_names
from qtasks.errors import TaskArgumentsError
from qtasks.sync import QueueTasks
from qtasks_timer.claims import TickClaim, claimer
from qtasks_timer.errors import ScheduleError, TimerError
from qtasks_timer.outage import TickOutage
from qtasks_timer.settings import TimerSettings
from qtasks_timer.triggers import (
    MAX_SECONDS,
    Schedule,
    Trigger,
    derive_id,
    first_tick,
    is_calendar,
    next_fire,
    plan,
    tick_key,
    ticks_before,
    to_trigger,
    trigger_text,
)

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

log = logging.getLogger("qtasks.timer")

CLAIMS = "timers"
"""GlobalConfig namespace of tick claims (``<timer id>:<tick>`` → the claim's record, a
:class:`~qtasks_timer.claims.TickClaim`: the claiming worker's id and the ticks its run
accounts for)."""
PAUSED = "timers_paused"
"""GlobalConfig namespace of paused timers (``<timer id>`` → ``True``)."""

HEADER = "qtasks_timer"
"""Message header of timer-enqueued tasks: ``{"id": timer id, "tick": tick key, "late": number
of earlier ticks coalesced into this run}``."""

SKIP_UNFIT: ContextVar[bool] = ContextVar("qtasks_timer_skip_unfit", default=False)
"""Set by the plugin while it builds the app's timer and starts it as the worker starts: a
timer whose arguments do not fit its task (configured, or added in code before its task was
declared, see :meth:`AsyncTimer._check_arguments`) is logged and left out, and the others
run. (An error there is a notification hook's, logged and ignored: every timer of the app
was left out.)"""

FIRING: ContextVar[dict[str, Any] | None] = ContextVar("qtasks_timer_firing", default=None)
"""Set while the timer enqueues a tick (once it runs: after the start :data:`SKIP_UNFIT`
covers); the plugin copies it into the message headers (:data:`HEADER`)."""

_MAX_SLEEP = 1.0  # re-read the wall clock at least this often: it may jump
_SKEW_ALLOWANCE = 600.0  # seconds replicas' clocks may disagree by, kept in claim TTLs
_DST_ALLOWANCE = 7200.0  # a repeated local hour must still find the first run's claim
_ENQUEUE_TIMEOUT = 30.0  # seconds a tick's claim and enqueue may take before they are abandoned
_RETRY_DELAY = 1.0  # seconds before a failed tick is tried again (while within its grace)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True, eq=False)
class _Entry:
    id: str
    task_name: str
    trigger: Trigger
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    priority: int | None
    grace: float
    next_fire: datetime | None = None
    retry_at: datetime | None = None
    last_key: str | None = None
    armed: bool = False
    fired: int = 0
    outage: TickOutage | None = None
    folded: int = 0
    """Ticks before ``next_fire`` already coalesced into it: those of a run whose claim failed
    in an outage, counted again in ``late`` when it is tried again (not after a restart)."""
    first: str | None = None
    """The key of the earliest of the ``folded`` ticks."""
    won: tuple[str, int, str] | None = None
    """A tick this replica won the claim of and did not enqueue, since the claim returned once
    a later tick was due (its key, the number of ticks coalesced into it and the key of the
    earliest): it coalesces into the latest due tick, and is enqueued after all if another
    replica has that one and its run does not account for it. Kept for the retry when that
    tick's claim fails in an outage."""
    ran: str | None = None
    """The key of the latest tick this replica enqueued (recorded in its claims)."""
    catch_up: datetime | None = None
    """The first tick of the start-up's catch-up, until the claims of the ticks it coalesces
    are read: those up to the latest that has a claim were handled by a run before."""
    source: str = "code"
    handles: list[TimerHandle] = field(default_factory=list)
    checked: bool = False
    """Its arguments were checked against its task's signature (the task was declared when
    the timer was added; else :meth:`AsyncTimer.run` checks them as it starts)."""

    @property
    def wake_at(self) -> datetime | None:
        """When the loop handles this timer next: its next tick, or later while a failed
        tick waits to be tried again."""
        if self.next_fire is None or self.retry_at is None:
            return self.next_fire
        return max(self.next_fire, self.retry_at)

    @property
    def claim_ttl(self) -> float:
        extra = _DST_ALLOWANCE if is_calendar(self.trigger) else 0.0
        return self.grace + _SKEW_ALLOWANCE + extra


class _Claim(Enum):
    """What :meth:`AsyncTimer._fire` made of a tick's claim."""

    DONE = "done"
    """Enqueued (the tick, or the one this replica won), lost in time, or the timer is paused."""
    WON_LATE = "won late"
    """Won, but the answer came once the timer's next tick was due: not enqueued."""
    LOST_LATE = "lost late"
    """Lost, and the answer came once the timer's next tick was due (the tick this replica
    won, if any, is enqueued unless the winner's run accounts for it)."""


class TimerHandle:
    """One scheduled timer. ``pause``/``resume`` act on every replica (the flag lives in the
    GlobalConfig); ``remove`` stops scheduling it in this process only."""

    def __init__(self, timer: AsyncTimer, entry: _Entry) -> None:
        self._timer = timer
        self._entry = entry

    @property
    def id(self) -> str:
        """Stable across processes: explicit, or derived from task, trigger and arguments."""
        return self._entry.id

    @property
    def task_name(self) -> str:
        return self._entry.task_name

    @property
    def trigger(self) -> Trigger:
        return self._entry.trigger

    @property
    def next_run_time(self) -> datetime | None:
        """The next tick this process will consider (computed from now when not running)."""
        return self._timer._next_run(self._entry)

    async def pause(self) -> None:
        """Stop enqueueing this timer's ticks, on every replica, until :meth:`resume`."""
        await self._timer._set_paused(self._entry.id, True)

    async def resume(self) -> None:
        """Enqueue ticks again from the next one (paused ticks are not caught up)."""
        await self._timer._set_paused(self._entry.id, False)

    async def is_paused(self) -> bool:
        return await self._timer._is_paused(self._entry.id)

    async def remove(self) -> None:
        """Stop scheduling this timer in this process."""
        self._timer.remove(self._entry.id)

    def __repr__(self) -> str:
        return f"<TimerHandle {self.id} {trigger_text(self.trigger)}>"


class AsyncTimer:
    """Periodic and cron tasks for an :class:`~qtasks.AsyncQueueTasks` app.

    Timers run while the app serves (``async with app:``, ``app.run_forever()``, the worker
    CLI): no separate process. ``run_forever()`` (or ``async with timer:``) runs them without
    a worker. One timer per app; timers declared in configuration (``[[extra.timers]]``, see
    :mod:`qtasks_timer.settings`) are added when it is created.
    ``misfire_grace`` (seconds) is the default catch-up window, see :meth:`add_task`.
    ``bind=False`` makes a timer that is not the app's (no plugin is added, the worker does
    not run it, a later ``AsyncTimer(app)`` is free): for reading the declared timers
    (:meth:`describe`, as the dashboard does).

    Given the sync :class:`~qtasks.QueueTasks` (QTasks' ``AsyncTimer(app=QueueTasks(...))``),
    the timer runs on its async core, ``app.aio`` (which :attr:`app` is then), as
    :class:`~qtasks_timer.SyncTimer` does: the sync app's blocking calls cannot run in the
    timer's event loop.
    """

    def __init__(
        self,
        app: AsyncQueueTasks | QueueTasks,
        *,
        misfire_grace: float = 60.0,
        clock: Callable[[], datetime] = _utcnow,
        bind: bool = True,
    ) -> None:
        from qtasks_timer.plugin import TimerPlugin  # the plugin module imports this one

        _check_grace(misfire_grace)
        self.app: AsyncQueueTasks = app.aio if isinstance(app, QueueTasks) else app
        self.misfire_grace = misfire_grace
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._wake: anyio.Event | None = None
        self._running = False
        self._task_group: TaskGroup | None = None
        self._started_app = False
        self.load_config()
        if bind:
            TimerPlugin.bind(self.app, self)

    # --- declaring ------------------------------------------------------------------------

    def add_task(
        self,
        task_name: str = UNSET,
        /,
        *args: Any,
        trigger: Schedule,
        timezone: str | tzinfo | None = None,
        timer_id: str | None = None,
        misfire_grace: float | None = None,
        priority: int | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> TimerHandle:
        """Enqueue ``task_name(*args, **kwargs)`` at every tick of ``trigger``.

        ``trigger``: an APScheduler trigger (``CronTrigger``, ``IntervalTrigger``,
        ``DateTrigger``, combinations), a crontab string (``"*/5 * * * *"``; six fields for
        seconds; ``@daily``...) evaluated in ``timezone`` (default UTC), or an interval
        (``timedelta`` or seconds, aligned to the epoch). ``timer_id`` defaults to one derived
        from task, trigger and arguments. A tick found late by less than ``misfire_grace``
        seconds still fires (several such ticks coalesce into one run); older ones are skipped.
        Tasks whose own parameters use these names are scheduled with :meth:`schedule`.
        QTasks' form, ``add_task(5, task_name="x", trigger=...)``, works too; its ``timeout=``
        is accepted and ignored with a ``QTasksCompatWarning`` (a timer waits for no result)."""
        task_name, args = split_task_name(task_name, args, kwargs)
        if timeout is not None:
            timeout_kwarg(self.app, task_name, timeout, kwargs)
        return self.schedule(
            task_name,
            trigger,
            args,
            kwargs,
            timezone=timezone,
            timer_id=timer_id,
            misfire_grace=misfire_grace,
            priority=priority,
        )

    def schedule(
        self,
        task_name: str,
        trigger: Schedule,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timezone: str | tzinfo | None = None,
        timer_id: str | None = None,
        misfire_grace: float | None = None,
        priority: int | None = None,
    ) -> TimerHandle:
        """:meth:`add_task` with explicit ``args``/``kwargs`` (every keyword stays free)."""
        return self._add(
            task_name, trigger, args, kwargs, timezone, timer_id, misfire_grace, priority, "code"
        )

    def _add(
        self,
        task_name: str,
        schedule: Schedule,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        timezone: str | tzinfo | None,
        timer_id: str | None,
        misfire_grace: float | None,
        priority: int | None,
        source: str,
    ) -> TimerHandle:
        if not isinstance(task_name, str):  # else every tick fails, in the worker's log
            raise ScheduleError(
                f"timer: a task name must be a str, got {task_name!r}; name the task first: "
                "add_task('name', *args, trigger=...)"
            )
        trigger = to_trigger(schedule, timezone)
        if priority is not None:
            priority = check_priority(priority, "timer priority", ScheduleError)
        args_t, kwargs_d = tuple(args), dict(kwargs or {})
        task = self.app.tasks.get(task_name)
        if task is not None:  # else checked when the timer starts (_check_arguments)
            task.check_arguments(args_t, kwargs_d)
        grace = self.misfire_grace if misfire_grace is None else misfire_grace
        _check_grace(grace)
        ident = timer_id or derive_id(task_name, trigger, list(args_t), kwargs_d)
        existing = self._entries.get(ident)
        if existing is not None:
            if (
                trigger_text(existing.trigger) != trigger_text(trigger)
                or existing.task_name != task_name
            ):
                raise TimerError(f"timer id {ident!r} is already used by another timer")
            return TimerHandle(self, existing)
        entry = _Entry(ident, task_name, trigger, args_t, kwargs_d, priority, grace, source=source)
        entry.checked = task is not None
        self._entries[ident] = entry
        if self._running:
            self._arm(entry, self._clock())
            self._poke()
        return TimerHandle(self, entry)

    def remove(self, timer_id: str) -> None:
        """Stop scheduling ``timer_id`` in this process."""
        if self._entries.pop(timer_id, None) is None:
            raise TimerError(f"no timer with id {timer_id!r}")
        self._poke()

    def get(self, timer_id: str) -> TimerHandle:
        """The handle of ``timer_id``."""
        entry = self._entries.get(timer_id)
        if entry is None:
            raise TimerError(f"no timer with id {timer_id!r}")
        return TimerHandle(self, entry)

    @property
    def timers(self) -> list[TimerHandle]:
        """Handles of every timer of this process."""
        return [TimerHandle(self, entry) for entry in self._entries.values()]

    def load_config(self) -> list[TimerHandle]:
        """Add the timers declared in the app's configuration (done when the timer is
        created): ``config.extra["timers"]`` (``[[extra.timers]]``), then the deprecated
        top-level ``timers``; see :mod:`qtasks_timer.settings`.

        Each entry is a table with ``task`` and either ``schedule`` (crontab string) or
        ``interval`` (seconds), and optional ``args``, ``kwargs``, ``id``, ``timezone``,
        ``misfire_grace``, ``priority``."""
        settings = TimerSettings.from_config(self.app.config)
        handles = []
        for index, spec in enumerate(settings.timers):
            try:
                handles.append(
                    self._add(
                        spec.task,
                        spec.schedule,
                        spec.args,
                        spec.kwargs,
                        spec.timezone,
                        spec.id,
                        spec.misfire_grace,
                        spec.priority,
                        "config",
                    )
                )
            except TaskArgumentsError as exc:
                if not SKIP_UNFIT.get():
                    raise
                log.error("extra.timers[%d] is not scheduled (the others are): %s", index, exc)
        return handles

    # --- running --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    async def run(self, *, task_status: AnyioTaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Schedule until cancelled (the app's components must be started). Reports readiness
        through ``task_status`` once every timer has its first tick. Started by the plugin when
        the app serves; a second concurrent ``run`` returns at once."""
        if self._running:
            task_status.started()
            return
        self._check_arguments()
        self._running = True
        self._wake = anyio.Event()
        try:
            now = self._clock()
            for entry in self._entries.values():
                self._arm(entry, now)
            log.info("timer started with %d timer(s)", len(self._entries))
            self._warn_foreign_tasks()
            task_status.started()
            await self._loop()
        finally:
            self._running = False
            self._wake = None
            for entry in self._entries.values():
                entry.armed = False

    def _check_arguments(self) -> None:
        """Check the arguments of the timers added before their task was declared against
        its signature now, as the timers start, not when each first fires: raise
        :class:`~qtasks.errors.TaskArgumentsError` naming the timer, the task and the
        parameter; as the worker starts them (:data:`SKIP_UNFIT`), log it and leave that timer
        out, the others run. Injected parameters (State, Depends, an echo task's ``self``)
        are not the caller's, as for ``add_task``."""
        tasks = self.app.tasks
        for entry in list(self._entries.values()):
            task = tasks.get(entry.task_name)
            if entry.checked or task is None:
                continue
            try:
                task.check_arguments(entry.args, entry.kwargs)
            except TaskArgumentsError as exc:
                error = TaskArgumentsError(f"timer {entry.id}: {exc}")
                if not SKIP_UNFIT.get():
                    raise error from None
                log.error("timer %s is not scheduled (the others are): %s", entry.id, error)
                del self._entries[entry.id]
                continue
            entry.checked = True

    def _warn_foreign_tasks(self) -> None:
        """Warn about each timer whose task this app, which has tasks, does not have (a
        misspelt name in ``[[extra.timers]]``): every tick would be a poison message to its
        workers. Not an error: an app may schedule another app's tasks, and one without
        tasks (a process that only runs timers) is not warned about."""
        tasks = self.app.tasks
        if not tasks:
            return
        for entry in self._entries.values():
            if entry.task_name in tasks:
                continue
            close = close_names(entry.task_name, tasks)
            log.warning(
                "timer %s: this app has no task %r%s; its ticks are enqueued for the workers "
                "of an app that has it, and dead-lettered by those that do not",
                entry.id,
                entry.task_name,
                f" (did you mean {close[0]!r}?)" if close else "",
            )

    async def _loop(self) -> None:
        # Each due timer ticks in a task of its own: a tick whose enqueue is slow (up to the
        # enqueue timeout) holds back only its own timer, not the others.
        ticking: set[str] = set()

        async def tick(entry: _Entry, now: datetime) -> None:
            try:
                await self._tick(entry, now)
            finally:
                ticking.discard(entry.id)
                self._poke()  # its next tick may be due already

        async with anyio.create_task_group() as tg:
            while True:
                now = self._clock()
                idle = [e for e in self._entries.values() if e.id not in ticking and e.wake_at]
                for entry in idle:
                    if entry.wake_at is not None and entry.wake_at <= now:
                        ticking.add(entry.id)
                        tg.start_soon(tick, entry, now, name=f"timer tick {entry.id}")
                soonest = min(
                    (e.wake_at for e in idle if e.wake_at and e.id not in ticking), default=None
                )
                delay = _MAX_SLEEP
                if soonest is not None:
                    delay = min(delay, (soonest - now).total_seconds())
                assert self._wake is not None
                with anyio.move_on_after(max(delay, 0.0)):
                    await self._wake.wait()
                if self._wake.is_set():
                    self._wake = anyio.Event()

    def _arm(self, entry: _Entry, now: datetime) -> None:
        entry.armed = True
        # A retry left pending by a stop is not tried: the first tick counts the ticks
        # within the grace itself, those the retry had coalesced among them.
        entry.retry_at, entry.folded, entry.first, entry.won = None, 0, None, None
        try:
            entry.next_fire = first_tick(entry.trigger, now, entry.grace)
            entry.catch_up = entry.next_fire
        except Exception:
            self._trigger_failed(entry)

    def _trigger_failed(self, entry: _Entry) -> None:
        # Called handling the trigger's exception (logged with its traceback). The trigger
        # would raise again at every tick; the other timers must go on.
        entry.next_fire = None
        log.exception(
            "timer %s (task %s): its trigger raised computing a tick; the timer is stopped in "
            "this process until it restarts",
            entry.id,
            entry.task_name,
        )

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _tick(self, entry: _Entry, now: datetime) -> None:
        try:
            due = self._due(entry, now, folded=entry.folded, first=entry.first)
        except Exception:
            self._trigger_failed(entry)
            return
        won, entry.folded, entry.first, entry.won = entry.won, 0, None, None
        if due is None or entry.id not in self._entries:
            entry.catch_up = None  # no catch-up at start: a later tick's run is not one
            return
        retry, entry.retry_at = entry.retry_at is not None, None
        while True:
            fire, key, coalesced, first = due
            previous, entry.last_key = entry.last_key, key
            try:
                if entry.catch_up is not None:
                    coalesced, first = await self._not_run(entry, fire, key, coalesced, first)
                claim = await self._fire(entry, key, coalesced, first, retry=retry, won=won)
            except Exception as exc:
                self._failed(entry, key, fire, previous, exc)
                if entry.retry_at is not None:  # tried again: with the ticks folded into it
                    entry.folded, entry.first, entry.won = coalesced, first, won
                return
            if claim is _Claim.LOST_LATE:
                # The claim's winner coalesces the ticks due since into the latest. Were this
                # replica to take that one, the winner would enqueue its won tick on its own
                # as well: two runs for one outage.
                self._pass_due(entry)
            if claim is not _Claim.WON_LATE:
                break
            # Later ticks came due while the claim waited (a GlobalConfig riding out an
            # outage): they and this one coalesce into one run of the latest, the misfire
            # policy's catch-up, instead of this tick running late and the others after it.
            # Should another replica have that tick (it was not held up) and its run not
            # account for this one, this one is enqueued after all: a tick whose claim this
            # replica won runs.
            won = (key, coalesced, first)
            try:
                due = self._due(entry, self._clock(), folded=coalesced + 1, first=first)
            except Exception:
                self._trigger_failed(entry)
                due = None
            if entry.id not in self._entries:
                return
            retry = due is None
            if due is None:  # none to coalesce into (past the grace, or the trigger failed)
                due, won = (fire, key, coalesced, first), None
        if entry.outage is not None:
            entry.outage.over(key, self._clock())
            entry.outage = None

    def _pass_due(self, entry: _Entry) -> None:
        """Move ``entry`` past the ticks due now without claiming them: another replica
        has them."""
        now = self._clock()
        if entry.next_fire is None or entry.next_fire > now:
            return
        try:
            due = self._due(entry, now)
        except Exception:
            self._trigger_failed(entry)
            return
        if due is not None:
            entry.last_key = due[1]

    def _failed(
        self, entry: _Entry, key: str, fire: datetime, previous: str | None, exc: Exception
    ) -> None:
        """Tick ``key`` (at ``fire``) failed with ``exc``: an outage's tick is due again after
        a pause (the misfire policy decides then whether it is still on time), any other
        failure is logged and the tick is not tried again."""
        if not isinstance(exc, TimeoutError | ConnectionError):
            # Unknown task, wrong arguments, a plugin's bug: trying again changes nothing.
            log.error("timer %s: tick %s failed (not tried again)", entry.id, key, exc_info=exc)
            return
        # Its claim is released.
        entry.last_key, entry.next_fire = previous, fire
        now_c = self._clock()
        entry.retry_at = now_c + timedelta(seconds=_RETRY_DELAY)
        if entry.outage is None:
            entry.outage = TickOutage(entry.id, now_c)
        cause = (
            f"claim and enqueue took over {_ENQUEUE_TIMEOUT:g} s"
            if isinstance(exc, TimeoutError)
            else f"{type(exc).__name__}: {exc}"
        )
        again = f"tried again every {_RETRY_DELAY:g} s within misfire_grace={entry.grace}s"
        entry.outage.failed(key, cause, again, now_c)

    def _due(
        self, entry: _Entry, now: datetime, *, folded: int = 0, first: str | None = None
    ) -> tuple[datetime, str, int, str] | None:
        """Apply the misfire policy to the due ``entry`` and move its next tick on: the tick
        to fire, its key, the number of ticks coalesced into it and the key of the earliest
        of them (its own when none), or ``None``. ``folded``: ticks before the due one that
        coalesce into it too (unless they are past the grace), the earliest ``first``."""
        assert entry.next_fire is not None
        decision = plan(entry.trigger, entry.next_fire, now, entry.grace)
        entry.next_fire = decision.next
        if decision.skipped:
            # During an outage the skipped ticks count among those it reports at its end.
            log.log(
                logging.DEBUG if entry.outage is not None else logging.WARNING,
                "timer %s: ticks older than misfire_grace=%ss were skipped",
                entry.id,
                entry.grace,
            )
        if decision.fire is None:
            if decision.skipped and entry.outage is not None:
                entry.outage.given_up(entry.grace, now)
                entry.outage = None
            return None
        key = tick_key(entry.trigger, decision.fire)
        if entry.last_key is not None and key <= entry.last_key:
            # The wall clock went back, or a local hour repeats (DST): this tick was handled.
            entry.next_fire = next_fire(entry.trigger, decision.fire, max(now, decision.fire))
            return None
        counted = 0 if decision.skipped else folded
        if not counted or first is None:
            assert decision.first is not None
            first = tick_key(entry.trigger, decision.first)
        return decision.fire, key, decision.coalesced + counted, first

    async def _fire(
        self,
        entry: _Entry,
        key: str,
        coalesced: int,
        first: str,
        *,
        retry: bool,
        won: tuple[str, int, str] | None = None,
    ) -> _Claim:
        """Claim tick ``key`` (whose run coalesces ``coalesced`` ticks from ``first``) and, if
        this replica won it, enqueue it. If it lost it, enqueue ``won`` instead (see
        :attr:`_Entry.won`: an earlier tick that coalesced into ``key``, claimed by this
        replica), unless the winner's run accounts for it (see :class:`TickClaim`).
        ``retry``: a claim of ``key`` by this worker counts as won. On
        :attr:`_Claim.WON_LATE` ``key`` is not enqueued and its claim is kept: the caller
        coalesces it into a later tick."""
        app = self.app
        claim = f"{entry.id}:{key}"
        record = TickClaim(app.worker.id, first if coalesced else None, entry.ran)
        # Claim and enqueue as one step that shutdown cannot split: a won claim whose
        # enqueue never happened would lose the tick on every replica.
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(_ENQUEUE_TIMEOUT):
                    if await self._is_paused(entry.id):
                        return _Claim.DONE
                    claimed = await app.global_config.set_if_absent(
                        CLAIMS, claim, record.value(), ttl=entry.claim_ttl
                    )
                    if not claimed and retry:
                        # A failed attempt's claim that could not be released is still ours.
                        held = await app.global_config.get(CLAIMS, claim)
                        claimed = claimer(held) == app.worker.id
                    late = entry.next_fire is not None and entry.next_fire <= self._clock()
                    if claimed and late:
                        log.debug("timer %s: tick %s claimed after the next one", entry.id, key)
                        return _Claim.WON_LATE
                    if not claimed:
                        log.debug("timer %s: tick %s claimed by another replica", entry.id, key)
                        if won is None or await self._accounted(entry, claim, won[0]):
                            return _Claim.LOST_LATE if late else _Claim.DONE
                        key, coalesced, _ = won
                        log.debug("timer %s: enqueueing tick %s, which it won", entry.id, key)
                    token = FIRING.set({"id": entry.id, "tick": key, "late": coalesced})
                    try:
                        await app.enqueue(
                            entry.task_name, entry.args, entry.kwargs, priority=entry.priority
                        )
                    finally:
                        FIRING.reset(token)
                    entry.ran = key
            except Exception:
                # Outside the timed-out scope, whose cancellation would stop the release too.
                await self._release(claim, quiet=entry.outage is not None)
                raise
        entry.fired += 1
        if coalesced:
            log.info("timer %s: %d late tick(s) coalesced into %s", entry.id, coalesced, key)
        log.debug("timer %s: enqueued %s for tick %s", entry.id, entry.task_name, key)
        return _Claim.LOST_LATE if late and not claimed else _Claim.DONE

    async def _not_run(
        self, entry: _Entry, fire: datetime, key: str, coalesced: int, first: str
    ) -> tuple[int, str]:
        """The start-up's catch-up of tick ``key`` (at ``fire``) coalescing ``coalesced``
        ticks from ``first``: how many of them come after the latest one with a claim (a run
        before this start, of any replica, handled that one and those before it), and the
        earliest of those (``key`` when none). One read per such tick, at start only; should
        one fail, the retry reads them again."""
        since = entry.catch_up
        if since is None or not coalesced:
            entry.catch_up = None
            return coalesced, first
        ticks = ticks_before(entry.trigger, since, fire)[-coalesced:]
        unrun: list[str] = []
        with anyio.fail_after(_ENQUEUE_TIMEOUT):
            for tick in reversed(ticks):
                tick_name = tick_key(entry.trigger, tick)
                if await self.app.global_config.get(CLAIMS, f"{entry.id}:{tick_name}") is not None:
                    break
                unrun.append(tick_name)
        entry.catch_up = None
        if len(unrun) == len(ticks):
            return coalesced, first
        return len(unrun), unrun[-1] if unrun else key

    async def _accounted(self, entry: _Entry, claim: str, tick: str) -> bool:
        """Whether the run of ``claim``, another replica's, accounts for ``tick``, an earlier
        tick whose claim this replica won and folded into it (see :class:`TickClaim`). One
        read, only on that path: both replicas' claims waited out one outage and the other
        one coalesced ``tick`` as well, or it had run ``tick`` itself (a GlobalConfig that
        lost its data gave this replica the claim of a tick that ran already)."""
        holder = TickClaim.read(await self.app.global_config.get(CLAIMS, claim))
        if holder is None or not holder.accounts_for(tick):
            return False
        log.debug(
            "timer %s: tick %s, which it won, is accounted for by the run of %s",
            entry.id,
            tick,
            claim,
        )
        return True

    async def _release(self, claim: str, *, quiet: bool) -> None:
        """Give up ``claim`` if this worker holds it (its enqueue failed or timed out), so a
        later attempt (the retry, a replica starting within the grace time) has the tick.
        ``quiet``: an outage is under way (and reported), a failure here is logged at debug."""
        global_config, me = self.app.global_config, self.app.worker.id
        try:
            with anyio.fail_after(_ENQUEUE_TIMEOUT):
                held = await global_config.get(CLAIMS, claim)
                if claimer(held) != me:
                    return
                if provides(global_config, CompareDelete):
                    # Only the claim read: had it run out meanwhile and another replica
                    # claimed the tick, a plain delete would free that replica's claim too.
                    await cast(CompareDelete, global_config).delete_if_equal(CLAIMS, claim, held)
                else:
                    await global_config.delete(CLAIMS, claim)
        except Exception:
            level = logging.DEBUG if quiet else logging.WARNING
            log.log(level, "timer: could not release the claim %s", claim, exc_info=True)

    def _next_run(self, entry: _Entry) -> datetime | None:
        if entry.armed:
            return entry.next_fire
        try:
            return next_fire(entry.trigger, None, self._clock())
        except Exception:  # a raising trigger must not break what lists the timers
            log.warning(
                "timer %s (task %s): its trigger raised computing its next run",
                entry.id,
                entry.task_name,
                exc_info=True,
            )
            return None

    async def _ensure_started(self) -> None:
        if not self.app.started:
            await self.app.start()

    async def _set_paused(self, timer_id: str, paused: bool) -> None:
        await self._ensure_started()
        if paused:
            await self.app.global_config.set(PAUSED, timer_id, True)
        else:
            await self.app.global_config.delete(PAUSED, timer_id)

    async def _is_paused(self, timer_id: str) -> bool:
        await self._ensure_started()
        return bool(await self.app.global_config.get(PAUSED, timer_id, False))

    async def describe(self) -> list[dict[str, Any]]:
        """One dict per timer (id, task, trigger, args, kwargs, next_run ISO or ``None``,
        paused, source), as ``qtasks inspect`` shows them."""
        rows = []
        for entry in self._entries.values():
            next_run = self._next_run(entry)
            rows.append(
                {
                    "id": entry.id,
                    "task": entry.task_name,
                    "trigger": trigger_text(entry.trigger),
                    "args": list(entry.args),
                    "kwargs": dict(entry.kwargs),
                    "next_run": None if next_run is None else next_run.isoformat(),
                    "paused": await self._is_paused(entry.id) if self.app.started else None,
                    "source": entry.source,
                }
            )
        return rows

    # --- standalone -----------------------------------------------------------------------

    async def __aenter__(self) -> AsyncTimer:
        """Run the timers in this event loop without a worker (starts the app's components)."""
        if not self.app.started:
            await self.app.start()
            self._started_app = True
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await tg.start(self.run, name="qtasks timer")
        except BaseException:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            raise
        self._task_group = tg
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        tg, self._task_group = self._task_group, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        if self._started_app:
            self._started_app = False
            await self.app.aclose()

    async def serve(self) -> None:
        """Run the timers (no worker) until SIGINT/SIGTERM.

        Refused (:class:`TimerError`) when the app's broker is in memory and no worker of it
        runs the timers here: the ticks would go to a queue that only this process sees."""
        broker = self.app.broker
        if getattr(broker, "local", False) and not self._running:
            raise TimerError(
                f"a timer process cannot reach a worker through the in-memory broker "
                f"({type(broker).__name__}): every tick would be enqueued where no worker "
                f"reads it. Give the app a shared broker (QueueTasks(broker_url="
                f'"redis://HOST:6379/0") or QueueTasks.from_config()), or run the timers '
                f"inside the worker: they start with app.run_forever() and qtasks run"
            )
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with self:
                log.info("qtasks timer for app %r running", self.app.name)
                async for signum in signals:
                    log.info("received %s, stopping", signal.Signals(signum).name)
                    break

    def run_forever(self) -> None:
        """Block running the timers as a scheduler process (no worker) until SIGINT/SIGTERM;
        the app needs a shared broker (see :meth:`serve`)."""
        anyio.run(self.serve)


def timeout_kwarg(
    app: AsyncQueueTasks, task_name: str, timeout: float, kwargs: dict[str, Any]
) -> None:
    """``timer.add_task(..., timeout=)``: the task's own argument when the task (registered
    in ``app``) has a parameter of that name; otherwise QTasks' timer option, ignored by
    qtasks as it was by QTasks, with a warning."""
    task = app.tasks.get(task_name)
    if task is not None and "timeout" in task.caller_signature.parameters:
        kwargs["timeout"] = timeout
    else:
        warn_timer_timeout(stacklevel=4)


def warn_timer_timeout(stacklevel: int = 3) -> None:
    """Warn that QTasks' ``timer.add_task(..., timeout=)`` is ignored (QTasks ignored it too)."""
    warnings.warn(
        "timer.add_task(timeout=...) is QTasks' and ignored by qtasks, as it was by QTasks: a "
        "timer enqueues its task and waits for no result; drop it (a task whose own parameter "
        "is called timeout gets it, once the task is registered before the timer is added)",
        QTasksCompatWarning,
        stacklevel=stacklevel,
    )


def _check_grace(grace: float) -> None:
    if not 0 <= grace < MAX_SECONDS:  # nan fails too
        raise ScheduleError(
            f"misfire_grace must be >= 0 and under {MAX_SECONDS:.0f} s, got {grace!r}"
        )
