"""Dead-lettering by the delivery limit fences the task's record (issue 14, item 4): its last
holder's late result is refused, the record says why it ended, and requeueing the dead letter
does not reset a stored success by accident, nor lets that late result in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import pytest
import redis.asyncio
from fence_scenarios import late_result_after_a_dead_letter_is_requeued
from redis_procs import Worker, counts, wait_workers
from redis_worker_app import build

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus
from qtasks.components import RecordQuery
from qtasks.record import TaskRecord
from qtasks_redis import RedisBroker, RedisStorage
from qtasks_redis.broker import RedisDelivery

pytestmark = pytest.mark.anyio


async def dead_lettered(app: AsyncQueueTasks, uuid: str, seconds: float) -> None:
    with anyio.fail_after(seconds):
        while uuid not in {d.id for d in await app.dead_letters()}:  # noqa: ASYNC110 - remote
            await anyio.sleep(0.05)


@asynccontextmanager
async def running_task_dead_lettered(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> AsyncIterator[tuple[AsyncQueueTasks, TaskRecord, RedisDelivery]]:
    """An app whose task ``job`` was begun by worker w1, then dead-lettered by worker w2's
    claim once w1's lease ran out (delivery limit 1); yields the app, the task and w1's
    delivery, still held."""
    app = AsyncQueueTasks(
        broker=RedisBroker(redis_url, prefix=prefix, queue="q"),
        storage=RedisStorage(redis_url, prefix=prefix),
        config=QueueConfig(lease=0.2, max_deliveries=1),
    )
    await app.start()
    stack.push_async_callback(app.aclose)
    broker, storage = app.broker, app.storage
    assert isinstance(broker, RedisBroker) and isinstance(storage, RedisStorage)
    task = await app.add_task("job", 1)
    async with broker.consume_begun(
        prefetch=1, storage=storage, worker="w1", starts=lambda: 1
    ) as first:
        with anyio.fail_after(3):
            held = await first.__anext__()
        assert held.begun is not None and held.begun.status is TaskStatus.PROCESS
        await anyio.sleep(0.3)  # the lease (0.2 s) runs out while the holder is stalled
        # Another worker's claim finds the message past its delivery limit: dead letter.
        async with (
            broker.consume_begun(
                prefetch=1, storage=storage, worker="w2", starts=lambda: 1
            ) as second,
            anyio.create_task_group() as tg,
        ):

            async def claim() -> None:
                await second.__anext__()  # claims, and blocks: nothing is deliverable

            tg.start_soon(claim)  # (anyio 4.7 wants a coroutine, not an async generator's asend)
            await dead_lettered(app, task.uuid, 5)
            tg.cancel_scope.cancel()
        yield app, task, held


async def test_last_holder_cannot_store_a_result_after_the_dead_letter(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    async with running_task_dead_lettered(redis_url, prefix, stack) as (app, task, held):
        broker, storage = app.broker, app.storage
        assert isinstance(broker, RedisBroker) and isinstance(storage, RedisStorage)
        stored = await app.get(task.uuid)
        assert stored is not None and stored.status is TaskStatus.ERROR
        assert stored.error is not None and stored.error.startswith("dead-lettered: delivery limit")
        # The task-name indexes moved with it (the dashboard lists it as failed).
        failed = await storage.query(RecordQuery(task_name="job", status=TaskStatus.ERROR))
        assert [r.uuid for r in failed.records] == [task.uuid]
        running = await storage.query(RecordQuery(task_name="job", status=TaskStatus.PROCESS))
        assert running.records == []
        waited = await app.wait(task.uuid, timeout=1)  # final: waiters are woken
        assert waited.status is TaskStatus.ERROR
        # The stalled holder comes back with its result: refused, the record stays as it is.
        late = TaskRecord(**{**stored.to_dict(), "status": TaskStatus.SUCCESS, "returning": 1})
        late.error, late.token = None, held.token
        assert not await broker.ack_final(held, storage, late)
    stored = await app.get(task.uuid)
    assert stored is not None and (stored.status, stored.returning) == (TaskStatus.ERROR, None)
    # Requeueing resets the record (it holds no result) and the task runs again.
    assert await app.requeue_dead_letters([task.uuid]) == 1
    again = await app.get(task.uuid)
    assert again is not None and (again.status, again.error) == (TaskStatus.NEW, None)


async def test_requeue_removes_the_lost_runs_begin_from_the_record(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    """The dead letter kept when its lost run began (hash field ``b``, read with ``e``); the
    requeue's reset of the record removes it with ``e``, in the same script, so the hash of a
    requeued task holds nothing of the dead letter but its fencing token."""
    async with running_task_dead_lettered(redis_url, prefix, stack) as (app, task, held):
        storage = app.storage
        assert isinstance(storage, RedisStorage)
        key = storage.record_key(task.uuid)
        client = redis.asyncio.Redis.from_url(redis_url)
        stack.push_async_callback(client.aclose)
        dead = await client.hgetall(key)
        assert held.begun is not None
        assert float(dead[b"b"]) == pytest.approx(held.begun.started_at)
        assert await app.requeue_dead_letters([task.uuid]) == 1
    requeued = await client.hgetall(key)
    assert b"b" not in requeued and b"e" not in requeued
    assert requeued[b"s"] == b"new" and requeued[b"t"] == b"dead-letter"
    again = await app.get(task.uuid)
    assert again is not None and (again.status, again.error) == (TaskStatus.NEW, None)


async def test_a_late_result_is_refused_after_the_dead_letter_is_requeued(
    redis_url: str, prefix: str
) -> None:
    app = build(redis_url, prefix, lease=0.5, concurrency=1, prefetch=0, max_deliveries=1)
    await late_result_after_a_dead_letter_is_requeued(app)


async def test_requeue_keeps_a_dead_letter_whose_task_succeeded(
    redis_url: str, prefix: str, stack: AsyncExitStack
) -> None:
    app = AsyncQueueTasks(
        broker=RedisBroker(redis_url, prefix=prefix, queue="q"),
        storage=RedisStorage(redis_url, prefix=prefix),
    )
    await app.start()
    stack.push_async_callback(app.aclose)
    task = await app.add_task("job", 1)
    async with app.broker.consume(prefetch=1) as deliveries:
        with anyio.fail_after(3):
            delivery = await deliveries.__anext__()
        assert await delivery.nack("given up")
    record = await app.storage.get(task.uuid)
    assert record is not None
    record.status, record.returning = TaskStatus.SUCCESS, "done"
    await app.storage.add(record)  # the result came in by other means
    assert await app.requeue_dead_letters() == 0
    kept = await app.get(task.uuid)
    assert kept is not None and (kept.status, kept.returning) == (TaskStatus.SUCCESS, "done")
    assert [d.id for d in await app.dead_letters()] == [task.uuid]
    assert await app.requeue_dead_letters(force=True) == 1
    reset = await app.get(task.uuid)
    assert reset is not None and (reset.status, reset.returning) == (TaskStatus.NEW, None)


@pytest.mark.slow
async def test_two_workers_a_loop_blocking_task_ends_dead_lettered_not_successful(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """The issue's reproduction on real processes, scaled down: lease 1 s, two deliveries
    allowed, a task that blocks its worker's loop for 2.5 s."""
    app = build(redis_url, prefix)
    await app.start()
    workers = [
        Worker(
            redis_url,
            prefix,
            tmp_path,
            lease=1.0,
            concurrency=2,
            name=n,
            config={"max_deliveries": 2},
        )
        for n in ("a", "b")
    ]
    try:
        # Both serve (idle, blocked for a wake-up) before the task comes: the one woken takes
        # it, and the other must still learn its lease deadline while it sleeps.
        await wait_workers(app, 2, *workers)
        task = await app.add_task("loop_hog", 1, 2.5)
        done = await app.wait(task.uuid, timeout=30)
        assert done.status is TaskStatus.ERROR, done
        assert done.error is not None and "dead-lettered: delivery limit" in done.error
        await dead_lettered(app, task.uuid, 5)
        # Both blocked runs end; neither result replaces the dead-lettered record.
        with anyio.fail_after(15):
            while counts(workers[0].ledger, "end")[1] < 2:  # noqa: ASYNC110 - a file
                await anyio.sleep(0.05)
        final = await app.get(task.uuid)
        assert final is not None and (final.status, final.returning) == (TaskStatus.ERROR, None)
        # The watchdog named the culprit in the log of the worker whose loop it blocked.
        logs = "".join(worker.output() for worker in workers)
        assert "event loop blocked" in logs and "by task 'loop_hog'" in logs
    finally:
        for worker in workers:
            assert worker.stop() == 0, worker.output()
        await app.aclose()
