"""``qtasks_task_cancelled`` fires exactly once per cancelled task across the process that
cancels and the worker, on Redis (two apps on one server: the cancel feed is Redis pub/sub,
the claim begins records as it claims them); the scenarios are in
tests/cancel_hook_scenarios.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from cancel_hook_scenarios import Scenario, each_cancel
from redis_worker_app import build

from qtasks import AsyncQueueTasks
from qtasks.components import CancelFrom
from qtasks_redis import RedisStorage

pytestmark = pytest.mark.anyio

Apps = tuple[AsyncQueueTasks, AsyncQueueTasks]


def test_redis_storage_says_what_its_cancel_changed() -> None:
    assert isinstance(RedisStorage(), CancelFrom)


@pytest.fixture
async def apps(redis_url: str, prefix: str) -> AsyncIterator[Apps]:
    producer = build(redis_url, prefix, lease=60, concurrency=1, prefetch=3)
    worker = build(redis_url, prefix, lease=60, concurrency=1, prefetch=3)
    yield producer, worker
    await producer.aclose()


@each_cancel
async def test_a_cancel_fires_the_hook_once(apps: Apps, scenario: Scenario) -> None:
    await scenario(*apps)
