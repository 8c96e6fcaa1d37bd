"""A cancel made in another process while the task runs on a Redis worker (subprocess).

The worker's lease is a minute, so its lease renewal (every 20 s) is not what tells it: the
storage's cancel feed is. Whatever the task's code does, the record stays ``cancel`` and the
message is acked.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from redis_procs import Worker, counts, settled
from redis_worker_app import build

from qtasks import AsyncQueueTasks, TaskStatus
from qtasks.components import CancelFeed
from qtasks_redis import RedisStorage

pytestmark = [pytest.mark.anyio]


async def started(worker: Worker, i: int) -> None:
    with anyio.fail_after(15):
        while not counts(worker.ledger, "start")[i]:
            assert worker.proc.poll() is None, worker.output()
            await anyio.sleep(0.02)


async def ledger_has(worker: Worker, event: str, i: int, seconds: float) -> None:
    with anyio.fail_after(seconds):
        while not counts(worker.ledger, event)[i]:  # noqa: ASYNC110 - the ledger is a file
            await anyio.sleep(0.02)


async def cancel_while_running(
    app: AsyncQueueTasks, worker: Worker, name: str, i: int
) -> tuple[str, list[TaskStatus]]:
    task = await app.add_task(name, i, 2.0)
    seen: list[TaskStatus] = []

    async def wait() -> None:
        seen.append((await app.wait(task.uuid, timeout=15)).status)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await started(worker, i)
        cancelled = await app.cancel(task.uuid, "from another process")
        assert cancelled is not None and cancelled.status is TaskStatus.CANCEL
    return task.uuid, seen


async def test_redis_storage_is_a_cancel_feed() -> None:
    assert isinstance(RedisStorage(), CancelFeed)


@pytest.mark.parametrize("name", ["cancellable", "blocking_slow", "stubborn"])
async def test_cancel_from_another_process_holds(
    redis_url: str, prefix: str, tmp_path: Path, name: str
) -> None:
    app = build(redis_url, prefix)
    await app.start()
    worker = Worker(redis_url, prefix, tmp_path, lease=60.0, concurrency=2)
    try:
        uuid, seen = await cancel_while_running(app, worker, name, 1)
        assert seen == [TaskStatus.CANCEL]
        if name == "cancellable":  # told at once: cancelled at its next await
            await ledger_has(worker, "cancelled", 1, 3)
            assert not counts(worker.ledger, "end")[1]
        else:  # cannot be interrupted: runs to its end, and its result is dropped
            await ledger_has(worker, "end", 1, 10)
        stats = await settled(app)
        assert stats.in_flight == 0, "the message was not acked"
        stored = await app.get(uuid)
        assert stored is not None
        assert (stored.status, stored.returning) == (TaskStatus.CANCEL, None)
        assert stored.cancel_reason == "from another process"
        # The worker serves on, and a second run of the same name succeeds.
        done = await app.add_task("noop", 21, timeout=10)
        assert done.returning == 42
        assert "Traceback" not in worker.output()
    finally:
        assert worker.stop() == 0, worker.output()
        await app.aclose()
