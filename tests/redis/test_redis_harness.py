"""The test harness with a kept Redis global config: its rate limits are timed by the Redis
server, which the harness's fake clock cannot move, so the harness refuses them plainly."""

from __future__ import annotations

import time

import pytest

from qtasks import AsyncQueueTasks
from qtasks_redis import RedisGlobalConfig
from qtasks_testing.harness import Harness, HarnessError

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def app_on_redis(url: str, prefix: str) -> tuple[AsyncQueueTasks, RedisGlobalConfig]:
    global_config = RedisGlobalConfig(url, prefix=prefix)
    return AsyncQueueTasks(global_config=global_config), global_config


async def test_a_kept_redis_global_config_with_a_rate_limit_is_refused(
    redis_url: str, prefix: str
) -> None:
    app, global_config = app_on_redis(redis_url, prefix)

    @app.task(rate_limit="10/s")
    async def call() -> None:
        pass

    harness = Harness(app, keep=["global_config"])
    with pytest.raises(HarnessError, match=r"server's.*\['call'\].*do not keep 'global_config'"):
        await harness.start()
    # Refused before anything was swapped or started.
    assert app.global_config is global_config
    assert not app.started
    assert app.clock is time.time


async def test_a_kept_redis_global_config_serves_tasks_without_a_rate_limit(
    redis_url: str, prefix: str
) -> None:
    app, global_config = app_on_redis(redis_url, prefix)

    @app.task(concurrency_key="n", max_concurrency=1)
    async def one_at_a_time(n: int) -> int:
        return n

    async with Harness(app, keep=["global_config"]):
        assert app.global_config is global_config
        assert (await app.add_task("one_at_a_time", 3)).returning == 3
        await global_config.flush()
