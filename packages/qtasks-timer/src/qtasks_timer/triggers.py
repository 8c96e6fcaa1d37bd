"""Schedules: turn what the user wrote into an APScheduler trigger that every replica computes
identically, and decide what a due timer fires (the misfire policy).

Everything here is pure (no I/O, no clock of its own), so the policy is tested directly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.base import BaseTrigger  # type: ignore[import-untyped]  # no stubs in 3.x
from apscheduler.triggers.combining import BaseCombiningTrigger  # type: ignore[import-untyped]
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]

from qtasks_timer.errors import ScheduleError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_GRACE = 1.0
"""Seconds of lateness that always count as on time (waking up takes a moment)."""

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# Crontab numbers days 0-7 from Sunday; APScheduler 3 numbers them from Monday (its issue
# #286), so numeric day-of-week fields are rewritten with names.
_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DOW_FULL = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")


class Trigger(Protocol):
    """What qtasks-timer needs from a trigger (every APScheduler 3 trigger fits)."""

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None: ...


Schedule = str | timedelta | int | float | Trigger
"""A crontab string (5 fields, or 6 with seconds first, or ``@daily`` and the like), an interval
(``timedelta`` or seconds), or an APScheduler trigger."""


def to_zone(timezone: str | tzinfo | None) -> tzinfo:
    """``None`` is UTC (the same on every replica, unlike the machine's local zone)."""
    if timezone is None:
        return UTC
    if isinstance(timezone, str):
        try:
            return ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ScheduleError(f"unknown time zone {timezone!r}") from exc
    return timezone


def _dow_value(token: str) -> int:
    token = token.strip().lower()
    if token.isdigit():
        number = int(token)
        if not 0 <= number <= 7:
            raise ScheduleError(f"day of week {token!r} is out of range 0-7")
        return number % 7
    if token in _DOW_NAMES:
        return _DOW_NAMES.index(token)
    if token in _DOW_FULL:  # the whole name, as some crontabs write it
        return _DOW_FULL.index(token)
    raise ScheduleError(f"bad day of week {token!r} (0-7, or sun, mon, ... sat)")


def _crontab_dow(field: str) -> str:
    """Rewrite a crontab day-of-week field (0 = Sunday) as names for APScheduler 3."""
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for part in field.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ScheduleError(f"bad step in day of week {part!r}")
        if base in ("*", "?"):
            first, last = 0, 6
        elif "-" in base:
            low, high = base.split("-", 1)
            first, last = _dow_value(low), _dow_value(high)
            if high.strip() == "7":
                last = 7
        else:
            first = _dow_value(base)
            last = 6 if step_text else first
        if last < first:
            raise ScheduleError(f"bad day-of-week range {part!r}")
        days.update(day % 7 for day in range(first, last + 1, step))
    return ",".join(_DOW_NAMES[day] for day in sorted(days))


def parse_crontab(expr: str, timezone: str | tzinfo | None = None) -> Trigger:
    """A :class:`CronTrigger` from a crontab string with standard crontab semantics.

    Five fields (minute hour day month day-of-week), or six with a seconds field first; the
    macros ``@hourly``, ``@daily``/``@midnight``, ``@weekly``, ``@monthly``,
    ``@yearly``/``@annually``. Day of week 0 and 7 are Sunday."""
    text = _MACROS.get(expr.strip().lower(), expr)
    fields = text.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ScheduleError(
            f"crontab {expr!r} has {len(fields)} fields; expected 5 (or 6 with seconds first)"
        )
    second, minute, hour, day, month, dow = fields
    if day not in ("*", "?") and dow not in ("*", "?"):
        # Standard cron runs on the days that match *either* field; the trigger behind this
        # would run only on days matching both, silently (a few runs a year, not weekly).
        raise ScheduleError(
            f"crontab {expr!r} restricts both the day of the month ({day}) and the day of "
            f"the week ({dow}): cron runs on days matching either, which this trigger cannot "
            "express; add two timers, one for each field"
        )
    try:
        trigger = CronTrigger(
            second=second,
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=_crontab_dow(dow),
            timezone=to_zone(timezone),
        )
    except ValueError as exc:
        raise ScheduleError(f"bad crontab {expr!r}: {exc}") from exc
    # A crontab has no year: one that fires at all fires within 8 years of any date (29
    # February), quickly found; one naming a date no month has (30 February) never does.
    if trigger.get_next_fire_time(None, EPOCH) is None:
        raise ScheduleError(f"crontab {expr!r} never fires: day {day} of month {month} is no date")
    return trigger  # type: ignore[no-any-return]


def every(interval: timedelta | float, timezone: str | tzinfo | None = None) -> Trigger:
    """An interval trigger aligned to the Unix epoch, so every replica computes the same ticks
    (every 5 minutes fires at :00, :05, ...)."""
    seconds = interval.total_seconds() if isinstance(interval, timedelta) else float(interval)
    if not 0 < seconds < MAX_SECONDS:  # nan fails too
        raise ScheduleError(
            f"interval must be positive and under {MAX_SECONDS:.0f} s, got {interval!r}"
        )
    zone = to_zone(timezone)
    return IntervalTrigger(  # type: ignore[no-any-return]
        seconds=seconds, start_date=EPOCH.astimezone(zone), timezone=zone
    )


def to_trigger(schedule: Schedule, timezone: str | tzinfo | None = None) -> Trigger:
    """Normalize ``schedule`` into a trigger whose ticks are the same on every replica.

    An :class:`IntervalTrigger` created without ``start_date`` (APScheduler then starts it at
    "now + interval", which differs per process) is re-aligned to the epoch, also when it was
    made a while before. Triggers with ``jitter`` are refused: each replica would draw other
    tick times."""
    if isinstance(schedule, bool):
        raise ScheduleError(f"not a schedule: {schedule!r}")
    if isinstance(schedule, str):
        return parse_crontab(schedule, timezone)
    if isinstance(schedule, timedelta | int | float):
        return every(schedule, timezone)
    if not callable(getattr(schedule, "get_next_fire_time", None)):
        raise ScheduleError(f"not a schedule: {schedule!r}")
    if timezone is not None:
        raise ScheduleError(
            "timezone= applies to crontab strings and intervals; set it on the trigger itself"
        )
    _refuse_jitter(schedule)
    return _aligned(schedule)  # type: ignore[no-any-return]


def _aligned(trigger: Any) -> Any:
    """``trigger`` with every IntervalTrigger of APScheduler's start (see
    :func:`_implicit_start`) re-aligned to the epoch, in combinations too (a copy; the
    user's trigger is left as it is)."""
    if isinstance(trigger, IntervalTrigger) and _implicit_start(trigger):
        return IntervalTrigger(
            seconds=trigger.interval_length,
            start_date=EPOCH.astimezone(trigger.timezone),
            end_date=trigger.end_date,
            timezone=trigger.timezone,
        )
    if isinstance(trigger, BaseCombiningTrigger):
        children = [_aligned(child) for child in trigger.triggers]
        if any(new is not old for new, old in zip(children, trigger.triggers, strict=True)):
            combined = copy.copy(trigger)
            combined.triggers = children
            return combined
    return trigger


def _refuse_jitter(trigger: object) -> None:
    if getattr(trigger, "jitter", None):
        raise ScheduleError(
            "triggers with jitter are not supported: every replica must compute the same ticks"
        )
    for child in getattr(trigger, "triggers", ()) or ():
        _refuse_jitter(child)


_LOADED = time.time()
_IMPORT_ALLOWANCE = 3600.0  # how long before this module a trigger of the same start-up is made


def _implicit_start(trigger: Any) -> bool:
    """Whether APScheduler chose the trigger's ``start_date`` ("now + interval", taken when it
    was made; nothing else marks it). So taken: one made just now, or one made (before it was
    added) while this process ran whose start has a fraction of a second, as a clock reading
    has and a date someone wrote has not."""
    start = trigger.start_date
    made = float(start.timestamp()) - float(trigger.interval_length)
    now = time.time()
    if abs(made - now) < 2.0:
        return True
    return bool(start.microsecond) and _LOADED - _IMPORT_ALLOWANCE <= made <= now


def next_fire(trigger: Trigger, previous: datetime | None, now: datetime) -> datetime | None:
    """The trigger's next fire time, in UTC. Times are kept in UTC because Python compares
    two times of one zone by wall clock, ignoring ``fold``: the two 02:30 of a DST fall-back
    would be "equal".

    A cron trigger's times in the second pass of a local hour that repeats (fall back) are
    passed over: they have the keys of the first pass's ticks (see :func:`tick_key`), which
    had them, and left in they would come after later ticks of the first pass in time but
    before them in key order."""
    fire = trigger.get_next_fire_time(previous, now)
    while fire is not None and is_calendar(trigger):
        end = _repeat_end(fire.astimezone(UTC), trigger.timezone)  # type: ignore[attr-defined]
        if end is None:
            break
        after = trigger.get_next_fire_time(fire, end)
        if after is not None and after.astimezone(UTC) <= fire.astimezone(UTC):
            # Not later than the time it follows (APScheduler 3.11.0 answers a time of the
            # first pass of the repeated hour): asked again, it would loop for ever.
            raise ScheduleError(
                f"the trigger {trigger!r} gives {after} as the next fire time after {fire}: "
                "APScheduler >= 3.11.1 is needed"
            )
        fire = after
    return None if fire is None else fire.astimezone(UTC)


def _repeats(moment: datetime, zone: tzinfo) -> bool:
    """Whether the local wall time of ``moment`` in ``zone`` is the second of two."""
    local = moment.astimezone(zone)
    return bool(local.fold) and local.replace(fold=0).utcoffset() != local.utcoffset()


def _repeat_end(moment: datetime, zone: tzinfo) -> datetime | None:
    """The first instant after the repeated local hour ``moment`` is in the second pass of,
    or ``None`` when it is in none."""
    if not _repeats(moment, zone):
        return None
    local = moment.astimezone(zone)
    length = local.replace(fold=0).utcoffset() - local.utcoffset()  # type: ignore[operator]
    if length <= timedelta(0) or _repeats(moment + length, zone):
        return None  # not a fall back as zoneinfo tells one (a tzinfo of its own)
    low, high = moment, moment + length  # the pass is at most that long
    while high - low > _AFTER:
        middle = low + (high - low) / 2
        low, high = (middle, high) if _repeats(middle, zone) else (low, middle)
    return high


def is_calendar(trigger: Trigger) -> bool:
    """Calendar triggers (cron) are keyed by local wall time, the rest by the UTC instant."""
    return isinstance(trigger, CronTrigger)


def tick_key(trigger: Trigger, fire_time: datetime) -> str:
    """The per-tick dedupe key. Cron ticks use the local wall time without offset, so the
    hour that repeats when daylight saving ends cannot fire a 02:30 job twice (a replica that
    does not pass over that hour's second pass, as :func:`next_fire` does, finds the first
    pass's claim); other ticks use the UTC instant. Fixed width, so keys of one timer's ticks
    sort in time order."""
    if is_calendar(trigger):
        local = fire_time.astimezone(trigger.timezone)  # type: ignore[attr-defined]
        return f"{local:%Y-%m-%dT%H:%M:%S.%f}"
    return f"{fire_time.astimezone(UTC):%Y-%m-%dT%H:%M:%S.%f}Z"


def trigger_text(trigger: Trigger) -> str:
    """A stable text for the trigger (part of the derived timer id)."""
    if isinstance(trigger, BaseTrigger):
        return repr(trigger)
    return f"{type(trigger).__module__}.{type(trigger).__qualname__}:{trigger!r}"


def derive_id(task_name: str, trigger: Trigger, args: Any, kwargs: Any) -> str:
    """A timer id that is the same in every process declaring the same timer."""
    text = json.dumps(
        [task_name, trigger_text(trigger), args, kwargs], sort_keys=True, default=repr
    )
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{task_name}@{digest}"


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with a due timer: fire ``fire`` (``None``: nothing), having coalesced
    ``coalesced`` earlier ticks into it, the earliest of which is ``first`` (``fire`` itself
    when none); its next tick is ``next``. ``skipped`` tells that ticks older than the grace
    time were dropped."""

    fire: datetime | None
    next: datetime | None
    coalesced: int = 0
    skipped: bool = False
    first: datetime | None = None


_AFTER = timedelta(microseconds=1)

MAX_SECONDS = 100 * 365 * 86400.0
"""The longest interval or misfire grace accepted (a hundred years): past it, time arithmetic
overflows (and ``inf`` or ``nan`` from a TOML file mean nothing as a schedule)."""


def first_tick(trigger: Trigger, now: datetime, grace: float) -> datetime | None:
    """The first tick a starting timer considers: the earliest one not older than ``grace``
    (a tick missed while every replica was down is caught up if it is that recent)."""
    return next_fire(trigger, None, now - timedelta(seconds=grace))


def ticks_before(trigger: Trigger, since: datetime, fire: datetime) -> list[datetime]:
    """The ticks from ``since`` (a tick) up to ``fire``, not included, oldest first."""
    ticks: list[datetime] = []
    tick: datetime | None = since
    while tick is not None and tick < fire:
        ticks.append(tick)
        following = next_fire(trigger, tick, tick + _AFTER)
        tick = following if following is not None and following > tick else None
    return ticks


def plan(trigger: Trigger, due: datetime, now: datetime, grace: float) -> Plan:
    """The misfire policy for a timer whose tick ``due`` is at or before ``now``.

    Ticks older than ``grace`` seconds (at least :data:`MIN_GRACE`) are skipped. The
    remaining due ticks coalesce into one run of the latest of them, so a process that was
    busy or asleep catches up once, not once per missed tick."""
    skipped = False
    window = now - timedelta(seconds=max(grace, MIN_GRACE))
    if due < window:
        skipped = True
        candidate = next_fire(trigger, None, window)
        # DateTrigger ignores ``now`` and returns its run date whatever it is.
        if candidate is not None and candidate < window:
            candidate = None
        if candidate is None or candidate > now:
            return Plan(None, candidate, 0, skipped)
        due = candidate
    fire, coalesced = due, 0
    while True:
        following = next_fire(trigger, fire, max(now, fire))
        if following is not None and following <= fire:
            # In the hour a DST change repeats, a cron trigger asked at exactly its tick
            # gives that tick again: ask from just after it (or the loop never ends).
            following = next_fire(trigger, fire, fire + _AFTER)
            if following is not None and following <= fire:
                following = None  # a trigger that never moves on: nothing after this tick
        if following is None or following > now:
            return Plan(fire, following, coalesced, skipped, due)
        fire, coalesced = following, coalesced + 1
