"""Concurrency-key backlogs, shared by the in-memory and Redis tests: the slots stay busy while
messages wait for them, and waiters are served about first come, first served."""

from __future__ import annotations

import time

import anyio
from flow_windows import max_overlap

from qtasks import AsyncQueueTasks, TaskStatus


async def a_backlog_keeps_every_slot_busy(app: AsyncQueueTasks) -> None:
    """24 runs of 0.2 s at ``max_concurrency=2``: 2.4 s if a freed slot never sits idle.
    Waiters deferred as a herd (all given the same delay, back together) took about 6 s."""
    spans: list[tuple[float, float]] = []

    @app.task(concurrency_key="key", max_concurrency=2)
    async def backlog(key: str, i: int) -> int:
        start = time.monotonic()
        await anyio.sleep(0.2)
        spans.append((start, time.monotonic()))
        return i

    async with app:
        began = time.monotonic()
        tasks = [await backlog.add_task("k", i) for i in range(24)]
        records = [await app.wait(t.uuid, timeout=30) for t in tasks]
        took = time.monotonic() - began
    assert [r.status for r in records] == [TaskStatus.SUCCESS] * 24
    assert max_overlap(spans) == 2  # reached, never exceeded
    assert took < 4.8, f"24 x 0.2 s at 2 at once took {took:.2f} s (2.4 s when never idle)"


async def a_burst_is_not_starved_by_steady_traffic(app: AsyncQueueTasks) -> None:
    """20 runs of 0.05 s added at once at ``max_concurrency=1``, then one more every 75 ms for
    6 s (two thirds of the key's capacity): the burst is served within those 6 s (about 3 s,
    first come, first served). Waiters that lost every free slot to the new arrivals started
    only when the traffic stopped."""
    started: dict[int, float] = {}

    @app.task(concurrency_key="key", max_concurrency=1)
    async def steady(key: str, i: int) -> int:
        started[i] = time.monotonic()
        await anyio.sleep(0.05)
        return i

    async with app:
        tasks = [await steady.add_task("k", i) for i in range(20)]
        stream_ends = time.monotonic() + 6
        i = 20
        while time.monotonic() < stream_ends:
            tasks.append(await steady.add_task("k", i))
            i += 1
            await anyio.sleep(0.075)  # the arrivals' pace, not a wait for a result
        burst_done = max((started.get(j, float("inf")) for j in range(20)), default=0.0)
        records = [await app.wait(t.uuid, timeout=60) for t in tasks]
    assert {r.status for r in records} == {TaskStatus.SUCCESS}
    assert burst_done < stream_ends, f"the burst's last start came {burst_done - stream_ends:.1f}"


async def a_freed_slot_goes_to_a_waiter_at_once(app: AsyncQueueTasks) -> None:
    """One run of 1 s, then 12 of 0.05 s, at ``max_concurrency=1``: the long run makes the
    key's mean hold time long, so the waiters' delays are much longer than the short runs
    that follow; only a waiter brought forward when the slot frees keeps it busy (about 1.6 s
    in all; waiting out those delays took 3.5 to 4 s)."""
    spans: list[tuple[float, float]] = []

    @app.task(concurrency_key="key", max_concurrency=1)
    async def uneven(key: str, seconds: float) -> None:
        start = time.monotonic()
        await anyio.sleep(seconds)
        spans.append((start, time.monotonic()))

    async with app:
        began = time.monotonic()
        tasks = [await uneven.add_task("k", 1.0)]
        tasks += [await uneven.add_task("k", 0.05) for _ in range(12)]
        records = [await app.wait(t.uuid, timeout=30) for t in tasks]
        took = time.monotonic() - began
    assert {r.status for r in records} == {TaskStatus.SUCCESS}
    assert max_overlap(spans) == 1
    assert took < 2.8, f"1 s then 12 x 0.05 s one at a time took {took:.2f} s (1.6 s at best)"
