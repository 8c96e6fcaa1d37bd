"""A timer that meets a failure reports it and keeps running: an enqueue that times out, a
custom trigger that raises, a claim that waits out an outage."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Literal

import anyio
import pytest
from apscheduler.triggers.date import DateTrigger  # type: ignore[import-untyped]
from timer_helpers import (
    ClaimGate,
    Gate,
    HeldUntilBack,
    Recorder,
    check_a_won_tick_heard_late_runs,
    check_an_outage_that_emptied_the_claims_gives_one_run,
    key_time,
    wait_until,
)

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryGlobalConfig
from qtasks.messages import Envelope
from qtasks_testing.clock import FakeClock
from qtasks_timer import AsyncTimer, TimerHandle
from qtasks_timer import timer as timer_module
from qtasks_timer.outage import TickOutage
from qtasks_timer.timer import CLAIMS
from qtasks_timer.triggers import tick_key

pytestmark = pytest.mark.anyio


class StuckBroker(MemoryBroker):
    """A broker whose first publish never completes (it stopped answering)."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = anyio.Event()

    async def publish(self, envelope: Envelope) -> None:
        if not self.stuck.is_set():
            self.stuck.set()
            await anyio.sleep_forever()
        await super().publish(envelope)


def make_app(broker: MemoryBroker | None = None) -> tuple[AsyncQueueTasks, Recorder]:
    app = AsyncQueueTasks("app", broker=broker)

    @app.task
    async def tick() -> None:
        return None

    @app.task
    async def other() -> None:
        return None

    @app.task
    async def bad() -> None:  # BadTaskBroker fails its publishes
        return None

    recorder = Recorder()
    app.add_plugin(recorder)
    return app, recorder


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


async def test_a_tick_whose_enqueue_times_out_is_released_and_retried(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(timer_module, "_ENQUEUE_TIMEOUT", 0.3)
    clock = FakeClock()
    clock.freeze()
    broker = StuckBroker()
    app, rec = make_app(broker)
    at = clock.now() + timedelta(seconds=1)
    handle = AsyncTimer(app, clock=clock.now).add_task("tick", trigger=DateTrigger(run_date=at))
    key = tick_key(handle.trigger, at)

    def reported() -> bool:
        return any(handle.id in m for m in messages(caplog, logging.WARNING))

    with caplog.at_level(logging.WARNING, logger="qtasks.timer"):
        async with app:
            clock.advance(1)
            await wait_until(reported, 3, "the tick to fail")
            assert broker.stuck.is_set()
            # Released: another replica, or this one's retry, can have the tick.
            assert await app.global_config.get(CLAIMS, f"{handle.id}:{key}") is None
            assert rec.count() == 0
            clock.advance(1)  # the retry is due
            await wait_until(lambda: rec.count(handle.id) == 1, 3, "the tick, enqueued again")
    assert rec.ticks(handle.id) == [key]
    assert any("took over 0.3 s" in m for m in messages(caplog, logging.WARNING)), caplog.text


async def test_releasing_a_claim_never_frees_another_replicas_claim_of_the_tick(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The release of a tick whose enqueue failed read the claim, then deleted the key: had
    the claim run out in between and another replica claimed the tick, that replica's claim
    was deleted, and a third could run the tick again. Now only the claim read is deleted
    (the GlobalConfig's atomic ``delete_if_equal``)."""
    monkeypatch.setattr(timer_module, "_ENQUEUE_TIMEOUT", 0.3)
    clock = FakeClock()
    clock.freeze()
    broker = StuckBroker()
    theirs = {"worker": "another-replica"}
    swapped = anyio.Event()

    class TakenOverMeanwhile(MemoryGlobalConfig):
        """Once the enqueue is stuck, the claim read by the release is replaced by another
        replica's right after the read (it ran out and was claimed again)."""

        async def get(self, namespace: str, key: str, default: Any = None) -> Any:
            value = await super().get(namespace, key, default)
            if namespace == CLAIMS and broker.stuck.is_set() and not swapped.is_set():
                await self.set(namespace, key, theirs)
                swapped.set()
            return value

    app, rec = make_app(broker)
    app.global_config = TakenOverMeanwhile()
    at = clock.now() + timedelta(seconds=1)
    handle = AsyncTimer(app, clock=clock.now).add_task("tick", trigger=DateTrigger(run_date=at))
    claim = f"{handle.id}:{tick_key(handle.trigger, at)}"

    def reported() -> bool:  # after the release: the failed tick's warning
        return any(handle.id in m for m in messages(caplog, logging.WARNING))

    with caplog.at_level(logging.WARNING, logger="qtasks.timer"):
        async with app:
            clock.advance(1)
            await wait_until(reported, 3, "the tick to fail and its claim to be released")
            assert swapped.is_set()
            assert await app.global_config.get(CLAIMS, claim) == theirs, "theirs was deleted"
    assert rec.count() == 0


class FailingTrigger:
    """A custom trigger that gives its first tick, then raises computing the one after."""

    def __init__(self, first: datetime) -> None:
        self.first = first

    def get_next_fire_time(self, previous: datetime | None, now: datetime) -> datetime | None:
        if previous is None and now <= self.first:
            return self.first
        raise RuntimeError("the holiday calendar is unreachable")

    def __repr__(self) -> str:
        return f"FailingTrigger({self.first.isoformat()})"


class BrokenTrigger:
    """A custom trigger that raises whenever it is asked for a tick."""

    def get_next_fire_time(self, previous: datetime | None, now: datetime) -> datetime | None:
        raise RuntimeError("no calendar configured")

    def __repr__(self) -> str:
        return "BrokenTrigger()"


async def test_a_trigger_that_raises_stops_its_timer_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, rec = make_app()
    timer = AsyncTimer(app, misfire_grace=0)
    failing = timer.add_task(
        "tick", trigger=FailingTrigger(datetime.now(UTC) + timedelta(seconds=0.2))
    )
    healthy = timer.add_task("other", trigger=timedelta(seconds=0.1))
    with caplog.at_level(logging.WARNING, logger="qtasks.timer"):
        async with app:
            await wait_until(
                lambda: any(failing.id in m for m in messages(caplog)), 3, "the failing trigger"
            )
            broken = timer.add_task("tick", trigger=BrokenTrigger())  # added while running
            await wait_until(lambda: rec.count(healthy.id) >= 1, 3, "a healthy tick")
            after = rec.count(healthy.id)
            await wait_until(lambda: rec.count(healthy.id) >= after + 3, 3, "3 more ticks")
            assert timer.running
            assert failing.next_run_time is None
            assert broken.next_run_time is None
    errors = messages(caplog)
    for handle in (failing, broken):
        assert any(handle.id in m and "tick" in m and "trigger" in m for m in errors), errors


async def test_a_trigger_that_raises_at_start_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, rec = make_app()
    timer = AsyncTimer(app)
    broken = timer.add_task("tick", trigger=BrokenTrigger())
    healthy = timer.add_task("other", trigger=timedelta(seconds=0.1))
    with caplog.at_level(logging.WARNING, logger="qtasks.timer"):
        async with app:
            await wait_until(lambda: rec.count(healthy.id) >= 3, 3, "3 healthy ticks")
            assert timer.running
    assert any(broken.id in m for m in messages(caplog)), caplog.text


async def test_a_trigger_that_raises_does_not_break_listing_the_timers_before_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``qtasks inspect`` and the dashboard list timers of an app that does not serve: a
    raising trigger's next run is unknown (``None``, with a warning), the others are
    listed."""
    app, _ = make_app()
    timer = AsyncTimer(app)
    broken = timer.add_task("tick", trigger=BrokenTrigger())
    healthy = timer.add_task("other", trigger=timedelta(seconds=60))
    with caplog.at_level(logging.WARNING, logger="qtasks.timer"):
        assert broken.next_run_time is None
        rows = {row["id"]: row for row in await timer.describe()}
    assert rows[broken.id]["next_run"] is None
    assert rows[healthy.id]["next_run"] is not None
    assert any(broken.id in m for m in messages(caplog, logging.WARNING)), caplog.text


class DownBroker(MemoryBroker):
    """A broker whose publishes raise a lost connection while ``down`` (counted by task)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.refused = {"tick": 0, "other": 0}

    async def publish(self, envelope: Envelope) -> None:
        if self.down:
            for task in self.refused:
                self.refused[task] += f'"task":"{task}"'.encode() in envelope.body
            raise ConnectionError("broker unreachable")
        await super().publish(envelope)


async def test_an_outage_is_logged_when_it_begins_and_ends_not_per_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ticks retried every second through a broker outage: one warning when it begins, one
    line when it ends (its length, attempts, ticks, ticks lost), whether the tick went through
    in the end (``kept``) or went past its misfire grace (``lost``)."""
    clock = FakeClock()
    clock.freeze()
    broker = DownBroker()
    app, rec = make_app(broker)
    timer = AsyncTimer(app, clock=clock.now)
    once = DateTrigger(run_date=clock.now() + timedelta(seconds=1))
    kept = timer.add_task("tick", trigger=once)
    lost = timer.add_task("other", trigger=once, misfire_grace=25)

    def logged(timer_id: str, *words: str) -> int:
        return sum(
            timer_id in r.getMessage() and all(w in r.getMessage() for w in words)
            for r in caplog.records
        )

    def tried(task: str, times: int) -> bool:
        return broker.refused[task] == times

    # The frozen clock moves on from the wall clock when that is ahead: steps of 10 s keep
    # the ticks' lateness clear of both graces whatever the test's own pace.
    with caplog.at_level(logging.DEBUG, logger="qtasks.timer"):
        async with app:
            for attempt in range(1, 5):
                clock.advance(1 if attempt == 1 else 10)
                await wait_until(partial(tried, "tick", attempt), 3, f"attempt {attempt}")
                if attempt < 4:  # at the 4th the other tick is 30 s late, past its grace
                    await wait_until(partial(tried, "other", attempt), 3, "its attempt")
            await wait_until(lambda: logged(lost.id, "skipped") > 0, 3, "the lost tick")
            broker.down = False
            clock.advance(10)
            await wait_until(lambda: rec.count(kept.id) == 1, 3, "the tick, enqueued at last")
    assert broker.refused == {"tick": 4, "other": 3} and rec.count(lost.id) == 0
    for timer_id, least, summary in (
        (kept.id, 40.0, "4 failed attempt(s) at 1 tick(s), 0 of them not enqueued"),
        (lost.id, 30.0, "3 failed attempt(s) at 1 tick(s), 1 of them not enqueued"),
    ):
        shown = [
            (r.levelname, r.getMessage())
            for r in caplog.records
            if r.levelno >= logging.INFO and timer_id in r.getMessage()
        ]
        assert len(shown) == 2, shown
        (began_level, began), (ended_level, ended) = shown
        assert began_level == "WARNING" and "an outage" in began, shown
        assert "ConnectionError: broker unreachable" in began, shown
        assert summary in ended, shown
        length = re.search(r"([0-9.]+) s since the outage began", ended)
        assert length is not None and float(length.group(1)) >= least, shown
        assert ended_level == ("INFO" if timer_id == kept.id else "WARNING"), shown


class BadTaskBroker(MemoryBroker):
    """A broker whose publishes of task ``bad`` raise a bug of their own (not an outage), or
    with ``hang`` never complete (until the enqueue timeout)."""

    def __init__(self, *, hang: bool = False) -> None:
        super().__init__()
        self.hang = hang
        self.bad_publishes = 0
        self.stuck = anyio.Event()

    async def publish(self, envelope: Envelope) -> None:
        if b'"bad"' in envelope.body:
            self.bad_publishes += 1
            if self.hang:
                self.stuck.set()
                await anyio.sleep_forever()
            raise RuntimeError("a plugin's bug")
        await super().publish(envelope)


def bad_and_healthy(
    broker: BadTaskBroker,
) -> tuple[FakeClock, AsyncQueueTasks, Recorder, TimerHandle, TimerHandle]:
    """A frozen clock and an app whose timers are task ``bad`` once, a second from now, and
    task ``tick`` every second."""
    clock = FakeClock()
    clock.freeze()
    app, rec = make_app(broker)
    timer = AsyncTimer(app, clock=clock.now)
    once = DateTrigger(run_date=clock.now() + timedelta(seconds=1))
    failing = timer.add_task("bad", trigger=once)
    healthy = timer.add_task("tick", trigger=timedelta(seconds=1))
    return clock, app, rec, failing, healthy


def ticked(rec: Recorder, timer_id: str, times: int) -> bool:
    return rec.count(timer_id) >= times


async def test_a_tick_that_fails_for_good_is_not_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only an outage (a timeout, a lost connection) is tried again within the grace time: a
    failure no retry mends (a bug, an unknown task) is logged once, not once a second."""
    broker = BadTaskBroker()
    clock, app, rec, failing, healthy = bad_and_healthy(broker)
    with caplog.at_level(logging.WARNING, logger="qtasks.timer"):
        async with app:
            for second in range(1, 4):
                clock.advance(1)
                # The healthy timer's tick of this second shows the loop handled it.
                await wait_until(partial(ticked, rec, healthy.id, second), 3, "a healthy tick")
    assert broker.bad_publishes == 1, "tried again a second later"
    failures = [m for m in messages(caplog) if failing.id in m]
    assert len(failures) == 1 and "not tried again" in failures[0], failures


async def test_a_slow_tick_holds_back_only_its_own_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While one timer's enqueue hangs (up to the enqueue timeout), the other timers of the
    process keep firing on time: before, the loop waited for every due tick to end."""
    monkeypatch.setattr(timer_module, "_ENQUEUE_TIMEOUT", 4.0)
    broker = BadTaskBroker(hang=True)
    clock, app, rec, _, healthy = bad_and_healthy(broker)
    async with app:
        clock.advance(1)
        with anyio.fail_after(5):
            await broker.stuck.wait()
        for second in range(1, 4):
            await wait_until(partial(ticked, rec, healthy.id, second), 3, "a tick meanwhile")
            clock.advance(1)


def test_an_outage_that_lost_ticks_or_goes_on_is_reported_at_warning_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The outage's end is a warning when ticks were lost in it (an info line when every tick
    went through in the end), and an outage that goes on is reported again every five
    minutes rather than only when it began."""
    began = datetime(2026, 1, 1, tzinfo=UTC)
    outage = TickOutage("t", began)
    with caplog.at_level(logging.DEBUG, logger="qtasks.timer"):
        outage.failed("k1", "ConnectionError: down", "tried again", began)
        outage.failed("k1", "ConnectionError: down", "tried again", began + timedelta(minutes=1))
        outage.failed("k2", "ConnectionError: down", "tried again", began + timedelta(minutes=6))
        outage.failed("k2", "ConnectionError: down", "tried again", began + timedelta(minutes=7))
        outage.over("k3", began + timedelta(minutes=8))
    shown = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert [level for level, _ in shown] == ["WARNING", "WARNING", "WARNING"], shown
    assert "still failing" in shown[1][1] and "360.0 s since the outage began" in shown[1][1]
    assert "2 of them not enqueued" in shown[2][1], shown
    caplog.clear()
    recovered = TickOutage("t", began)
    with caplog.at_level(logging.DEBUG, logger="qtasks.timer"):
        recovered.failed("k1", "ConnectionError: down", "tried again", began)
        recovered.over("k1", began + timedelta(seconds=3))
    assert [r.levelname for r in caplog.records if r.levelno >= logging.INFO] == [
        "WARNING",
        "INFO",
    ]


class HeldClaims(MemoryGlobalConfig):
    """A GlobalConfig whose tick claims wait while ``held`` is set (until it fires), as a
    Redis client riding out an outage waits for the server to come back. ``claims``: the
    keys claimed, in order. A claim of a key in ``failing`` fails (a client that gave up),
    once."""

    def __init__(self) -> None:
        super().__init__()
        self.held: anyio.Event | None = None
        self.waiting = 0
        self.answered = 0
        self.claims: list[str] = []
        self.failing: set[str] = set()

    async def set_if_absent(
        self, namespace: str, key: str, value: Any, *, ttl: float | None = None
    ) -> bool:
        held = self.held
        if namespace == CLAIMS:
            self.claims.append(key)
        if namespace == CLAIMS and held is not None:
            self.waiting += 1
            await held.wait()
        try:
            if namespace == CLAIMS and key in self.failing:
                self.failing.remove(key)
                raise ConnectionError("the server is gone")
            return await super().set_if_absent(namespace, key, value, ttl=ttl)
        finally:
            self.answered += namespace == CLAIMS


async def test_ticks_that_come_due_while_a_claim_waits_coalesce_into_one_run() -> None:
    """Two replicas' claims of a tick wait out an outage spanning three more ticks: when they
    return, one run of the latest due tick is enqueued (``late`` counting the three before it),
    not the stale tick (``late: 0``) and then a second run coalescing the others."""
    clock = FakeClock()
    clock.freeze()
    claims = HeldClaims()
    apps = []
    for name in ("a", "b"):
        app = AsyncQueueTasks(name, global_config=claims)

        @app.task
        async def tick() -> None:
            return None

        rec = Recorder()
        app.add_plugin(rec)
        AsyncTimer(app, clock=clock.now).add_task("tick", trigger=timedelta(seconds=1))
        apps.append((app, rec))
    (app_a, rec_a), (app_b, rec_b) = apps

    def runs() -> list[dict[str, Any]]:
        return sorted(
            (info for info, _, _ in rec_a.enqueued + rec_b.enqueued), key=lambda info: info["tick"]
        )

    def has_run(tick: datetime) -> bool:
        return any(key_time(info["tick"]) == tick for info in runs())

    second = timedelta(seconds=1)

    async with app_a, app_b:
        await wait_until(lambda: len(runs()) == 1, 5, "the start's catch-up run")
        await wait_until(lambda: claims.answered == 2, 5, "both replicas' claims of it")
        before = key_time(runs()[0]["tick"])
        claims.held = anyio.Event()
        clock.advance(1)
        await wait_until(lambda: claims.waiting == 2, 5, "both replicas' claims to wait")
        clock.advance(3)
        released_at = clock.now()
        latest = released_at.replace(microsecond=0)  # the latest tick due by then
        claims.held.set()
        claims.held = None
        await wait_until(partial(has_run, latest), 5, "the catch-up after the outage")
        clock.advance(1)
        await wait_until(partial(has_run, latest + second), 5, "the next tick after it")
    after = [info for info in runs() if key_time(info["tick"]) > before]
    # One catch-up (the three ticks before it coalesced), then the next tick on time.
    assert [key_time(info["tick"]) for info in after] == [latest, latest + second], after
    assert after[0]["late"] == (latest - before) / second - 1 >= 3, after
    assert after[1]["late"] == 0, after


class HeldReplica:
    """One replica of an every-second timer, its claims :class:`HeldClaims`, on a frozen
    clock."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.clock.freeze()
        self.claims = HeldClaims()
        self.app, self.rec, self.handle = ticking_app(self.claims, self.clock)

    def claim(self, tick: datetime) -> str:
        """The claim key of the tick at ``tick``."""
        return f"{self.handle.id}:{tick_key(self.handle.trigger, tick)}"

    async def hold_next_claim(self) -> datetime:
        """Once the start's catch-up ran, move the clock to the next tick, T1, whose claim
        then waits until :meth:`release`; T1."""
        await wait_until(lambda: self.rec.count() == 1, 5, "the start's catch-up run")
        t1 = key_time(self.rec.ticks()[0]) + timedelta(seconds=1)
        self.claims.held = anyio.Event()
        self.clock.advance_to(t1.timestamp() + 0.1)
        await wait_until(lambda: self.claims.waiting == 1, 5, "the claim of T1 to wait")
        return t1

    def release(self) -> None:
        """Let the waiting claim go on (the next ones do not wait)."""
        assert self.claims.held is not None
        self.claims.held.set()
        self.claims.held = None


async def test_a_replica_that_lost_a_claim_it_heard_late_leaves_the_ticks_due_since() -> None:
    """Its claim of T1 lost to another replica and answered once T4 was due: the replica
    neither claims T2-T4 nor coalesces them into a run (the claim's winner coalesces them;
    had this replica taken T4, the winner would run T1 on its own as well: two runs for one
    outage). It claims T5 when T5 is due."""
    one = HeldReplica()
    claims, claim, rec = one.claims, one.claim, one.rec
    second = timedelta(seconds=1)
    async with one.app:
        t1 = await one.hold_next_claim()
        start, t5 = t1 - second, t1 + 4 * second
        await claims.set(CLAIMS, claim(t1), "another replica's worker id")  # the winner
        one.clock.advance(3)  # T2, T3 and T4 are due
        one.release()
        await wait_until(lambda: one.handle.next_run_time == t5, 5, "the answer (lost) handled")
        one.clock.advance_to(t5.timestamp() + 0.1)
        await wait_until(lambda: claim(t5) in claims.claims, 5, "the claim of T5")
        await wait_until(lambda: claim(t5).endswith(rec.ticks()[-1]), 5, "the run of T5")
    assert claims.claims == [claim(start), claim(t1), claim(t5)]
    assert [(key_time(info["tick"]), info["late"]) for info, _, _ in rec.enqueued] == [
        (start, 59),
        (t5, 0),
    ], rec.enqueued


async def test_a_won_tick_heard_late_runs_when_no_later_tick_is_within_the_grace() -> None:
    """The answer to a won claim comes once the next tick is due and past ``misfire_grace``
    already: with no later tick to coalesce it into, the tick whose claim was won runs."""
    clock = FakeClock()
    clock.freeze()
    clock.advance_to(int(clock.time()) // 10 * 10 + 19.5)  # the tick 9.5 s ago is past the grace
    claims = HeldClaims()
    claims.held = anyio.Event()
    app, rec, handle = ticking_app(claims, clock, every=10, grace=5)
    t1 = clock.now().replace(microsecond=0) + timedelta(seconds=1)
    async with app:
        clock.advance_to(t1.timestamp() + 0.1)
        await wait_until(lambda: claims.waiting == 1, 5, "the claim of T1 to wait")
        clock.advance_to(t1.timestamp() + 16)  # T2 is due, 6 s ago: past the grace
        claims.held.set()
        await wait_until(lambda: rec.count() == 1, 5, "the run of T1")
        assert handle.next_run_time == t1 + timedelta(seconds=20)
    assert [(key_time(info["tick"]), info["late"]) for info, _, _ in rec.enqueued] == [(t1, 0)], (
        rec.enqueued
    )


async def test_a_won_tick_heard_late_runs_when_its_later_tick_fails_then_is_lost() -> None:
    """The claim of the tick a won tick T1 coalesced into fails in an outage; by its retry
    another replica has that tick: T1 runs."""
    one = HeldReplica()
    claims, claim, rec = one.claims, one.claim, one.rec
    second = timedelta(seconds=1)
    async with one.app:
        t1 = await one.hold_next_claim()
        start = t1 - second
        for tick in (t1 + second, t1 + 2 * second):  # taken by another replica meanwhile
            await claims.set(CLAIMS, claim(tick), "another replica's worker id")
        claims.failing.add(claim(t1 + second))
        one.clock.advance(1)  # T2 is due
        one.release()
        await wait_until(lambda: not claims.failing, 5, "the claim of T2 to fail")
        one.clock.advance(1.1)  # its retry is due, with T3
        await wait_until(lambda: rec.count() == 2, 5, "the run of T1")
    assert [(key_time(info["tick"]), info["late"]) for info, _, _ in rec.enqueued] == [
        (start, 59),
        (t1, 0),
    ], rec.enqueued
    assert claims.claims[-1] == claim(t1 + 2 * second), claims.claims


class GatedClaims(MemoryGlobalConfig):
    """Tick claims of two replicas (in one GlobalConfig), ordered by :attr:`gate`."""

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate

    async def set_if_absent(
        self, namespace: str, key: str, value: Any, *, ttl: float | None = None
    ) -> bool:
        make = partial(super().set_if_absent, namespace, key, value, ttl=ttl)
        return await (self.gate.claim(key, value, make) if namespace == CLAIMS else make())


def two_replicas(
    claims: MemoryGlobalConfig, clock: FakeClock
) -> tuple[tuple[AsyncTimer, AsyncTimer], tuple[Recorder, Recorder]]:
    """Replicas a and b on ``claims``, each with an every-second timer on ``clock``, and what
    each enqueued."""
    timers, recorders = [], []
    for name in "ab":
        app = AsyncQueueTasks(name, global_config=claims)

        @app.task
        async def tick() -> None:
            return None

        recorders.append(Recorder())
        app.add_plugin(recorders[-1])
        timers.append(AsyncTimer(app, clock=clock.now))
        timers[-1].add_task("tick", trigger=timedelta(seconds=1))
    return (timers[0], timers[1]), (recorders[0], recorders[1])


async def test_a_tick_whose_claim_a_replica_won_runs_though_it_heard_so_late() -> None:
    """Replica a wins tick T1's claim but hears so once T2 is due, and b has T2: a enqueues T1
    (``late: 0``) instead of coalescing it into T2, which it does not have."""
    clock = FakeClock()
    clock.freeze()
    gate = ClaimGate()
    timers, recorders = two_replicas(GatedClaims(gate), clock)
    await check_a_won_tick_heard_late_runs(timers, recorders, gate, clock)


@pytest.mark.parametrize("first", ["a", "b"])
async def test_an_outage_that_emptied_the_claims_gives_one_run(first: Literal["a", "b"]) -> None:
    """The GlobalConfig dies with b's claim of T0 (which a ran) on its way, and comes back
    empty at T3.5 once a's claim of T1 waits too: both claims win, both replicas fold their
    won tick into T3, and whichever loses T3 sees in its claim that its tick is accounted for
    (``first``: whose claim of T3 comes first). Before, it ran its won tick on its own."""
    clock = FakeClock()
    clock.freeze()
    gate = HeldUntilBack()
    claims = GatedClaims(gate)
    timers, recorders = two_replicas(claims, clock)
    await check_an_outage_that_emptied_the_claims_gives_one_run(
        timers, recorders, gate, clock, partial(claims.clear, CLAIMS), first
    )


class FailingClaims(MemoryGlobalConfig):
    """A GlobalConfig whose tick claims fail while ``down`` (a Redis client that gives up on
    a server that is gone), counting the failures."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.failures = 0

    async def set_if_absent(
        self, namespace: str, key: str, value: Any, *, ttl: float | None = None
    ) -> bool:
        if namespace == CLAIMS and self.down:
            self.failures += 1
            raise ConnectionError("the server is gone")
        return await super().set_if_absent(namespace, key, value, ttl=ttl)


def ticking_app(
    global_config: MemoryGlobalConfig, clock: FakeClock, *, every: float = 1, grace: float = 60
) -> tuple[AsyncQueueTasks, Recorder, TimerHandle]:
    """An app on ``global_config`` whose timer (on ``clock``, ``misfire_grace=grace``)
    enqueues ``tick`` every ``every`` seconds, and that timer."""
    app = AsyncQueueTasks("a", global_config=global_config)

    @app.task
    async def tick() -> None:
        return None

    rec = Recorder()
    app.add_plugin(rec)
    timer = AsyncTimer(app, clock=clock.now, misfire_grace=grace)
    handle = timer.add_task("tick", trigger=timedelta(seconds=every))
    return app, rec, handle


async def test_a_tick_tried_again_after_failed_claims_counts_every_tick_it_coalesced() -> None:
    """Claims that fail in an outage are tried again a second later, each retry coalescing
    the ticks due by then: the run once the server is back counts every tick of the outage
    in ``late``, not only those since the last failed claim (seen as ``late: 1`` for four
    ticks when a claim failed twice)."""
    clock = FakeClock()
    clock.freeze()
    claims = FailingClaims()
    app, rec, _ = ticking_app(claims, clock)

    def runs() -> list[dict[str, Any]]:
        return sorted((info for info, _, _ in rec.enqueued), key=lambda info: info["tick"])

    second = timedelta(seconds=1)
    async with app:
        await wait_until(lambda: len(runs()) == 1, 5, "the start's catch-up run")
        before = key_time(runs()[0]["tick"])
        claims.down = True
        clock.advance(1)
        await wait_until(lambda: claims.failures == 1, 5, "the next tick's claim to fail")
        clock.advance(1)
        await wait_until(lambda: claims.failures == 2, 5, "its retry to fail too")
        claims.down = False
        clock.advance(1)
        latest = clock.now().replace(microsecond=0)
        await wait_until(lambda: len(runs()) == 2, 5, "the run once the server is back")
    after = runs()[1]
    assert key_time(after["tick"]) == latest, runs()
    assert after["late"] == (latest - before) / second - 1 >= 2, runs()


async def test_a_restart_does_not_count_again_the_ticks_of_a_retry_left_pending() -> None:
    """The start's catch-up claim fails and the app stops while its retry waits: the next
    start's catch-up counts the ticks within ``misfire_grace`` once (``late`` was 118 for an
    every-second timer with the default 60 s, the pending retry's 59 added to the new 59)."""
    clock = FakeClock()
    clock.freeze()
    clock.advance_to(int(clock.time()) + 1.5)  # half-way between ticks: 60 of them in the grace
    claims = FailingClaims()
    app, rec, _ = ticking_app(claims, clock)
    claims.down = True
    async with app:
        await wait_until(lambda: claims.failures == 1, 5, "the catch-up's claim to fail")
    assert rec.count() == 0
    claims.down = False
    async with app:
        await wait_until(lambda: rec.count() == 1, 5, "the next start's catch-up")
    (info, _, _), *_ = rec.enqueued
    assert key_time(info["tick"]) == clock.now().replace(microsecond=0), rec.enqueued
    assert info["late"] == 59, rec.enqueued
