"""A sync app on Redis used before ``fork()`` (review r19 #6): the child connects anew, and
the parent's connections, which the child inherited, keep working in the parent (the child
never closes them: that would take their sockets out of the epoll both processes share)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fork_scenarios import run_forked

pytestmark = pytest.mark.redis

IMPORTS = "from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage"


@pytest.mark.parametrize("serving", [False, True], ids=["used", "serving"])
@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_forked_child_connects_afresh(
    tmp_path: Path, redis_url: str, prefix: str, how: str, serving: bool
) -> None:
    app = (
        f"QueueTasks('forked', broker=RedisBroker({redis_url!r}, prefix={prefix!r}), "
        f"storage=RedisStorage({redis_url!r}, prefix={prefix!r}), "
        f"global_config=RedisGlobalConfig({redis_url!r}, prefix={prefix!r}))"
    )
    run_forked(tmp_path, app, IMPORTS, how, serving)
