"""The prefetch a worker holds beyond its free slots, adapted to its runs (qtasks.hold)."""

from __future__ import annotations

import anyio
import pytest
from prefetch_scenarios import default_prefetch_leaves_waiting_tasks_to_a_new_worker

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.hold import LONG_RUN, Hold
from qtasks.worker import QueueWorker

pytestmark = pytest.mark.anyio


def test_nothing_is_held_until_a_run_ended_then_the_prefetch_while_runs_are_short() -> None:
    hold = Hold(10, adaptive=True)
    assert hold.now == 0
    for _ in range(3):
        hold.ran(0.001)
    assert hold.now == 10


def test_long_runs_stop_the_holding_and_short_ones_bring_it_back() -> None:
    hold = Hold(10, adaptive=True)
    hold.ran(0.001)
    assert hold.now == 10
    hold.ran(30.0)  # one long run moves the average past LONG_RUN
    assert hold.now == 0
    runs = 0
    while hold.now == 0:
        hold.ran(0.001)
        runs += 1
    assert 10 < runs < 40  # the average forgets a long run over some dozen short ones
    assert hold.average is not None and hold.average < LONG_RUN


def test_an_explicit_prefetch_is_kept_whatever_the_runs() -> None:
    hold = Hold(3, adaptive=False)
    assert hold.now == 3
    hold.ran(60.0)
    assert hold.now == 3


def _app(worker: QueueWorker) -> AsyncQueueTasks:
    app = AsyncQueueTasks(
        config=QueueConfig(max_tasks_process=4, plugins_disabled=["*"]), worker=worker
    )

    @app.task
    async def quick() -> None:
        pass

    @app.task
    async def slow() -> None:
        await anyio.sleep(LONG_RUN * 6)  # the average of one quick run and this one is long

    return app


async def test_a_worker_holds_its_prefetch_once_its_runs_are_seen_short() -> None:
    worker = QueueWorker()
    app = _app(worker)
    async with app:
        assert worker._hold.now == 0  # no run ended yet
        for _ in range(3):
            await app.add_task("quick", timeout=5)
    # Read once the worker stopped: each run's length is noted after it is settled.
    assert worker._hold.now == app.config.prefetch_for(4)


async def test_a_worker_of_long_runs_holds_nothing_beyond_its_free_slots() -> None:
    worker = QueueWorker()
    app = _app(worker)
    async with app:
        await app.add_task("quick", timeout=5)
        await app.add_task("slow", timeout=5)
    assert worker._hold.now == 0
    assert worker._hold.average is not None and worker._hold.average > LONG_RUN


async def test_an_explicit_prefetch_is_held_from_the_start() -> None:
    worker = QueueWorker()
    app = AsyncQueueTasks(config=QueueConfig(prefetch=2, plugins_disabled=["*"]), worker=worker)

    @app.task
    async def quick() -> None:
        pass

    async with app:
        assert worker._hold.now == 2


async def test_in_memory_busy_workers_leave_waiting_tasks_to_a_new_one() -> None:
    """The in-memory broker takes one message per pull: the worker's own hold decides."""
    from qtasks.memory import MemoryBroker, MemoryGlobalConfig, MemoryStorage

    broker, storage, global_config = MemoryBroker(), MemoryStorage(), MemoryGlobalConfig()
    await default_prefetch_leaves_waiting_tasks_to_a_new_worker(
        lambda: {"broker": broker, "storage": storage, "global_config": global_config}
    )
