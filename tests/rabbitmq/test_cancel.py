"""A cancel made in another process while the task runs: RabbitMQ broker, Redis storage, the
worker a subprocess. The storage's cancel feed tells the worker (its lease is a minute), and the
task's result never replaces the cancel."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from qtasks import AsyncQueueTasks, TaskStatus
from qtasks_rabbitmq import RabbitMQBroker
from qtasks_redis import RedisStorage

from .conftest import URL, BrokerFactory, poll

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]

WORKER = Path(__file__).with_name("worker_app.py")


def lines(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


async def has_line(path: Path, tag: str, timeout: float) -> None:
    async def found() -> bool | None:
        return True if tag in lines(path) else None

    await poll(found, timeout)


@pytest.fixture
def worker(
    queue_name: str, tmp_path: Path, make_broker: BrokerFactory, redis_url: str, prefix: str
) -> Iterator[None]:
    """The worker subprocess. make_broker is requested so that the queue's topology is
    deleted after the test."""
    root = Path(__file__).parents[2]
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), queue_name, str(tmp_path), redis_url, prefix],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        },
        cwd=root,
        stderr=subprocess.PIPE,
    )
    try:
        yield
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
        assert b"Traceback" not in err, err.decode()


@pytest.fixture
async def setup(
    worker: None, queue_name: str, redis_url: str, prefix: str
) -> AsyncIterator[AsyncQueueTasks]:
    """A producer (it does not serve) sharing the worker's queue and storage."""
    app = AsyncQueueTasks(
        broker=RabbitMQBroker(URL, queue=queue_name), storage=RedisStorage(redis_url, prefix=prefix)
    )
    await app.start()
    try:
        yield app
    finally:
        await app.aclose()


@pytest.mark.parametrize("name", ["cancellable", "slow"])
async def test_cancel_from_another_process_holds(
    setup: AsyncQueueTasks, tmp_path: Path, name: str
) -> None:
    app = setup
    task = await app.add_task(name, "t1", 2.0)
    seen: list[TaskStatus] = []

    async def wait() -> None:
        seen.append((await app.wait(task.uuid, timeout=15)).status)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await has_line(tmp_path / "started", "t1", 20)
        cancelled = await app.cancel(task.uuid, "from another process")
        assert cancelled is not None and cancelled.status is TaskStatus.CANCEL
    assert seen == [TaskStatus.CANCEL]
    if name == "cancellable":  # told at once: cancelled at its next await
        await has_line(tmp_path / "cancelled", "t1", 3)
        assert "t1" not in lines(tmp_path / "done")
    else:  # a sync task cannot be interrupted: it runs to its end, its result is dropped
        await has_line(tmp_path / "done", "t1", 10)
    # The worker acked the message: a task added now runs, and nothing else is queued.
    done = await app.add_task("record", 7, timeout=15)
    assert done.status is TaskStatus.SUCCESS
    stored = await app.get(task.uuid)
    assert stored is not None
    assert (stored.status, stored.returning) == (TaskStatus.CANCEL, None)
    assert (await app.broker.stats()).in_flight == 0
