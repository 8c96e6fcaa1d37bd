"""A Redis claim takes up to ``prefetch`` messages and the worker takes them one at a time as
it has room: with tasks longer than the lease, those left with the consumer wait longer than
their lease, unrenewed, and another worker may claim them meanwhile. Each must still run
once: the consumer renews one that waited before handing it out, and drops it when another
worker holds it now."""

from __future__ import annotations

from collections import Counter

import anyio
import pytest
from redis_worker_app import build

from qtasks import TaskStatus

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
