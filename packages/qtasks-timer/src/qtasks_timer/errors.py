"""Errors of qtasks-timer, in the qtasks error tree."""

from __future__ import annotations

from qtasks.errors import ConfigError, QTasksError


class TimerError(QTasksError):
    """A timer was used wrongly (e.g. a second timer for one app, an unknown timer id)."""


class ScheduleError(TimerError, ConfigError, ValueError):
    """A schedule or trigger that cannot be used: a bad crontab string, a jittered trigger, a
    malformed timer in the configuration (``[[extra.timers]]``)."""
