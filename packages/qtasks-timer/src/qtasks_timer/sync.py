"""The sync timer: a facade over :class:`~qtasks_timer.AsyncTimer` for a
:class:`~qtasks.QueueTasks` app, through the app's portal. No logic lives here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, tzinfo
from functools import partial
from typing import Any

from qtasks.compat.calls import UNSET, split_task_name
from qtasks.sync import QueueTasks
from qtasks_timer.timer import AsyncTimer, TimerHandle, _utcnow, timeout_kwarg
from qtasks_timer.triggers import Schedule, Trigger


class SyncTimerHandle:
    """A :class:`~qtasks_timer.TimerHandle` with blocking methods."""

    def __init__(self, app: QueueTasks, handle: TimerHandle) -> None:
        self._app = app
        self.aio = handle

    @property
    def id(self) -> str:
        return self.aio.id

    @property
    def task_name(self) -> str:
        return self.aio.task_name

    @property
    def trigger(self) -> Trigger:
        return self.aio.trigger

    @property
    def next_run_time(self) -> datetime | None:
        return self.aio.next_run_time

    def pause(self) -> None:
        """Stop enqueueing this timer's ticks, on every replica."""
        self._app.portal.call(self.aio.pause)

    def resume(self) -> None:
        self._app.portal.call(self.aio.resume)

    def is_paused(self) -> bool:
        return bool(self._app.portal.call(self.aio.is_paused))

    def remove(self) -> None:
        """Stop scheduling this timer in this process."""
        self._app.portal.call(self.aio.remove)

    def __repr__(self) -> str:
        return f"<SyncTimerHandle {self.id}>"


class SyncTimer:
    """Periodic and cron tasks for a :class:`~qtasks.QueueTasks` app: same API as
    :class:`~qtasks_timer.AsyncTimer`, blocking. Timers run while the app serves
    (``with app:``, ``app.run_forever()``); :meth:`run_forever` runs them without a worker."""

    def __init__(
        self,
        app: QueueTasks,
        *,
        misfire_grace: float = 60.0,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.app = app
        self.aio = AsyncTimer(app.aio, misfire_grace=misfire_grace, clock=clock)

    def _call(self, func: Callable[[], TimerHandle]) -> TimerHandle:
        # While the timers run they live in the portal's loop: change them from there.
        if self.aio.running:
            result: TimerHandle = self.app.portal.call(func)
            return result
        return func()

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
    ) -> SyncTimerHandle:
        """Schedule ``task_name(*args, **kwargs)``; see :meth:`AsyncTimer.add_task`."""
        task_name, args = split_task_name(task_name, args, kwargs)
        if timeout is not None:
            timeout_kwarg(self.app.aio, task_name, timeout, kwargs)
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
    ) -> SyncTimerHandle:
        """:meth:`add_task` with explicit ``args``/``kwargs``."""
        call = partial(
            self.aio.schedule,
            task_name,
            trigger,
            args,
            kwargs,
            timezone=timezone,
            timer_id=timer_id,
            misfire_grace=misfire_grace,
            priority=priority,
        )
        return SyncTimerHandle(self.app, self._call(call))

    def get(self, timer_id: str) -> SyncTimerHandle:
        return SyncTimerHandle(self.app, self.aio.get(timer_id))

    @property
    def timers(self) -> list[SyncTimerHandle]:
        return [SyncTimerHandle(self.app, handle) for handle in self.aio.timers]

    def describe(self) -> list[dict[str, Any]]:
        """See :meth:`AsyncTimer.describe`."""
        rows: list[dict[str, Any]] = self.app.portal.call(self.aio.describe)
        return rows

    def run_forever(self) -> None:
        """Block running the timers as a scheduler process (no worker) until SIGINT/SIGTERM;
        the app needs a shared broker (see :meth:`AsyncTimer.serve`)."""
        self.aio.run_forever()
