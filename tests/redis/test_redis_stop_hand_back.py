"""A graceful stop hands its messages back without wiping their delivery count, on real worker
processes: a message a worker held but never began is not charged for that delivery, and
keeps the deliveries lost before it (a worker it killed); a run the stop interrupted counts.
Before, both were requeued with the count reset to 0, so a message that kept killing or
stopping its workers could outlive ``max_deliveries`` for good."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from redis_procs import Worker, wait_workers
from redis_worker_app import build

from qtasks import AsyncQueueTasks

pytestmark = pytest.mark.anyio

CONFIG: dict[str, object] = {"max_deliveries": 5}
"""Five deliveries: a message on its second is no suspect (claimed beside others)."""


async def running_and_waiting(app: AsyncQueueTasks, worker: Worker) -> None:
    """Until ``worker``'s heartbeat says it runs one task and holds one it has not begun."""
    with anyio.fail_after(20):
        while True:
            beats = [
                w for w in (await app.global_config.workers()).values() if w["pid"] == worker.pid
            ]
            if beats and (beats[0]["running"], beats[0]["waiting"]) == (1, 1):
                return
            assert worker.proc.poll() is None, worker.output()
            await anyio.sleep(0.05)  # a remote heartbeat: no event to wait on


async def test_a_graceful_stop_keeps_the_deliveries_lost_before_it(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    app = build(redis_url, prefix, lease=1.0, concurrency=1, max_deliveries=5)
    await app.start()
    workers: list[Worker] = []
    try:
        killer = Worker(
            redis_url, prefix, tmp_path, lease=1.0, concurrency=1, name="w1", config=CONFIG
        )
        workers.append(killer)
        await wait_workers(app, 1, killer)
        poison = await app.add_task("suicide", 1)  # kills w1: its delivery is lost
        with anyio.fail_after(10):
            while killer.proc.poll() is None:  # noqa: ASYNC110 - a process, no event
                await anyio.sleep(0.05)
        # Claimed first by the next worker (priority), which then holds the poison unbegun.
        slow = await app.add_task("slow", 2, 60.0, priority=-5)
        stopped = Worker(
            redis_url, prefix, tmp_path, lease=1.0, concurrency=1, name="w2", config=CONFIG
        )
        workers.append(stopped)
        await running_and_waiting(app, stopped)
        assert stopped.stop() == 0, stopped.output()  # SIGTERM: slow interrupted, handed back
        attempts: dict[str, int] = {}
        async with app.broker.consume(prefetch=2) as deliveries:
            with anyio.fail_after(5):
                while len(attempts) < 2:
                    delivery = await anext(deliveries)
                    attempts[delivery.id] = delivery.attempt
                    assert await delivery.ack()
        # The poison's delivery to w1 still counts, w2's (never begun) does not; slow's
        # interrupted run counts.
        assert attempts == {poison.uuid: 2, slow.uuid: 2}
    finally:
        for worker in workers:
            worker.stop()
        await app.aclose()
