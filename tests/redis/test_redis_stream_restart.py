"""A generator task's stream when its worker is killed with SIGKILL mid-stream (review r19
#7), with real processes on Redis: the worker that runs it again starts its generator over,
and a client following the stream is told so by a ``StepsRestarted`` marker between the killed
run's steps and the new run's, each step once (docs/generators.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from redis_procs import Worker, wait_workers
from redis_worker_app import build

from qtasks import StepsRestarted, TaskStatus

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

STEPS = 6


async def test_kill9_mid_stream_marks_the_restart_and_the_next_worker_finishes(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    app = build(redis_url, prefix)
    await app.start()
    a = Worker(redis_url, prefix, tmp_path, lease=1.0, concurrency=1, name="a")
    b: Worker | None = None
    seen: list[Any] = []
    two_seen = anyio.Event()
    try:
        await wait_workers(app, 1, a)
        task = await app.add_task("paced_steps", STEPS, 0.2)

        async def follow() -> None:
            async for item in task.stream(timeout=60):
                seen.append(item)
                if len(seen) == 2:
                    two_seen.set()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await two_seen.wait()
                a.kill()  # mid-stream: steps 0 and 1 at least are stored, 5 at most
                b = Worker(redis_url, prefix, tmp_path, lease=1.0, concurrency=1, name="b")
        final = await app.wait(task.uuid, timeout=5)
    finally:
        a.stop()
        if b is not None:
            assert b.stop() == 0, b.output()
        await app.aclose()
    assert b is not None
    marks = [i for i, item in enumerate(seen) if isinstance(item, StepsRestarted)]
    assert len(marks) == 1, f"one restart marker expected, between the runs: {seen}"
    assert seen[marks[0]] == StepsRestarted(2), seen
    killed, rerun = seen[: marks[0]], seen[marks[0] + 1 :]
    assert 2 <= len(killed) < STEPS, seen
    assert killed == [{"step": i, "pid": a.pid} for i in range(len(killed))], seen
    assert rerun == [{"step": i, "pid": b.pid} for i in range(STEPS)], seen
    assert (final.status, final.returning) == (TaskStatus.SUCCESS, rerun)
    assert final.steps == len(killed) + STEPS
