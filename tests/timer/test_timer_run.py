"""Timers running inside an app: on time, started and stopped with it, once per tick across
in-process replicas, pause/resume/remove, misfires, clock jumps and DST."""

from __future__ import annotations

import itertools
import statistics
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler.triggers.date import DateTrigger  # type: ignore[import-untyped]
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]
from timer_helpers import Recorder, key_time, wait_until

from qtasks import AsyncQueueTasks, MemoryGlobalConfig
from qtasks_testing.clock import FakeClock
from qtasks_timer import AsyncTimer, TimerError

pytestmark = pytest.mark.anyio


def make_app(
    name: str = "app", global_config: MemoryGlobalConfig | None = None
) -> tuple[AsyncQueueTasks, Recorder, list[Any]]:
    app = AsyncQueueTasks(name, global_config=global_config)
    runs: list[Any] = []

    @app.task
    async def tick(*args: Any) -> None:
        runs.append(args)

    @app.task
    async def other() -> None:
        return None

    recorder = Recorder()
    app.add_plugin(recorder)
    return app, recorder, runs


async def test_interval_timer_fires_on_time() -> None:
    app, rec, runs = make_app()
    timer = AsyncTimer(app, misfire_grace=0)
    handle = timer.add_task("tick", 7, trigger=timedelta(seconds=0.25))
    async with app:
        assert timer.running
        await wait_until(lambda: len(runs) >= 4, 5, "4 runs")
    keys = rec.ticks(handle.id)
    ticks = [key_time(k) for k in keys]
    assert all(b - a == timedelta(seconds=0.25) for a, b in itertools.pairwise(ticks))
    assert all(t.timestamp() % 0.25 == 0 for t in ticks)  # aligned to the epoch
    lateness = [at - key_time(info["tick"]).timestamp() for info, at, _ in rec.enqueued]
    assert min(lateness) >= 0
    assert statistics.median(lateness) < 0.1, lateness
    assert max(lateness) < 0.5, lateness
    assert runs[0] == (7,)


async def test_cron_timer_fires_on_time() -> None:
    app, rec, runs = make_app()
    timer = AsyncTimer(app, misfire_grace=0)
    handle = timer.add_task("tick", trigger="* * * * * *")  # every second
    async with app:
        await wait_until(lambda: len(runs) >= 2, 5, "2 runs")
    keys = rec.ticks(handle.id)
    ticks = [datetime.fromisoformat(k).replace(tzinfo=UTC) for k in keys]
    assert ticks[1] - ticks[0] == timedelta(seconds=1)
    assert all(t.microsecond == 0 for t in ticks)
    for info, at, _ in rec.enqueued:
        late = at - datetime.fromisoformat(info["tick"]).replace(tzinfo=UTC).timestamp()
        assert 0 <= late < 0.5


async def test_timers_start_and_stop_with_the_app() -> None:
    app, rec, _ = make_app()
    timer = AsyncTimer(app)
    timer.add_task("tick", trigger=timedelta(seconds=0.1))
    await app.start()  # a producer-only start does not run timers
    assert not timer.running
    await app.aclose()
    async with app:
        assert timer.running
        await wait_until(lambda: rec.count() >= 1, 3)
    assert not timer.running
    with pytest.raises(TimerError, match="already has a timer"):
        AsyncTimer(app)


async def test_replicas_enqueue_each_tick_once() -> None:
    shared = MemoryGlobalConfig()  # one GlobalConfig, three apps: in-process replicas
    apps = [make_app(f"replica{i}", shared) for i in range(3)]
    handles = [
        AsyncTimer(app).add_task("tick", trigger=timedelta(seconds=0.2)) for app, _, _ in apps
    ]
    assert len({h.id for h in handles}) == 1
    async with apps[0][0], apps[1][0], apps[2][0]:
        await wait_until(lambda: sum(r.count() for _, r, _ in apps) >= 8, 5, "8 ticks")
    keys = [k for _, r, _ in apps for k in r.ticks()]
    assert len(keys) == len(set(keys)), sorted(keys)
    ticks = sorted(key_time(k) for k in keys)
    assert all(b - a == timedelta(seconds=0.2) for a, b in itertools.pairwise(ticks))


def made_ago(age: float, interval: timedelta) -> Any:
    """``IntervalTrigger(interval)`` as APScheduler leaves it when made ``age`` seconds ago
    without a ``start_date``: starting at "then + interval" (nothing else on it tells)."""
    then = datetime.now(UTC) - timedelta(seconds=age)
    return IntervalTrigger(
        seconds=interval.total_seconds(), start_date=then + interval, timezone=UTC
    )


async def test_replicas_agree_on_an_interval_trigger_made_before_it_was_added() -> None:
    # Each replica built its IntervalTrigger without start_date (at import, say) some seconds
    # before adding it, each at its own moment: each one's start is a different "now".
    shared = MemoryGlobalConfig()
    apps = [make_app(f"replica{i}", shared) for i in range(2)]
    interval = timedelta(seconds=0.2)
    handles = [
        AsyncTimer(app).add_task("tick", trigger=made_ago(age, interval))
        for (app, _, _), age in zip(apps, (3.0, 7.31), strict=True)
    ]
    assert len({h.id for h in handles}) == 1
    async with apps[0][0], apps[1][0]:
        await wait_until(lambda: sum(r.count() for _, r, _ in apps) >= 6, 5, "6 ticks")
    keys = [k for _, r, _ in apps for k in r.ticks()]
    assert len(keys) == len(set(keys)), sorted(keys)
    ticks = sorted(key_time(k) for k in keys)
    assert all(b - a == interval for a, b in itertools.pairwise(ticks)), ticks
    assert all(t.microsecond % 200000 == 0 for t in ticks)  # aligned to the epoch


async def test_pause_resume_remove() -> None:
    shared = MemoryGlobalConfig()
    (app, rec, _), (app2, rec2, _) = make_app("a", shared), make_app("b", shared)
    timer, timer2 = AsyncTimer(app), AsyncTimer(app2)
    every = timedelta(seconds=0.1)
    handle = timer.add_task("tick", trigger=every)
    timer2.add_task("tick", trigger=every)
    ref = timer.add_task("other", trigger=every)  # a reference clock that keeps ticking

    def total() -> int:
        return rec.count(handle.id) + rec2.count(handle.id)

    async def ref_ticks(n: int) -> None:
        target = rec.count(ref.id) + n
        await wait_until(lambda: rec.count(ref.id) >= target, 5, f"{n} reference ticks")

    async with app, app2:
        await wait_until(lambda: total() >= 2, 5)
        await handle.pause()  # on every replica: app2 stops too
        assert await handle.is_paused()
        assert await timer2.get(handle.id).is_paused()
        await ref_ticks(1)  # a tick in flight at pause time completes
        paused_at = total()
        await ref_ticks(4)
        assert total() == paused_at
        await handle.resume()
        await wait_until(lambda: total() >= paused_at + 2, 5, "ticks after resume")
        await handle.remove()
        await timer2.get(handle.id).remove()
        assert [h.id for h in timer.timers] == [ref.id]
        await ref_ticks(1)
        removed_at = total()
        await ref_ticks(4)
        assert total() == removed_at
    with pytest.raises(TimerError):
        timer.get(handle.id)


async def test_tick_missed_while_down_is_caught_up_within_grace() -> None:
    app, rec, _ = make_app()
    timer = AsyncTimer(app, misfire_grace=5)
    now = datetime.now(UTC)
    recent = timer.add_task("tick", 1, trigger=DateTrigger(run_date=now - timedelta(seconds=2)))
    old = timer.add_task("tick", 2, trigger=DateTrigger(run_date=now - timedelta(seconds=10)))
    async with app:
        await wait_until(lambda: rec.count(recent.id) == 1, 3)
        await wait_until(lambda: old.next_run_time is None, 3, "old tick handled")
    assert rec.count(old.id) == 0


async def test_restart_does_not_fire_a_tick_again() -> None:
    shared = MemoryGlobalConfig()
    app, rec, _ = make_app("first", shared)
    handle = AsyncTimer(app, misfire_grace=30).add_task("tick", trigger=timedelta(seconds=0.2))
    async with app:
        await wait_until(lambda: rec.count() >= 3, 5)
    app2, rec2, _ = make_app("second", shared)
    AsyncTimer(app2, misfire_grace=30).add_task("tick", trigger=timedelta(seconds=0.2))
    async with app2:
        await wait_until(lambda: rec2.count() >= 3, 5)
    keys = rec.ticks(handle.id) + rec2.ticks(handle.id)
    assert len(keys) == len(set(keys))


async def test_clock_jump_forward_coalesces_into_one_run(fake_clock: Any) -> None:
    clock = fake_clock(datetime(2026, 6, 1, 12, 0, 0, 500000, tzinfo=UTC))
    app, rec, _ = make_app()
    handle = AsyncTimer(app, misfire_grace=30, clock=clock).add_task(
        "tick", trigger=timedelta(seconds=1)
    )
    async with app:
        await wait_until(lambda: rec.count() >= 1, 3)
        clock.shift(3600)  # one hour passes at once (or the process was asleep)
        await wait_until(lambda: rec.count() >= 4, 5)
    infos = [info for info, _, _ in rec.enqueued]
    catch_up = infos[1]
    assert catch_up["late"] == 29  # 30 s of ticks within grace coalesced into one run
    ticks = [key_time(i["tick"]) for i in infos[1:]]
    # After the catch-up, ticks continue every second: no burst of the hour's ticks.
    assert ticks[1] - ticks[0] == timedelta(seconds=1)
    assert ticks[2] - ticks[1] == timedelta(seconds=1)
    assert rec.count(handle.id) == len(infos)


async def test_clock_jump_back_does_not_fire_twice(fake_clock: Any) -> None:
    clock = fake_clock(datetime(2026, 6, 1, 12, 0, 0, 100000, tzinfo=UTC))
    app, rec, _ = make_app()
    AsyncTimer(app, misfire_grace=30, clock=clock).add_task("tick", trigger=timedelta(seconds=0.5))
    async with app:
        await wait_until(lambda: rec.count() >= 3, 5)
        clock.shift(-1.6)  # NTP step back: the last ~3 ticks' times come again
        await wait_until(lambda: rec.count() >= 6, 8)
    keys = rec.ticks()
    assert len(keys) == len(set(keys))
    assert keys == sorted(keys)


async def test_dst_fall_back_fires_a_local_time_once(fake_clock: Any) -> None:
    # 2026-10-25 in Europe/Berlin: 02:30 CEST (00:30Z) and 02:30 CET (01:30Z).
    clock = fake_clock(datetime(2026, 10, 25, 0, 29, 59, 600000, tzinfo=UTC))
    shared = MemoryGlobalConfig()
    app, rec, _ = make_app("a", shared)
    handle = AsyncTimer(app, clock=clock).add_task(
        "tick", trigger="30 2 * * *", timezone="Europe/Berlin"
    )
    first_cet = datetime(2026, 10, 25, 1, 30, tzinfo=UTC)
    next_day = datetime(2026, 10, 26, 1, 30, tzinfo=UTC)
    app2, rec2, _ = make_app("b", shared)
    handle2 = AsyncTimer(app2, clock=clock).add_task(
        "tick", trigger="30 2 * * *", timezone="Europe/Berlin"
    )
    async with app:
        await wait_until(lambda: rec.count() == 1, 3, "the 02:30 CEST run")
        # APScheduler's second 02:30 (CET) has the first one's key: it is no tick.
        assert handle.next_run_time == next_day
        async with app2:  # a replica that starts between the two 02:30s
            clock.set(first_cet - timedelta(seconds=0.3))
            await wait_until(lambda: handle2.next_run_time == next_day, 3, "b armed")
            await wait_until(lambda: clock() > first_cet + timedelta(seconds=0.3), 3, "02:30 CET")
            assert handle.next_run_time == handle2.next_run_time == next_day
    assert rec.count() + rec2.count() == 1
    assert rec.ticks() == ["2026-10-25T02:30:00.000000"]


async def test_a_start_up_catch_up_counts_only_the_ticks_nobody_ran() -> None:
    """Replica a runs an every-second timer, then every replica is down for three ticks; b
    starts within ``misfire_grace``: its catch-up runs the latest tick once, ``late`` counting
    the two ticks before it that nobody ran, not the ticks a ran before (it said 59, every
    tick of the grace)."""
    clock = FakeClock()
    clock.freeze()
    clock.advance_to(int(clock.time()) + 1.5)
    shared = MemoryGlobalConfig()
    (app_a, rec_a, _), (app_b, rec_b, _) = make_app("a", shared), make_app("b", shared)
    second = timedelta(seconds=1)
    AsyncTimer(app_a, clock=clock.now).add_task("tick", trigger=second)
    AsyncTimer(app_b, clock=clock.now).add_task("tick", trigger=second)
    async with app_a:
        await wait_until(lambda: rec_a.count() == 1, 5, "a's start-up catch-up")
        clock.advance(1)
        await wait_until(lambda: rec_a.count() == 2, 5, "a's next run")
        clock.advance(1)
        await wait_until(lambda: rec_a.count() == 3, 5, "a's run after it")
    last = key_time(rec_a.ticks()[-1])
    clock.advance(3)  # the ticks last + 1 s, + 2 s and + 3 s fall while every replica is down
    async with app_b:
        await wait_until(lambda: rec_b.count() == 1, 5, "b's start-up catch-up")
    (info, _, _), *_ = rec_b.enqueued
    assert (key_time(info["tick"]), info["late"]) == (last + 3 * second, 2), rec_b.enqueued
    assert [info["late"] for info, _, _ in rec_a.enqueued] == [59, 0, 0], rec_a.enqueued


async def test_a_catch_up_into_the_repeated_dst_hour_runs_the_tick_it_missed(
    fake_clock: Any,
) -> None:
    """A ``*/15`` timer in Berlin the night the clocks go back: it runs 02:30 CEST, then the
    process sleeps until 02:20 CET, past 02:45 CEST. That tick, missed and within
    ``misfire_grace``, runs; the second pass's 02:00 and 02:15 (keys of the first pass) do
    not. Before, the catch-up coalesced into 02:15 CET, whose key sorts before 02:30: taken
    as handled, it ran nothing, and 02:45 never ran."""
    clock = fake_clock(datetime(2026, 10, 25, 0, 29, 59, 700000, tzinfo=UTC))
    app, rec, _ = make_app()
    handle = AsyncTimer(app, misfire_grace=3600, clock=clock).add_task(
        "tick", trigger="*/15 * * * *", timezone="Europe/Berlin"
    )
    slept_until = datetime(2026, 10, 25, 1, 20, tzinfo=UTC)  # 02:20 CET
    async with app:
        await wait_until(lambda: rec.count() == 2, 3, "the start's catch-up and 02:30 CEST")
        clock.set(slept_until)
        await wait_until(
            lambda: (handle.next_run_time or slept_until) > slept_until, 3, "the wake-up"
        )
        await wait_until(lambda: rec.count() >= 3, 3, "the catch-up of 02:45 CEST")
    assert [(info["tick"], info["late"]) for info, _, _ in rec.enqueued] == [
        ("2026-10-25T02:15:00.000000", 3),
        ("2026-10-25T02:30:00.000000", 0),
        ("2026-10-25T02:45:00.000000", 0),
    ], rec.enqueued
    assert handle.next_run_time == datetime(2026, 10, 25, 2, 0, tzinfo=UTC)  # 03:00 CET
