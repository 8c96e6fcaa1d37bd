"""Reliability plan L2 on RabbitMQ: a load run without faults loses no task and runs none twice.

Scaled down for the 2-core machine the suite runs on: 3,000 no-op tasks (the plan asks for
100,000), enqueued one by one by 20 concurrent producer loops with publisher confirms on (the
default: each ``add_task`` returns once RabbitMQ confirmed it), on a classic and on a quorum
queue (the plan's), served by 2 worker processes (concurrency 10, prefetch 20) that keep the
records in Redis. A run takes 10 to 20 s here, 4 to 12 s of it the load."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

from qtasks import AsyncQueueTasks
from qtasks.record import TaskStatus
from qtasks_rabbitmq import RabbitMQBroker
from qtasks_rabbitmq.topology import QueueType
from qtasks_redis import RedisStorage

from .conftest import URL, BrokerFactory, drained, poll, problems
from .test_end_to_end import Workers, consumers_of, lines, workers

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.reliability]

__all__ = ["workers"]  # the fixture, used by name

TASKS = 3_000
PRODUCERS = 20


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_load_run_without_faults_loses_nothing_and_runs_nothing_twice(
    workers: Workers,
    queue_name: str,
    tmp_path: Path,
    make_broker: BrokerFactory,
    redis_url: str,
    prefix: str,
    queue_type: QueueType,
) -> None:
    """Every confirmed enqueue runs exactly once: lost = 0 and duplicates = 0, counted from
    the ``started`` notes (a run that began twice is a duplicate even if it ended once). Any
    duplicate is a bug here, as no fault makes a message come back. Both workers take a
    share and are still serving afterwards, their logs hold no warning, error or traceback, and the
    queue ends with nothing ready, nothing unacked and no dead letter."""
    broker = await make_broker(
        queue_type=queue_type
    )  # declares the queue; the fixture deletes it afterwards
    workers.log = tmp_path / "workers.log"
    env = {"WORKER_CONCURRENCY": "10", "WORKER_PREFETCH": "20", "WORKER_QUEUE_TYPE": queue_type}
    procs = [workers.start(redis_url, prefix, **env) for _ in range(2)]

    async def both_consuming() -> bool:
        return await consumers_of(queue_name) == len(procs)

    await poll(both_consuming, 30)  # so that neither takes the whole load before the other
    app = AsyncQueueTasks(
        broker=RabbitMQBroker(URL, queue=queue_name, queue_type=queue_type),
        storage=RedisStorage(redis_url, prefix=prefix),
    )
    uuids: list[str] = []
    begun = time.monotonic()
    try:

        async def produce(first: int) -> None:
            for i in range(first, TASKS, PRODUCERS):
                uuids.append((await app.add_task("cancellable", str(i), 0.0)).uuid)

        async with anyio.create_task_group() as tg:
            for first in range(PRODUCERS):
                tg.start_soon(produce, first)
        enqueued = time.monotonic() - begun

        async def all_done() -> bool:
            return {line.split()[0] for line in lines(tmp_path / "done")} == {
                str(i) for i in range(TASKS)
            }

        await poll(all_done, 60, every=0.2)
        records = [await app.get(uuid) for uuid in uuids]
        statuses = Counter(None if r is None else r.status for r in records)
    finally:
        await app.aclose()

    stats = await drained(broker, 30)
    took = time.monotonic() - begun
    print(f"{TASKS} tasks: enqueued in {enqueued:.1f} s, all run and acked in {took:.1f} s")
    assert stats.dead_letters == 0
    started = Counter(line.split()[0] for line in lines(tmp_path / "started"))
    done = Counter(line.split()[0] for line in lines(tmp_path / "done"))
    assert {tag: n for tag, n in started.items() if n > 1} == {}, "began twice"
    assert {tag: n for tag, n in done.items() if n > 1} == {}, "ran twice"
    assert set(started) == {str(i) for i in range(TASKS)}
    assert statuses == {TaskStatus.SUCCESS: TASKS}, statuses
    shares = Counter(line.split()[1] for line in lines(tmp_path / "done"))
    assert set(shares) == {str(p.pid) for p in procs}, shares
    assert [p.poll() for p in procs] == [None, None], "a worker died"
    log = workers.log.read_text()
    assert not problems(log), log
    assert [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line] == []
    assert log.count(" serving 'QueueTasks'") == len(procs), log
