"""Shared test helpers: record what timers enqueue, wait on conditions with deadlines, hold up a
replica's answer to a tick's claim."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

from qtasks import hookimpl
from qtasks.messages import Message
from qtasks.record import TaskRecord
from qtasks_testing.clock import FakeClock
from qtasks_timer import AsyncTimer
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


class ClaimGate:
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

    async def claim(self, key: str, worker: Any, make: Callable[[], Awaitable[bool]]) -> bool:
        """The answer to ``worker``'s claim ``key``, which ``make()`` makes."""
        try:
            if key != self.key:
                return await make()
            if worker == self.a:
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
        """(tick, late, replica) of every run, in tick order."""
        return sorted(
            (key_time(info["tick"]), info["late"], who)
            for who, recorder in zip("ab", recorders, strict=True)
            for info, _, _ in recorder.enqueued
        )

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
