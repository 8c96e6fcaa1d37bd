"""Long tasks and prefetch on Redis (tests/prefetch_scenarios.py)."""

from __future__ import annotations

from typing import Any

import pytest
from prefetch_scenarios import next_task_goes_to_an_idle_worker

from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

pytestmark = pytest.mark.anyio


async def test_with_prefetch_0_the_next_task_goes_to_an_idle_worker(
    redis_url: str, prefix: str
) -> None:
    def components() -> dict[str, Any]:
        return {
            "broker": RedisBroker(redis_url, prefix=prefix, queue="long"),
            "storage": RedisStorage(redis_url, prefix=prefix),
            "global_config": RedisGlobalConfig(redis_url, prefix=prefix),
        }

    await next_task_goes_to_an_idle_worker(components)
