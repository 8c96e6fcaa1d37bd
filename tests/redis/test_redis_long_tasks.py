"""Long tasks and prefetch on Redis (tests/prefetch_scenarios.py)."""

from __future__ import annotations

from typing import Any

import pytest
from prefetch_scenarios import (
    Components,
    default_prefetch_leaves_waiting_tasks_to_a_new_worker,
    next_task_goes_to_an_idle_worker,
)

from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

pytestmark = pytest.mark.anyio


def _components(redis_url: str, prefix: str) -> Components:
    def components() -> dict[str, Any]:
        return {
            "broker": RedisBroker(redis_url, prefix=prefix, queue="long"),
            "storage": RedisStorage(redis_url, prefix=prefix),
            "global_config": RedisGlobalConfig(redis_url, prefix=prefix),
        }

    return components


async def test_with_prefetch_0_the_next_task_goes_to_an_idle_worker(
    redis_url: str, prefix: str
) -> None:
    await next_task_goes_to_an_idle_worker(_components(redis_url, prefix))


async def test_with_the_default_prefetch_busy_workers_leave_waiting_tasks_to_a_new_one(
    redis_url: str, prefix: str
) -> None:
    """The claims follow the worker's hold (``wanted``): none beyond the free slot."""
    await default_prefetch_leaves_waiting_tasks_to_a_new_worker(_components(redis_url, prefix))
