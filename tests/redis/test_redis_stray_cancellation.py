"""A ``CancelledError`` that code under a Redis-served worker raises of its own is that code's
failure, not the worker's stop (the scenarios are in ``stray_scenarios.py``; the memory run
and the worker's real teardown are in ``tests/core/test_stray_cancellation.py``)."""

from __future__ import annotations

import pytest
from redis_worker_app import build
from stray_scenarios import (
    a_cancelled_task_raising_a_fresh_cancellation_is_cancelled_and_the_worker_serves_on,
    a_cancelled_task_whose_settle_write_raises_its_own_cancellation_is_handed_back,
    a_cancelled_task_whose_teardown_raises_its_own_cancellation_is_settled,
    a_hook_raising_its_own_cancellation_is_ignored_as_a_failed_hook,
    a_task_raising_its_own_cancellation_fails_and_the_worker_serves_on,
    cancelled_inner,
)

from qtasks import AsyncQueueTasks, TaskRecord, TaskStatus
from qtasks.components import Delivery, Storage
from qtasks_redis import RedisBroker

pytestmark = pytest.mark.anyio


def one_at_a_time(redis_url: str, prefix: str) -> AsyncQueueTasks:
    return build(redis_url, prefix, concurrency=1, prefetch=1)


async def test_a_task_raising_its_own_cancellation_fails_and_the_worker_serves_on(
    redis_url: str, prefix: str
) -> None:
    await a_task_raising_its_own_cancellation_fails_and_the_worker_serves_on(
        one_at_a_time(redis_url, prefix)
    )


async def test_a_cancelled_task_raising_a_fresh_cancellation_is_cancelled(
    redis_url: str, prefix: str
) -> None:
    await a_cancelled_task_raising_a_fresh_cancellation_is_cancelled_and_the_worker_serves_on(
        one_at_a_time(redis_url, prefix)
    )


async def test_a_hook_raising_its_own_cancellation_is_ignored(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    await a_hook_raising_its_own_cancellation_is_ignored_as_a_failed_hook(
        one_at_a_time(redis_url, prefix), caplog
    )


async def test_a_cancelled_task_whose_teardown_raises_its_own_cancellation_is_settled(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    await a_cancelled_task_whose_teardown_raises_its_own_cancellation_is_settled(
        one_at_a_time(redis_url, prefix), caplog
    )


class StrayAckFinal(RedisBroker):
    """Its first settle of a ``cancel`` record (one script call storing it and acking the
    message, where the in-memory broker calls the storage's save) raises a cancellation of
    its own."""

    fired = False

    async def ack_final(
        self,
        delivery: Delivery,
        storage: Storage,
        record: TaskRecord,
        *,
        enqueued: list[str] | None = None,
    ) -> bool:
        if record.status is TaskStatus.CANCEL and not self.fired:
            self.fired = True
            await cancelled_inner()
        return await super().ack_final(delivery, storage, record, enqueued=enqueued)


async def test_a_cancelled_task_whose_settle_raises_its_own_cancellation_is_handed_back(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = build(
        redis_url, prefix, concurrency=1, prefetch=1, retry_backoff=0.05, broker_type=StrayAckFinal
    )
    await a_cancelled_task_whose_settle_write_raises_its_own_cancellation_is_handed_back(
        app, caplog, "the broker (StrayAckFinal.ack_final)"
    )
