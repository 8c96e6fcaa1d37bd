"""Scheduled (cron and interval) tasks for qtasks, without a separate beat service.

``AsyncTimer(app)`` / ``SyncTimer(app)`` add timers that run inside the app while it serves;
each tick is enqueued once across every replica of the app (claimed in its GlobalConfig).
"""

from qtasks_timer.errors import ScheduleError, TimerError
from qtasks_timer.plugin import TimerPlugin
from qtasks_timer.settings import TimerSettings, TimerSpec
from qtasks_timer.sync import SyncTimer, SyncTimerHandle
from qtasks_timer.timer import AsyncTimer, TimerHandle
from qtasks_timer.triggers import Schedule, Trigger, every, parse_crontab

__all__ = [
    "AsyncTimer",
    "Schedule",
    "ScheduleError",
    "SyncTimer",
    "SyncTimerHandle",
    "TimerError",
    "TimerHandle",
    "TimerPlugin",
    "TimerSettings",
    "TimerSpec",
    "Trigger",
    "every",
    "parse_crontab",
]
