"""A worker told to stop while its Redis server is stalled (SIGSTOPped: it accepts bytes and
answers nothing, as a network black hole does) stops within its shutdown grace plus a bounded
margin, or at once on a second signal, instead of waiting out each call's retries (up to
``(redis_retries + 1) x redis_socket_timeout``, minutes). What it could not write stays leased
in Redis: once the server runs again, a fresh worker gets those tasks after their lease and
completes them (review r16 #4)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager

import anyio
import pytest
from fault_fixtures import FaultRig, outcome, wait_until
from redis_procs import Worker

from qtasks import TaskStatus, stopping
from qtasks.config import QueueConfig
from qtasks_redis import RedisBroker

pytestmark = pytest.mark.anyio

LEASE = 3.0
MARGIN = 3.0
"""What the test allows past the bound the worker keeps (its stop margin, then the process's
own exit): the bug it guards against took minutes."""

SHORT, LONG = 1.0, 8.0
"""Task lengths: the short ones end during the stall (their settle cannot be written), the
long ones are still running at the grace's end (their hand-back cannot be written)."""


@contextmanager
def stalled(rig: FaultRig) -> Iterator[None]:
    """The redis-server stopped (SIGSTOP) for the block, running again after it."""
    assert rig.server.proc is not None
    pid = rig.server.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def exit_within(worker: Worker, seconds: float) -> float:
    """The seconds ``worker`` took to exit, failing the test if it is still running after
    ``seconds`` (it is killed then)."""
    started = time.monotonic()
    try:
        await anyio.to_thread.run_sync(worker.proc.wait, seconds)
    except subprocess.TimeoutExpired:
        worker.kill()
        pytest.fail(
            f"worker still running {seconds:g} s after SIGTERM with Redis stalled:\n"
            f"{worker.output()}"
        )
    return time.monotonic() - started


async def busy_worker(rig: FaultRig, grace: float) -> tuple[Worker, list[str]]:
    """A worker of 4 runners with 8 tasks: 2 short and 2 long ones running, 4 more waiting in
    its prefetch; the tasks' uuids once all four runners are busy."""
    worker = rig.worker(concurrency=4, lease=LEASE, direct=True, shutdown_grace=grace)
    async with rig.producer() as app:
        await rig.wait_serving(app, worker)
        lengths = [SHORT, SHORT, LONG, LONG, SHORT, SHORT, SHORT, SHORT]
        tasks = [await app.add_task("slow", i, s) for i, s in enumerate(lengths, 1)]
        await wait_until(
            lambda: len(rig.runs("start")) >= 4, timeout=20, what="4 running", workers=[worker]
        )
    return worker, [task.uuid for task in tasks]


async def completed_by_a_fresh_worker(rig: FaultRig, uuids: list[str]) -> None:
    """With Redis running again, a new worker completes every task (after the leases of the
    ones the stopped worker held): none is lost."""
    fresh = rig.worker(concurrency=8, lease=LEASE, direct=True, name="fresh")
    async with rig.producer() as app:
        records = await outcome(app, uuids, 60)
        assert [r.status if r else None for r in records] == [TaskStatus.SUCCESS] * len(uuids), (
            fresh.output()
        )
        stats = await app.broker.stats()
    assert set(rig.runs("end")) == set(range(1, len(uuids) + 1))
    assert stats.in_flight == 0 and not any(stats.ready_by_priority.values()), stats
    assert not fresh.problems()


async def test_sigterm_with_redis_stalled_stops_within_the_grace(rig: FaultRig) -> None:
    grace = 2.0
    worker, uuids = await busy_worker(rig, grace)
    with stalled(rig):
        worker.proc.send_signal(signal.SIGTERM)
        took = await exit_within(worker, grace + MARGIN)
    assert worker.proc.returncode == 0, worker.output()
    log = worker.output()
    assert "left to their leases" in log, log  # says what it gave up on
    assert not worker.problems(), log
    assert took >= grace - 0.5, (took, log)  # the running tasks got their grace
    await completed_by_a_fresh_worker(rig, uuids)


async def test_a_second_sigterm_with_redis_stalled_stops_at_once(
    rig: FaultRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QT_LOG_LEVEL", "INFO")  # to see the first signal answered
    worker, uuids = await busy_worker(rig, grace=60.0)
    with stalled(rig):
        worker.proc.send_signal(signal.SIGTERM)
        await wait_until(
            lambda: "received SIGTERM, stopping" in worker.output(),
            timeout=10,
            what="the first SIGTERM answered",
            workers=[worker],
        )
        worker.proc.send_signal(signal.SIGTERM)
        await exit_within(worker, MARGIN)
    assert worker.proc.returncode == 0, worker.output()
    assert "left to their leases" in worker.output(), worker.output()
    assert not worker.problems(), worker.output()
    await completed_by_a_fresh_worker(rig, uuids)


@pytest.mark.parametrize("fast_lane", [False, True], ids=["redis-py", "lane"])
async def test_a_claim_the_stop_s_deadline_cuts_ends_with_the_stop(
    rig: FaultRig, fast_lane: bool
) -> None:
    """A claim sent as the stop began, which the stalled server never answered, was cut by
    the stop's deadline inside its shield; the consumer then read the reply it never got
    (UnboundLocalError, seen once under load: the worker exited 1 with a traceback). Now the
    claim ends with the stop's cancellation, what it may have leased left to the lease."""
    broker = RedisBroker(rig.direct_url, prefix=rig.prefix, queue="cut")
    clock = stopping.StopClock()
    async with AsyncExitStack() as stack:
        await broker.start(stack, QueueConfig(extra={"redis_fast_lane": fast_lane}))
        async with stopping.serving(clock), broker.consume(prefetch=1) as deliveries:
            started = anyio.current_time()
            with stalled(rig), anyio.fail_after(10), anyio.CancelScope() as stop:
                stop.cancel()  # the worker's receiving, cancelled as its stop begins
                clock.start(0.0)  # the stop's deadline: STOP_MARGIN from now
                await deliveries.__anext__()
            assert stop.cancelled_caught
            took = anyio.current_time() - started
            assert clock.gave_up["a claim's reply"] == 1, clock.gave_up
            assert stopping.STOP_MARGIN <= took < stopping.STOP_MARGIN + 3, took
