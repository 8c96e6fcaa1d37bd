"""A Redis server at its ``maxmemory``: with ``noeviction`` it refuses writes, and qtasks says
so (``ServerFullError``, a QTasks error that names the cause) without writing half a task; a
worker rides it out as an outage, failing and dead-lettering nothing, and finishes every task
once memory is freed. A server that evicts keys is warned about at start."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis
from redis_procs import RedisServer, Seen, start_server

from qtasks import AsyncQueueTasks, AsyncTask, QueueConfig, TaskStatus
from qtasks.errors import BrokerConnectionError, ServerFullError
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

pytestmark = pytest.mark.anyio

PAYLOAD = "x" * 20_000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    started = start_server(tmp_path, fsync="no", extra=["--maxmemory", "4mb"])
    yield started
    started.close()


def app_for(url: str) -> AsyncQueueTasks:
    app = AsyncQueueTasks(
        broker=RedisBroker(url),
        storage=RedisStorage(url),
        global_config=RedisGlobalConfig(url),
        config=QueueConfig(max_tasks_process=4, max_deliveries=2, retry_backoff=0.05, lease=3),
    )

    @app.task
    async def keep(data: str) -> int:
        return len(data)

    return app


async def fill(app: AsyncQueueTasks) -> tuple[list[AsyncTask], ServerFullError]:
    """Tasks added until the server refuses one."""
    added: list[AsyncTask] = []
    with anyio.fail_after(30):
        while True:
            try:
                added.append(await app.add_task("keep", PAYLOAD))
            except ServerFullError as exc:
                return added, exc


async def test_a_full_server_refuses_an_add_and_a_worker_finishes_everything_later(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = server.url
    producer = app_for(url)
    refusing = Seen("out of memory")
    logging.getLogger("qtasks").addHandler(refusing)
    await producer.start()
    try:
        added, refused = await fill(producer)
        assert len(added) > 10
        assert isinstance(refused, BrokerConnectionError)  # handled as the server being away
        assert f"Redis at 127.0.0.1:{server.port} (db 0) is out of memory" in str(refused)
        # Nothing of the refused task was written: as many records as messages.
        stats = await producer.broker.stats()
        assert sum(stats.ready_by_priority.values()) == len(added)
        assert (await producer.storage.stats()).get("new") == len(added)
        worker = app_for(url)
        with caplog.at_level(logging.WARNING, logger="qtasks"):
            async with worker:
                with anyio.fail_after(30):
                    await refusing.event.wait()  # the worker met the full server
                assert await producer.dead_letters() == []
                redis.Redis.from_url(url).config_set("maxmemory", 0)  # memory freed
                with anyio.fail_after(60):
                    finals = [await producer.wait(t.uuid, timeout=60) for t in added]
        assert {f.status for f in finals} == {TaskStatus.SUCCESS}
        assert {f.returning for f in finals} == {len(PAYLOAD)}
        assert await producer.dead_letters() == []
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    finally:
        logging.getLogger("qtasks").removeHandler(refusing)
        await producer.aclose()


async def test_a_server_that_evicts_keys_is_warned_about_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    evicting = start_server(tmp_path, fsync="no", extra=["--maxmemory-policy", "allkeys-lru"])
    try:
        app = app_for(evicting.url)
        with caplog.at_level(logging.WARNING, logger="qtasks.redis"):
            async with app:
                pass
        warnings = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
        assert len(warnings) == 1, warnings  # once for the server, not once per component
        assert "allkeys-lru" in warnings[0] and "noeviction" in warnings[0]
    finally:
        evicting.close()
