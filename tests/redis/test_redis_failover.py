"""A server that turns read-only under a worker (a failover made it a replica: every write is
refused with ``READONLY`` until the client reaches a primary again) is an outage, not a fault
of the task: the worker rides it out, and the task that finished meanwhile is stored once, as
``success``, when the server takes writes again. Nothing runs twice, nothing ends ``error``.

The failover is real: ``REPLICAOF`` to an address where no primary listens makes the
test's own redis-server refuse writes; ``REPLICAOF NO ONE`` ends it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis
from redis_procs import RedisServer, Seen, free_port, start_server

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

pytestmark = pytest.mark.anyio


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    started = start_server(tmp_path, fsync="no")
    yield started
    started.close()


@pytest.mark.parametrize("shared", [True, False], ids=["batched", "alone"])
async def test_a_read_only_server_is_ridden_out_and_the_result_stored_once(
    server: RedisServer,
    shared: bool,
    redis_url: str,
    prefix: str,
) -> None:
    """``shared``: broker and storage on the failing server (the batched settle); else the
    broker stays on the shared server and only the storage fails over (the runner's own
    settle)."""
    seen = Seen("for now")  # an outage warning: "... cannot take calls for now ..."
    logging.getLogger("qtasks").addHandler(seen)
    storage = RedisStorage(server.url, prefix=prefix)
    broker = RedisBroker(server.url if shared else redis_url, prefix=prefix)
    app = AsyncQueueTasks(
        broker=broker,
        storage=storage,
        global_config=RedisGlobalConfig(server.url, prefix=storage.prefix),
        config=QueueConfig(
            max_tasks_process=2, lease=30.0, retry_backoff=0.05, plugins_disabled=["*"]
        ),
    )
    started, release, returning = anyio.Event(), anyio.Event(), anyio.Event()
    runs: list[int] = []

    @app.task
    async def slow(n: int) -> int:
        runs.append(n)
        started.set()
        await release.wait()
        returning.set()
        return n * 2

    admin = redis.Redis(port=server.port)
    try:
        async with app:
            handle = await app.add_task("slow", 21)
            with anyio.fail_after(10):
                await started.wait()
            admin.replicaof("127.0.0.1", free_port())
            with pytest.raises(redis.ReadOnlyError):
                admin.set(f"{prefix}:probe", 1)  # the server refuses writes now
            release.set()
            with anyio.fail_after(10):
                await returning.wait()
                await seen.event.wait()  # the worker met the refusal, as an outage
            stored = await app.storage.get(handle.uuid)  # a replica still serves reads
            assert stored is not None and stored.status is TaskStatus.PROCESS  # not stored yet
            admin.replicaof("NO", "ONE")
            record = await handle.wait_result(timeout=20)
            assert record.status is TaskStatus.SUCCESS, record.error
            assert record.returning == 42
            assert runs == [21]
    finally:
        logging.getLogger("qtasks").removeHandler(seen)
        admin.replicaof("NO", "ONE")
        admin.close()
