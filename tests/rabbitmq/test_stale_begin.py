"""A delivery waiting in a worker when its connection drops is RabbitMQ's again at once:
another worker gets it and runs it. The first worker's runner, free before its next renewal
pass, must not begin it too: that begin took the record from the worker running the task
(whose result was then refused, not acked, and the task ran again after its lease) and ran
it a second time."""

from __future__ import annotations

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus
from qtasks_rabbitmq import RabbitMQBroker
from qtasks_redis import RedisStorage

from .conftest import URL, close_connections, delete_topology

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]


async def test_a_waiting_delivery_of_a_dropped_connection_is_not_begun_again(
    queue_name: str, redis_url: str, prefix: str
) -> None:
    release, running, finish = anyio.Event(), anyio.Event(), anyio.Event()
    runs: list[str] = []

    def make(name: str, concurrency: int) -> AsyncQueueTasks:
        app = AsyncQueueTasks(
            name,
            broker=RabbitMQBroker(URL, queue=queue_name),
            storage=RedisStorage(redis_url, prefix=prefix),
            config=QueueConfig(
                lease=30, max_tasks_process=concurrency, prefetch=1, shutdown_grace=5
            ),
        )

        @app.task(name="blocker")
        async def blocker() -> None:
            running.set()
            await release.wait()

        @app.task(name="job")
        async def job(where: str = name) -> str:
            runs.append(where)
            await finish.wait()
            return where

        return app

    # The second takes both messages RabbitMQ requeues (the blocker comes first), mostly: when
    # the first's consumer is back before the second consumes (a loaded machine), RabbitMQ may
    # give the job to the first's new channel, a delivery of its own that it runs. Either way
    # the job runs once: the stale delivery waiting in the first worker is never begun.
    first, second = make("first", 1), make("second", 2)
    try:
        async with first:
            worker = first.worker
            await first.add_task("blocker")
            with anyio.fail_after(10):
                await running.wait()
            task = await first.add_task("job")
            with anyio.fail_after(10):
                while not worker.waiting:  # noqa: ASYNC110 - no event for it
                    await anyio.sleep(0.01)
            assert close_connections(queue_name) >= 1
            async with second:
                with anyio.fail_after(20):
                    while not runs:  # noqa: ASYNC110 - a worker runs it
                        await anyio.sleep(0.01)
                release.set()  # the first worker's runner is free: it takes the waiting one
                with anyio.fail_after(10):
                    while (worker.running or worker.waiting) and "first" not in runs:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                finish.set()
                done = await first.wait(task.uuid, timeout=20)
        assert len(runs) == 1, runs  # the stale delivery was not run as well
        assert (done.status, done.returning) == (TaskStatus.SUCCESS, runs[0])
    finally:
        finish.set()
        release.set()
        await first.aclose()
        await second.aclose()
        broker = first.broker
        assert isinstance(broker, RabbitMQBroker)
        await delete_topology(broker.topology)
