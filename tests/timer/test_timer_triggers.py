"""Schedules, timer ids, tick keys and the misfire policy (pure functions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest
from apscheduler.triggers.combining import OrTrigger  # type: ignore[import-untyped]
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]
from apscheduler.triggers.date import DateTrigger  # type: ignore[import-untyped]
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]

from qtasks import QueueConfig
from qtasks_timer import ScheduleError, every, parse_crontab
from qtasks_timer.settings import TimerSettings
from qtasks_timer.triggers import (
    derive_id,
    first_tick,
    next_fire,
    plan,
    tick_key,
    to_trigger,
)

BERLIN = ZoneInfo("Europe/Berlin")


def fires(trigger: object, start: datetime, count: int) -> list[datetime]:
    out: list[datetime] = []
    prev = None
    now = start
    for _ in range(count):
        nxt = trigger.get_next_fire_time(prev, now)  # type: ignore[attr-defined]
        assert nxt is not None
        out.append(nxt)
        prev = now = nxt
    return out


def test_crontab_day_of_week_uses_crontab_numbering() -> None:
    # 2026-06-01 is a Monday. Crontab: 0 and 7 are Sunday, 1 is Monday.
    monday = datetime(2026, 6, 1, tzinfo=UTC)
    assert fires(parse_crontab("0 9 * * 1"), monday, 1)[0].weekday() == 0
    assert fires(parse_crontab("0 9 * * 0"), monday, 1)[0].weekday() == 6
    assert fires(parse_crontab("0 9 * * 7"), monday, 1)[0].weekday() == 6
    weekdays = {d.weekday() for d in fires(parse_crontab("0 9 * * 1-5"), monday, 10)}
    assert weekdays == {0, 1, 2, 3, 4}
    # */2 over Sunday..Saturday is Sun, Tue, Thu, Sat.
    assert {d.weekday() for d in fires(parse_crontab("0 9 * * */2"), monday, 8)} == {6, 1, 3, 5}
    assert {d.weekday() for d in fires(parse_crontab("0 9 * * sat,sun"), monday, 4)} == {5, 6}


def test_crontab_fields_macros_and_seconds() -> None:
    start = datetime(2026, 6, 1, 10, 2, 30, tzinfo=UTC)
    assert fires(parse_crontab("*/5 * * * *"), start, 2) == [
        datetime(2026, 6, 1, 10, 5, tzinfo=UTC),
        datetime(2026, 6, 1, 10, 10, tzinfo=UTC),
    ]
    assert fires(parse_crontab("*/10 * * * * *"), start, 2) == [
        datetime(2026, 6, 1, 10, 2, 30, tzinfo=UTC),
        datetime(2026, 6, 1, 10, 2, 40, tzinfo=UTC),
    ]
    assert fires(parse_crontab("@hourly"), start, 1) == [datetime(2026, 6, 1, 11, tzinfo=UTC)]
    assert fires(parse_crontab("@daily"), start, 1) == [datetime(2026, 6, 2, tzinfo=UTC)]


def test_crontab_timezone() -> None:
    trigger = parse_crontab("0 9 * * *", "Europe/Berlin")
    first = fires(trigger, datetime(2026, 6, 1, tzinfo=UTC), 1)[0]
    assert first == datetime(2026, 6, 1, 7, tzinfo=UTC)  # 09:00 CEST


@pytest.mark.parametrize(
    "expr", ["* * *", "61 * * * *", "* * * * 8", "* * * * mon-xyz", "1 2 3 4 5 6 7"]
)
def test_bad_crontab_is_refused(expr: str) -> None:
    with pytest.raises(ScheduleError):
        parse_crontab(expr)


@pytest.mark.parametrize("expr", ["0 0 30 2 *", "0 0 31 4 *", "0 0 31 2,4,6,9,11 *"])
def test_a_crontab_that_never_fires_is_refused(expr: str) -> None:
    """A date no month has (30 February, 31 April) is a typo: the timer would never run, and
    nothing would say so."""
    with pytest.raises(ScheduleError, match="never fires"):
        parse_crontab(expr)


def test_a_crontab_that_fires_rarely_is_accepted() -> None:
    leap_day = parse_crontab("0 0 29 2 *")
    assert fires(leap_day, datetime(2026, 6, 1, tzinfo=UTC), 1) == [
        datetime(2028, 2, 29, tzinfo=UTC)
    ]


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ScheduleError):
        to_trigger(0)
    with pytest.raises(ScheduleError):
        to_trigger(True)
    with pytest.raises(ScheduleError):
        to_trigger(object())  # type: ignore[arg-type]
    with pytest.raises(ScheduleError, match="jitter"):
        to_trigger(CronTrigger(minute="*", jitter=5))
    with pytest.raises(ScheduleError, match="time zone"):
        to_trigger("* * * * *", "Mars/Olympus")


def test_intervals_are_aligned_to_the_epoch() -> None:
    trigger = every(timedelta(minutes=5))
    start = datetime(2026, 6, 1, 10, 2, 30, tzinfo=UTC)
    assert fires(trigger, start, 2) == [
        datetime(2026, 6, 1, 10, 5, tzinfo=UTC),
        datetime(2026, 6, 1, 10, 10, tzinfo=UTC),
    ]
    # An IntervalTrigger without start_date starts "now + interval" in APScheduler; two
    # processes would disagree, so it is re-aligned. An explicit start_date is kept.
    implicit = to_trigger(IntervalTrigger(seconds=30, timezone=UTC))
    assert implicit.start_date == datetime(1970, 1, 1, tzinfo=UTC)  # type: ignore[attr-defined]
    anchor = datetime(2026, 1, 1, 0, 0, 7, tzinfo=UTC)
    explicit = to_trigger(IntervalTrigger(seconds=30, start_date=anchor))
    assert explicit.start_date == anchor  # type: ignore[attr-defined]


def test_an_interval_trigger_made_a_while_before_it_is_added_is_re_aligned() -> None:
    # Made without start_date a minute ago (at import, say), APScheduler's "now + interval"
    # is a minute old when the timer is added; it is re-aligned all the same.
    made = datetime.now(UTC) - timedelta(seconds=61.5)
    old = IntervalTrigger(seconds=30, start_date=made + timedelta(seconds=30), timezone=UTC)
    assert to_trigger(old).start_date == datetime(1970, 1, 1, tzinfo=UTC)  # type: ignore[attr-defined]
    # Start dates someone wrote are kept, recent or not, past or future.
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    for start in (hour, hour + timedelta(hours=2), datetime(2020, 5, 1, 9, 30, 0, 250000, UTC)):
        kept = to_trigger(IntervalTrigger(seconds=30, start_date=start))
        assert kept.start_date == start  # type: ignore[attr-defined]


def test_an_interval_trigger_in_a_combination_is_re_aligned() -> None:
    made = OrTrigger([IntervalTrigger(seconds=30, timezone=UTC), CronTrigger(hour=3)])
    combined = to_trigger(made)
    assert combined.triggers[0].start_date == datetime(1970, 1, 1, tzinfo=UTC)  # type: ignore[attr-defined]
    assert combined.triggers[1] is made.triggers[1]  # type: ignore[attr-defined]
    assert made.triggers[0].start_date.year > 1970  # the user's trigger is left as it is
    assert derive_id("x", combined, [], {}) == derive_id(
        "x",
        to_trigger(OrTrigger([IntervalTrigger(seconds=30, timezone=UTC), CronTrigger(hour=3)])),
        [],
        {},
    )


def test_timer_ids_are_stable_and_distinct() -> None:
    # Two "processes" building the same timer independently get the same id.
    one = derive_id("report", to_trigger("*/5 * * * *"), [1], {"to": "ops"})
    two = derive_id("report", to_trigger("*/5 * * * *"), [1], {"to": "ops"})
    assert one == two
    assert one.startswith("report@")
    assert derive_id("report", to_trigger(IntervalTrigger(seconds=30)), [], {}) == derive_id(
        "report", to_trigger(IntervalTrigger(seconds=30)), [], {}
    )
    others = {
        derive_id("report", to_trigger("*/5 * * * *"), [2], {"to": "ops"}),
        derive_id("report", to_trigger("*/5 * * * *", "Europe/Berlin"), [1], {"to": "ops"}),
        derive_id("report", to_trigger("*/10 * * * *"), [1], {"to": "ops"}),
        derive_id("other", to_trigger("*/5 * * * *"), [1], {"to": "ops"}),
    }
    assert one not in others
    assert len(others) == 4


def test_plan_on_time_tick_fires_it() -> None:
    trigger = every(10)
    due = datetime(2026, 6, 1, 10, 0, 10, tzinfo=UTC)
    result = plan(trigger, due, due + timedelta(seconds=0.01), grace=60)
    assert result.fire == due
    assert result.next == due + timedelta(seconds=10)
    assert (result.coalesced, result.skipped) == (0, False)


def test_plan_coalesces_late_ticks_within_grace_into_one_run() -> None:
    trigger = every(10)
    due = datetime(2026, 6, 1, 10, 0, 10, tzinfo=UTC)
    now = due + timedelta(seconds=35)  # ticks :10 :20 :30 :40 missed
    result = plan(trigger, due, now, grace=60)
    assert result.fire == datetime(2026, 6, 1, 10, 0, 40, tzinfo=UTC)
    assert result.coalesced == 3
    assert result.next == datetime(2026, 6, 1, 10, 0, 50, tzinfo=UTC)


def test_plan_skips_ticks_older_than_grace() -> None:
    trigger = every(10)
    due = datetime(2026, 6, 1, 10, 0, 10, tzinfo=UTC)
    now = due + timedelta(hours=1, seconds=5)  # e.g. the wall clock jumped forward 1 h
    result = plan(trigger, due, now, grace=8)
    # Only the tick 5 s ago is within grace: one catch-up run, the rest skipped.
    assert result.fire == due + timedelta(hours=1)
    assert result.skipped
    assert result.coalesced == 0
    # With grace 0 nothing late fires; the next tick is in the future.
    zero = plan(trigger, due, now, grace=0)
    assert zero.fire is None
    assert zero.next == due + timedelta(hours=1, seconds=10)


def test_plan_date_trigger_missed_beyond_grace_never_fires() -> None:
    run_date = datetime(2026, 6, 1, 10, tzinfo=UTC)
    trigger = DateTrigger(run_date=run_date)
    assert first_tick(trigger, run_date + timedelta(days=1), grace=60) == run_date
    late = plan(trigger, run_date, run_date + timedelta(days=1), grace=60)
    assert late.fire is None
    assert late.next is None
    recent = plan(trigger, run_date, run_date + timedelta(seconds=30), grace=60)
    assert recent.fire == run_date
    assert recent.next is None


def test_dst_fall_back_repeated_local_time_has_one_key() -> None:
    # 2026-10-25: Europe/Berlin goes from 03:00 CEST back to 02:00 CET; 02:30 happens twice.
    trigger = parse_crontab("30 2 * * *", "Europe/Berlin")
    ticks = fires(trigger, datetime(2026, 10, 23, 12, tzinfo=UTC), 3)
    keys = [tick_key(trigger, t) for t in ticks]
    # APScheduler yields both 02:30 (00:30Z and 01:30Z); their keys coincide, so the second
    # is recognised as the same tick (the claim already exists / the guard skips it).
    assert ticks[1].astimezone(UTC) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert ticks[2].astimezone(UTC) == datetime(2026, 10, 25, 1, 30, tzinfo=UTC)
    assert keys[1] == keys[2] == "2026-10-25T02:30:00.000000"
    assert keys[0] < keys[1]


def test_dst_spring_forward_missing_local_time_fires_once() -> None:
    # 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day.
    trigger = parse_crontab("30 2 * * *", "Europe/Berlin")
    ticks = fires(trigger, datetime(2026, 3, 28, 12, tzinfo=UTC), 3)
    utc_ticks = [t.astimezone(UTC) for t in ticks]
    assert utc_ticks == [
        datetime(2026, 3, 29, 1, 30, tzinfo=UTC),  # 03:30 CEST: once, an hour "late"
        datetime(2026, 3, 30, 0, 30, tzinfo=UTC),
        datetime(2026, 3, 31, 0, 30, tzinfo=UTC),
    ]
    keys = [tick_key(trigger, t) for t in ticks]
    assert len(set(keys)) == 3


def test_interval_keys_are_utc_instants() -> None:
    # Intervals count real seconds: the repeated hour's ticks are distinct ticks.
    trigger = every(timedelta(minutes=30), "Europe/Berlin")
    ticks = fires(trigger, datetime(2026, 10, 24, 23, 50, tzinfo=UTC), 4)
    keys = [tick_key(trigger, t) for t in ticks]
    assert len(set(keys)) == 4
    assert keys == sorted(keys)
    assert keys[0] == "2026-10-25T00:00:00.000000Z"


def test_a_crontab_restricting_both_day_fields_is_refused_not_narrowed() -> None:
    """Cron runs ``0 0 1 * 1`` on the 1st *and* on every Monday; the trigger would have run
    it only on a 1st that is a Monday (twice a year), silently. Refused, saying why."""
    with pytest.raises(ScheduleError, match="either"):
        parse_crontab("0 0 1 * 1")
    with pytest.raises(ScheduleError, match="either"):
        parse_crontab("0 9 1-7 * mon")
    for fine in ("0 0 1 * *", "0 0 * * 1", "0 0 15 * ?"):
        parse_crontab(fine)


@pytest.mark.parametrize("bad", ["fri#3", "fridayXYZ", "frx", "8", "-1"])
def test_a_misspelled_day_of_week_is_refused(bad: str) -> None:
    with pytest.raises(ScheduleError, match="day of week"):
        parse_crontab(f"0 0 * * {bad}")


def test_whole_and_short_day_names_and_numbers_are_the_same_day() -> None:
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)  # a Friday
    ticks = {
        text: next_fire(parse_crontab(f"0 9 * * {text}"), None, now)
        for text in ("fri", "friday", "FRI", "5")
    }
    assert len(set(ticks.values())) == 1, ticks


@pytest.mark.anyio
async def test_planning_at_a_tick_of_the_repeated_dst_hour_ends() -> None:
    """The clock reads exactly a 02:30 tick of the night the clocks go back (a fake clock, a
    coarse one): the cron trigger asked from that instant gives it again, and the plan looped
    for ever, freezing the event loop."""
    trigger = parse_crontab("30 2 * * *", "Europe/Berlin")
    due = first_tick(trigger, datetime(2026, 10, 24, 12, 0, tzinfo=UTC), 60)
    assert due == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # the first 02:30 (CEST)
    with anyio.fail_after(5):
        planned = await anyio.to_thread.run_sync(
            plan, trigger, due, due, 60.0, abandon_on_cancel=True
        )
    assert planned.fire == due
    assert planned.next is not None and planned.next > due


@pytest.mark.parametrize("seconds", [float("inf"), float("nan"), 1e300, 0, -1])
def test_an_interval_that_is_no_time_is_refused(seconds: float) -> None:
    with pytest.raises(ScheduleError, match="interval"):
        every(seconds)


@pytest.mark.parametrize(
    "entry",
    [
        {"task": "t", "interval": float("inf")},
        {"task": "t", "interval": float("nan")},
        {"task": "t", "interval": 5, "misfire_grace": float("inf")},
        {"task": "t", "interval": 5, "misfire_grace": float("nan")},
        {"task": "t", "interval": 5, "misfire_grace": 1e12},
    ],
)
def test_settings_that_are_no_time_are_refused_where_they_are(entry: dict[str, Any]) -> None:
    """TOML allows ``inf`` and ``nan``: before, they passed the settings and failed later
    with an OverflowError or ValueError naming nothing."""
    config = QueueConfig(extra={"timers": [entry]})
    with pytest.raises(ScheduleError, match=r"extra\.timers\[0\]"):
        TimerSettings.from_config(config)


def test_the_repeated_dst_hour_of_a_cron_timer_has_no_ticks() -> None:
    """The night the clocks go back, a ``*/15`` timer's second pass through 02:00-02:45 has
    the keys of the first one: those ticks are not ticks (the first pass had them), so the
    ticks of a timer stay in the order of their keys. Before, a catch-up from 02:45 CEST to
    03:05 CET coalesced the second pass into the run as well (``late: 5``, four of them run
    an hour before under the same keys)."""
    trigger = parse_crontab("*/15 * * * *", "Europe/Berlin")
    at = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST
    ticks = [at]
    for _ in range(4):
        following = next_fire(trigger, ticks[-1], ticks[-1] + timedelta(microseconds=1))
        assert following is not None
        ticks.append(following)
    keys = [tick_key(trigger, tick) for tick in ticks]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), keys
    assert ticks[1:3] == [
        datetime(2026, 10, 25, 0, 45, tzinfo=UTC),  # 02:45 CEST
        datetime(2026, 10, 25, 2, 0, tzinfo=UTC),  # 03:00 CET
    ]
    catch_up = plan(trigger, ticks[1], datetime(2026, 10, 25, 2, 5, tzinfo=UTC), 7200)
    assert (catch_up.fire, catch_up.coalesced, catch_up.first) == (ticks[2], 1, ticks[1])
    assert first_tick(trigger, datetime(2026, 10, 25, 1, 10, tzinfo=UTC), 60) == ticks[2]
