"""A begin is fenced by the broker's lease whatever the storage: with the Redis broker and a
Redis storage on another server (no script holds both), a worker whose delivery another
worker took over (its lease ran out while the delivery waited in it, unrenewed) does not
begin or run the task."""

from __future__ import annotations

from pathlib import Path

import pytest
from begin_scenarios import taken_over_while_waiting
from redis_procs import start_server

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisStorage

pytestmark = pytest.mark.anyio


async def test_a_waiting_delivery_taken_over_is_not_begun_with_the_storage_elsewhere(
    redis_url: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scenario of ``taken_over_while_waiting``, with the storage on a server of its
    own: the stale delivery's begin is a plain ``Storage.begin``, which knows nothing of the
    broker's leases. Before, the busy worker began the job (taking the record from the
    other delivery, whose result was then refused) and ran it a second time."""
    records = start_server(tmp_path)
    config = QueueConfig(max_tasks_process=1, prefetch=1, plugins_disabled=["*"])
    busy, other = (
        AsyncQueueTasks(
            name,
            broker=RedisBroker(redis_url, prefix=prefix, lease=0.6),
            storage=RedisStorage(records.url, prefix=prefix),
            config=config,
        )
        for name in ("busy", "other")
    )
    try:
        assert busy.shared_server is None  # nothing is folded into a script
        await taken_over_while_waiting(busy, other, monkeypatch)
    finally:
        records.close()
