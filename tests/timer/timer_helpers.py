"""Shared test helpers: record what timers enqueue, wait on conditions with deadlines, hold up a
replica's answer to a tick's claim, or its claim until the GlobalConfig is back from an outage."""

from __future__ import annotations

import operator
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Literal

import anyio

from qtasks import hookimpl
from qtasks.messages import Message
from qtasks.record import TaskRecord
from qtasks_testing.clock import FakeClock
from qtasks_timer import AsyncTimer
from qtasks_timer.claims import claimer
from qtasks_timer.timer import HEADER
from qtasks_timer.triggers import tick_key


class Recorder:
    """A plugin that records every timer enqueue that reached the broker."""

    def __init__(self, name: str = "recorder") -> None:
        self.name = name
        self._pending: dict[str, dict[str, Any]] = {}
        self.enqueued: list[tuple[dict[str, Any], float, str]] = []

    @hookimpl(trylast=True)
    def qtasks_task_enqueue(self, message: Message) -> None:
        info = message.headers.get(HEADER)
        if info is not None:
            self._pending[message.uuid] = {**info, "task": message.task_name}

    @hookimpl
    def qtasks_task_enqueued(self, record: TaskRecord) -> None:
        info = self._pending.pop(record.uuid, None)
        if info is not None:
            self.enqueued.append((info, time.time(), record.uuid))

    def count(self, timer_id: str | None = None) -> int:
        return sum(1 for info, _, _ in self.enqueued if timer_id in (None, info["id"]))

    def ticks(self, timer_id: str | None = None) -> list[str]:
        return [info["tick"] for info, _, _ in self.enqueued if timer_id in (None, info["id"])]


async def wait_until(condition: Callable[[], bool], timeout: float, what: str = "") -> None:
    """Wait (checking every 10 ms) until ``condition()`` holds; fail after ``timeout``."""
    try:
        with anyio.fail_after(timeout):
            while not condition():  # noqa: ASYNC110 - a plain predicate, no event
                await anyio.sleep(0.01)
    except TimeoutError:
        message = f"timed out after {timeout} s waiting for {what or condition}"
        raise AssertionError(message) from None


def key_time(key: str) -> datetime:
    """The UTC instant of an interval tick key (``...Z``)."""
    return datetime.strptime(key, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class Gate:
    """Stands between replicas and their GlobalConfig's tick claims (``GatedClaims``)."""

    async def claim(self, key: str, value: Any, make: Callable[[], Awaitable[bool]]) -> bool:
        """The answer to the claim ``key`` (stored as ``value``), which ``make()`` makes."""
        return await make()


class ClaimGate(Gate):
    """Orders two replicas' claims of one tick (claim key :attr:`key`): replica a (worker id
    :attr:`a`) makes its claim first but hears the answer only once :attr:`answer_a` is set
    (a slow response, or its event loop held up by a busy task); the other one makes its
    claim once a's is made and hears the answer at once. Other claims pass; :attr:`answered`
    counts every claim answered. The test sets :attr:`a` and :attr:`key`."""

    def __init__(self) -> None:
        self.a: str | None = None
        self.key: str | None = None
        self.answered = 0
        self.a_made = anyio.Event()
        self.b_answered = anyio.Event()
        self.answer_a = anyio.Event()

    async def claim(self, key: str, value: Any, make: Callable[[], Awaitable[bool]]) -> bool:
        try:
            if key != self.key:
                return await make()
            if claimer(value) == self.a:
                won = await make()
                self.a_made.set()
                await self.answer_a.wait()
                return won
            await self.a_made.wait()
            won = await make()
            self.b_answered.set()
            return won
        finally:
            self.answered += 1


def replica_runs(recorders: Sequence[Recorder]) -> list[tuple[datetime, int, str]]:
    """(tick, late, replica) of every run of replicas a and b, in tick order."""
    return sorted(
        (key_time(info["tick"]), info["late"], who)
        for who, recorder in zip("ab", recorders, strict=True)
        for info, _, _ in recorder.enqueued
    )


async def check_a_won_tick_heard_late_runs(
    timers: tuple[AsyncTimer, AsyncTimer],
    recorders: tuple[Recorder, Recorder],
    gate: ClaimGate,
    clock: FakeClock,
) -> None:
    """Two replicas (``timers``, ``a`` first, their apps' claims going through ``gate``) of an
    every-second timer on the frozen ``clock``. Replica a wins tick T1's claim but hears so
    once T2 is due; b lost T1 in time and ran T2 on time. T1 must run all the same, by a (it
    used to be dropped: a coalesced it into T2, whose claim b had)."""
    second = timedelta(seconds=1)

    def runs() -> list[tuple[datetime, int, str]]:
        return replica_runs(recorders)

    async with timers[0], timers[1]:
        await wait_until(lambda: len(runs()) == 1, 10, "the start's catch-up run")
        await wait_until(lambda: gate.answered == 2, 10, "both replicas' claims of it")
        t1 = runs()[0][0] + second
        handle = timers[0].timers[0]
        gate.a, gate.key = timers[0].app.worker.id, f"{handle.id}:{tick_key(handle.trigger, t1)}"
        clock.advance_to(t1.timestamp() + 0.1)
        try:
            await wait_until(gate.b_answered.is_set, 10, "b's claim of T1, lost to a's")
            clock.advance_to((t1 + second).timestamp() + 0.1)  # T2 is due; a still waits
            await wait_until(lambda: len(runs()) == 2, 10, "b's run of T2")
        finally:
            gate.answer_a.set()  # a's claim is shielded from the cancellation of a failure
        await wait_until(lambda: len(runs()) == 3, 10, "T1's run, by the replica that won it")
    assert runs()[1:] == [(t1, 0, "a"), (t1 + second, 0, "b")], runs()


class HeldUntilBack(Gate):
    """Holds chosen replicas' claims of chosen ticks before they reach the GlobalConfig, as a
    Redis client riding out an outage sends its command once the server is back, and lets each
    one through when the test says. :attr:`answers` holds every claim's answer by (claim key,
    worker id), the latest one of each."""

    def __init__(self) -> None:
        self.held: dict[tuple[str, str], anyio.Event] = {}
        self.waiting: set[tuple[str, str]] = set()
        self.answers: dict[tuple[str, str], bool] = {}
        self.answered = 0

    def hold(self, key: str, worker: str) -> None:
        """Hold ``worker``'s claim ``key`` until :meth:`let_through`."""
        self.held[key, worker] = anyio.Event()

    def let_through(self, key: str, worker: str) -> None:
        self.held.pop((key, worker)).set()

    async def claim(self, key: str, value: Any, make: Callable[[], Awaitable[bool]]) -> bool:
        which = (key, str(claimer(value)))
        gate = self.held.get(which)
        if gate is not None:
            self.waiting.add(which)
            await gate.wait()
            self.waiting.discard(which)
        won = await make()
        self.answers[which] = won
        self.answered += 1
        return won


async def check_an_outage_that_emptied_the_claims_gives_one_run(
    timers: tuple[AsyncTimer, AsyncTimer],
    recorders: tuple[Recorder, Recorder],
    gate: HeldUntilBack,
    clock: FakeClock,
    forget: Callable[[], Awaitable[None]],
    first: Literal["a", "b"],
) -> None:
    """Two replicas, a and b (``timers``, their apps' claims going through ``gate``), of an
    every-second timer on the frozen ``clock``. a wins tick T0 and runs it; b's claim of T0 is
    on its way when the GlobalConfig dies (it reaches the server once it is back), and so is
    a's claim of T1 a second later. The server comes back at T3.5, empty (``forget()`` drops
    every claim): both held claims win, each heard once T2 and T3 are due, and both replicas
    fold their won tick into T3. ``first``: whose held claim gets through first, and so claims
    T3 first. Before, the other one, losing T3, ran its won tick on its own: T1 (``late: 0``)
    beside the catch-up, or T0 a second time. Now its run of T3 is the outage's one run;
    ``late`` counts T0 as well when b's claim of T3 came first (b cannot tell that T0 ran
    before the outage: the server forgot that claim)."""
    second = timedelta(seconds=1)
    a, b = (timer.app.worker.id for timer in timers)
    handle = timers[0].timers[0]

    def claim(tick: datetime) -> str:
        return f"{handle.id}:{tick_key(handle.trigger, tick)}"

    def runs() -> list[tuple[datetime, int, str]]:
        return replica_runs(recorders)

    async with timers[0], timers[1]:
        await wait_until(lambda: len(runs()) == 1, 10, "the start's catch-up run")
        await wait_until(lambda: gate.answered == 2, 10, "both replicas' claims of it")
        t0 = runs()[0][0] + second
        t1, t3, t4 = t0 + second, t0 + 3 * second, t0 + 4 * second
        gate.hold(claim(t0), b)
        gate.hold(claim(t1), a)
        try:
            clock.advance_to(t0.timestamp() + 0.1)
            await wait_until(lambda: len(runs()) == 2, 10, "a's run of T0")
            await wait_until(lambda: (claim(t0), b) in gate.waiting, 10, "b's claim of T0")
            # The server dies now, b's claim of T0 on its way.
            clock.advance_to(t1.timestamp() + 0.1)
            await wait_until(lambda: (claim(t1), a) in gate.waiting, 10, "a's claim of T1")
            clock.advance_to(t3.timestamp() + 0.5)  # T2 and T3 are due: the server is back
            await forget()  # empty
            order = [(claim(t0), b), (claim(t1), a)]
            for key, worker in order if first == "b" else order[::-1]:
                gate.let_through(key, worker)
                fold = (claim(t3), worker)
                await wait_until(partial(operator.contains, gate.answers, fold), 10, "T3's claim")
        finally:
            for key, worker in list(gate.held):  # claims are shielded from a failure's cancel
                gate.let_through(key, worker)
        # A replica claims T4 once its tick of the outage is done: by then it has run or not.
        clock.advance_to(t4.timestamp() + 0.1)
        await wait_until(lambda: any(run[0] == t4 for run in runs()), 10, "T4's run")
        await wait_until(
            lambda: {(claim(t4), a), (claim(t4), b)} <= gate.answers.keys(), 10, "T4's claims"
        )
    counted = 3 if first == "b" else 2
    assert [(tick, late) for tick, late, _ in runs()[1:]] == [(t0, 0), (t3, counted), (t4, 0)], (
        runs()
    )
    assert runs()[2][2] == first, runs()
