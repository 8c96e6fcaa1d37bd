"""A delivery a Redis consumer hands to its worker may have outlived its lease before the
worker renews it: a claim takes up to ``prefetch`` messages and the worker takes them one at a
time as it has room (with tasks longer than the lease, those left with the consumer wait past
their lease, unrenewed), or the claim's reply is read after a stall of the loop. Another worker
may have claimed it meanwhile. Each must still run once: the consumer renews one whose lease
(counted from when its claim was sent) is a third gone before handing it out, and drops it
when another worker holds it now."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis_procs import Worker, counts, settled
from redis_procs import ledger as ledger_lines
from redis_worker_app import build

from qtasks import TaskStatus
from qtasks_redis import RedisBroker
from qtasks_redis.lane import Lane

pytestmark = pytest.mark.anyio


async def test_a_message_left_with_a_busy_workers_consumer_runs_once(
    redis_url: str, prefix: str
) -> None:
    lease = 0.6
    # One runner and a prefetch of 2: room for 3 deliveries, claimed 2 at a time, so the
    # second claim leaves its second message with the consumer, not with the worker.
    busy, idle = (
        build(redis_url, prefix, lease=lease, concurrency=1, prefetch=2) for _ in range(2)
    )
    gate, late = anyio.Event(), anyio.Event()
    runs: Counter[int] = Counter()
    for app in (busy, idle):

        @app.task(name="held")
        async def held(i: int) -> int:
            runs[i] += 1
            await (late if i == 3 else gate).wait()
            return i

    await busy.start()
    try:
        tasks = [await busy.add_task("held", i) for i in range(4)]
        async with busy:
            with anyio.fail_after(5):
                while busy.worker.waiting < 2 or not runs:  # noqa: ASYNC110 - no event for it
                    await anyio.sleep(0.01)
            async with idle:
                # The message left with the busy worker's consumer outlives its lease: the
                # idle worker claims it and starts it.
                with anyio.fail_after(10):
                    while not runs[3]:  # noqa: ASYNC110 - no event for it
                        await anyio.sleep(0.01)
                gate.set()
                for i, task in enumerate(tasks[:3]):
                    done = await busy.wait(task.uuid, timeout=10)
                    assert (done.status, done.returning) == (TaskStatus.SUCCESS, i)
                # The busy worker has room again while the idle one still runs the message.
                worker = busy.worker
                with anyio.fail_after(10):
                    while (worker.running or worker.waiting) and runs[3] < 2:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                late.set()
                done = await busy.wait(tasks[3].uuid, timeout=10)
                assert (done.status, done.returning) == (TaskStatus.SUCCESS, 3)
        # Before, the busy worker ran it too once it had room: its consumer handed it out.
        assert runs == {0: 1, 1: 1, 2: 1, 3: 1}
    finally:
        await busy.aclose()
        await idle.aclose()


@pytest.mark.slow
async def test_a_claim_read_after_its_lease_ran_out_does_not_run_again(
    redis_url: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose loop stalls between its claim's run and the reading of its reply (a
    task blocking the loop, a pause of the process) gets a delivery whose lease ran out
    meanwhile: another worker holds it now. Its lease is counted from when the claim was
    sent, so it is renewed before the worker gets it, and dropped. Before, it counted from
    the reply's reading, looked fresh, and was begun and run here too: that begin took the
    record's fence from the worker running it, whose result was then refused, not acked,
    and the task ran a third time."""
    ledger = tmp_path / "ledger.txt"
    app = build(redis_url, prefix, lease=1.0, concurrency=1, prefetch=1, ledger=str(ledger))
    await app.start()
    broker = app.broker
    assert isinstance(broker, RedisBroker)
    lane = broker._shared.fast()
    assert isinstance(lane, Lane)
    real = lane.block_then_script
    idle = anyio.Event()
    other: list[Worker] = []

    async def stalled(*args: Any, **kwargs: Any) -> Any:
        idle.set()
        reply = await real(*args, **kwargs)
        if len(reply) > 1 and not other:  # it claimed the task: the loop stalls now
            other.append(Worker(redis_url, prefix, tmp_path, lease=1.0, concurrency=1))
            deadline = time.monotonic() + 20
            while not counts(ledger, "start") and time.monotonic() < deadline:
                time.sleep(0.05)  # noqa: ASYNC251 - on purpose: this worker's loop is stalled
        return reply

    monkeypatch.setattr(lane, "block_then_script", stalled)
    try:
        async with app:
            with anyio.fail_after(10):
                await idle.wait()
            task = await app.add_task("slow", 1, 3.0)
            done = await app.wait(task.uuid, timeout=30)
            assert (done.status, done.returning) == (TaskStatus.SUCCESS, 1)
            stats = await settled(app)
            assert (stats.in_flight, stats.ready_by_priority, stats.dead_letters) == (0, {}, 0)
        assert [pid for event, _, pid in ledger_lines(ledger) if event == "start"] == [other[0].pid]
    finally:
        for worker in other:
            assert worker.stop() == 0, worker.output()
        await app.aclose()


@pytest.mark.slow
async def test_a_waiting_message_whose_lease_ran_out_in_a_stall_is_not_begun_here(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A task blocks its worker's loop past the lease while a message waits in that worker;
    another worker claims the message and runs it. When the loop moves again, the blocked
    worker's runner begins the waiting message before a renewal pass tells it is lost: the
    begin must not take the record from the worker running it (whose result would then be
    refused and not acked, the task running a third time), nor run it here."""
    ledger = tmp_path / "ledger.txt"
    app = build(redis_url, prefix, lease=1.0, concurrency=1, prefetch=1, ledger=str(ledger))
    other: list[Worker] = []
    hogging = anyio.Event()

    @app.task(name="hog")
    async def hog() -> None:
        hogging.set()
        worker = app.worker
        while not worker.waiting:  # noqa: ASYNC110 - the message that waits here meanwhile
            await anyio.sleep(0.01)
        other.append(Worker(redis_url, prefix, tmp_path, lease=1.0, concurrency=1))
        deadline = time.monotonic() + 20
        while not counts(ledger, "start") and time.monotonic() < deadline:
            time.sleep(0.05)  # noqa: ASYNC251 - on purpose: this worker's loop is stalled

    await app.start()
    try:
        async with app:
            await app.add_task("hog")
            with anyio.fail_after(10):
                await hogging.wait()
            task = await app.add_task("slow", 1, 3.0, priority=-1)  # the other takes it first
            done = await app.wait(task.uuid, timeout=30)
            assert (done.status, done.returning) == (TaskStatus.SUCCESS, 1)
        assert [pid for event, _, pid in ledger_lines(ledger) if event == "start"] == [other[0].pid]
    finally:
        for worker in other:
            assert worker.stop() == 0, worker.output()
        await app.aclose()
