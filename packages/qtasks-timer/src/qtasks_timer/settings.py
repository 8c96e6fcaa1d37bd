"""qtasks-timer's settings: the timers declared in configuration, read from ``config.extra``.

Timers belong to qtasks-timer, so they live in its part of the configuration::

    [[extra.timers]]                 # [[tool.qtasks.extra.timers]] in pyproject.toml
    task = "nightly_report"
    schedule = "30 2 * * *"          # a crontab string, or: interval = 30 (seconds)
    timezone = "Europe/Berlin"       # optional: args, kwargs, id, misfire_grace, priority

In code: ``QueueConfig(extra={"timers": [...]})``; in the environment:
``QTASKS_EXTRA='{"timers": [...]}'``. The top-level ``timers`` key of earlier versions
(``[[timers]]``, ``QTASKS_TIMERS``) is refused by the core's configuration with this hint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qtasks.checks import check_priority
from qtasks_timer.errors import ScheduleError
from qtasks_timer.triggers import MAX_SECONDS, to_trigger

if TYPE_CHECKING:
    from qtasks.config import QueueConfig

EXTRA_KEY = "timers"
"""The key of ``config.extra`` holding the timers."""

ENTRY_KEYS = frozenset(
    {
        "task",
        "schedule",
        "interval",
        "args",
        "kwargs",
        "id",
        "timezone",
        "misfire_grace",
        "priority",
    }
)
"""The keys a timer table may have."""


@dataclass(frozen=True, slots=True)
class TimerSpec:
    """One timer declared in configuration, checked."""

    where: str
    """Where it was declared (``extra.timers[0]``), for error messages."""
    task: str
    schedule: str | int | float
    """A crontab string, or an interval in seconds."""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    timezone: str | None = None
    misfire_grace: float | None = None
    priority: int | None = None

    @classmethod
    def from_table(cls, item: Any, where: str) -> TimerSpec:
        """Check one timer table; a problem raises :class:`ScheduleError` naming ``where``."""
        if not isinstance(item, Mapping):
            raise ScheduleError(f"{where}: expected a table, got {item!r}")
        unknown = set(item) - ENTRY_KEYS
        if unknown:
            raise ScheduleError(f"{where}: unknown keys {sorted(unknown)}")
        if not isinstance(item.get("task"), str):
            raise ScheduleError(f"{where}: 'task' (a task name) is required")
        if ("schedule" in item) == ("interval" in item):
            raise ScheduleError(f"{where}: give exactly one of 'schedule' and 'interval'")
        schedule = item["schedule"] if "schedule" in item else item["interval"]
        if "schedule" in item and not isinstance(schedule, str):
            raise ScheduleError(f"{where}: 'schedule' must be a crontab string")
        if "interval" in item and not (_is_number(schedule) and 0 < schedule < MAX_SECONDS):
            raise ScheduleError(
                f"{where}: 'interval' must be a number of seconds, positive and under "
                f"{MAX_SECONDS:.0f}, got {schedule!r}"
            )
        args, kwargs = item.get("args", []), item.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ScheduleError(f"{where}: 'args' must be a list and 'kwargs' a table")
        for key in ("id", "timezone"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise ScheduleError(f"{where}: {key!r} must be a string, got {item[key]!r}")
        grace = item.get("misfire_grace")
        if grace is not None and not (_is_number(grace) and 0 <= grace < MAX_SECONDS):
            raise ScheduleError(
                f"{where}: 'misfire_grace' must be a number of seconds, from 0 to under "
                f"{MAX_SECONDS:.0f}, got {grace!r}"
            )
        priority = item.get("priority")
        if priority is not None:
            priority = check_priority(priority, f"{where}: 'priority'", ScheduleError)
        try:  # a bad crontab or time zone, named by where it is
            to_trigger(schedule, item.get("timezone"))
        except ScheduleError as exc:
            raise ScheduleError(f"{where}: {exc}") from None
        return cls(
            where=where,
            task=item["task"],
            schedule=schedule,
            args=tuple(args),
            kwargs=dict(kwargs),
            id=item.get("id"),
            timezone=item.get("timezone"),
            misfire_grace=None if grace is None else float(grace),
            priority=priority,
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class TimerSettings:
    """Everything qtasks-timer reads from an app's configuration."""

    timers: tuple[TimerSpec, ...] = ()

    @staticmethod
    def declared(config: QueueConfig) -> bool:
        """Whether ``config`` declares any timer (a cheap test, nothing is checked)."""
        return bool(config.extra.get(EXTRA_KEY))

    @classmethod
    def from_config(cls, config: QueueConfig) -> TimerSettings:
        """The timers of ``config.extra["timers"]``, each checked."""
        specs: list[TimerSpec] = []
        tables = config.extra.get(EXTRA_KEY, [])
        if not isinstance(tables, list):
            raise ScheduleError(
                f"extra.{EXTRA_KEY}: expected a list of timer tables ([[extra.{EXTRA_KEY}]]), "
                f"got {type(tables).__name__} {tables!r}"
            )
        for index, item in enumerate(tables):
            specs.append(TimerSpec.from_table(item, f"extra.{EXTRA_KEY}[{index}]"))
        return cls(tuple(specs))
