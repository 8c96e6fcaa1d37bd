"""Thousands of results awaited at once on one Redis storage: a few waits block on connections
of their own (``redis_wait_connections``), the rest share two (qtasks_redis.watch, Redis's
key tracking), and every wait still gets its record, through lost connections too. Before,
2,000 waits opened 2,000 connections. Each test runs on a redis-server of its own, so the
connections counted are this test's."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest
import redis
from redis_procs import RedisServer, start_server
from wait_apps import lane_of, make_app

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus
from qtasks.errors import ConfigError, TaskTimeoutError
from qtasks_redis import RedisStorage
from qtasks_redis.watch import KeyWatch
from qtasks_testing.contract.storage import finished, record

pytestmark = pytest.mark.anyio


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    started = start_server(tmp_path, fsync="no")
    yield started
    started.close()


@pytest.fixture
async def producer(server: RedisServer) -> AsyncIterator[AsyncQueueTasks]:
    app = make_app(server.url)
    await app.start()
    try:
        yield app
    finally:
        await app.aclose()


def watch_of_storage(storage: RedisStorage) -> KeyWatch:
    lane = storage._shared.lane
    assert lane is not None and lane.watch is not None
    return lane.watch


def watch_of(app: AsyncQueueTasks) -> KeyWatch:
    storage = app.storage
    assert isinstance(storage, RedisStorage)
    return watch_of_storage(storage)


async def until(condition: object, seconds: float = 30) -> None:
    """Until ``condition()`` is true (checked each loop turn), or fail after ``seconds``."""
    assert callable(condition)
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - counts kept by the watch, which sets no event
            await anyio.sleep(0.01)


def clients(server: RedisServer) -> int:
    with redis.Redis.from_url(server.url) as client:
        return len(client.client_list())


async def serve_until_done(url: str, waits: list[object]) -> None:
    """A worker (another app on the same server) serves until every wait in ``waits``
    returned."""
    worker = make_app(url)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.serve)
        await until(lambda: len(waits) == 0, 60)
        tg.cancel_scope.cancel()


async def test_two_thousand_waits_share_a_few_connections(
    server: RedisServer, producer: AsyncQueueTasks
) -> None:
    tasks = [await producer.add_task("double", i) for i in range(2000)]
    before = clients(server)
    results: dict[str, int] = {}
    pending: list[object] = list(range(len(tasks)))

    async def wait(uuid: str) -> None:
        record = await producer.wait(uuid, 60)
        results[uuid] = record.returning
        pending.pop()

    async with anyio.create_task_group() as tg:
        for task in tasks:
            tg.start_soon(wait, task.uuid)
        await until(lambda: producer.storage._shared.lane.watch is not None)  # type: ignore[attr-defined]
        watch = watch_of(producer)
        await until(lambda: watch.blocking + watch.watched == len(tasks))
        # 16 blocking waits (the default), the watch's two connections: not 2,000.
        assert watch.blocking == 16
        assert clients(server) <= before + 16 + 2
        await serve_until_done(server.url, pending)
    assert results == {task.uuid: 2 * i for i, task in enumerate(tasks)}
    assert watch.watched == 0 and watch.blocking == 0


@pytest.mark.parametrize("lost", ["feed", "reads"])
async def test_waits_outlive_a_lost_watch_connection(server: RedisServer, lost: str) -> None:
    """Killed, the connection Redis reports changes on (``feed``) or the one that reads the
    keys (``reads``): what the server tracked is gone, so every wait reads its record
    again. Without that the waits would sleep until their 10 s safety re-read; they have 5 s."""
    producer = make_app(server.url, redis_wait_connections=0)  # every wait on the watch
    await producer.start()
    try:
        tasks = [await producer.add_task("double", i) for i in range(50)]
        pending: list[object] = list(range(len(tasks)))
        statuses: list[TaskStatus] = []

        async def wait(uuid: str) -> None:
            statuses.append((await producer.wait(uuid, 5)).status)
            pending.pop()

        async with anyio.create_task_group() as tg:
            for task in tasks:
                tg.start_soon(wait, task.uuid)
            await until(lambda: lane_of(producer).watch is not None)
            watch = watch_of(producer)
            await until(lambda: watch.watched == len(tasks) and watch._reads is not None)
            conn = watch._feed if lost == "feed" else watch._reads
            assert conn is not None and conn._transport is not None
            port = conn._transport.get_extra_info("sockname")[1]
            with redis.Redis.from_url(server.url) as client:
                assert client.client_kill_filter(addr=f"127.0.0.1:{port}") == 1
            await serve_until_done(server.url, pending)
        assert statuses == [TaskStatus.SUCCESS] * len(tasks)
        assert watch.watched == 0
    finally:
        await producer.aclose()


async def test_a_final_record_returns_at_once_and_a_timeout_is_kept(
    server: RedisServer,
) -> None:
    producer = make_app(server.url, redis_wait_connections=0)
    await producer.start()
    try:
        done = await producer.add_task("double", 21)
        waiting = await producer.add_task("double", 1)
        pending: list[object] = [0]

        async def run_one() -> None:
            assert (await producer.wait(done.uuid, 5)).returning == 42
            pending.pop()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_one)
            await serve_until_done(server.url, pending)
        # Final already: the watch reads it final and does not wait.
        with anyio.fail_after(2):
            assert (await producer.wait(done.uuid, 30)).returning == 42
        # ``waiting`` ran too (the worker took the queue); a new one that nobody runs:
        never = await producer.add_task("double", 2, delay=3600)
        with pytest.raises(TaskTimeoutError):
            await producer.wait(never.uuid, 0.3)
        assert watch_of(producer).watched == 0
        assert (await producer.wait(waiting.uuid, 5)).returning == 2
    finally:
        await producer.aclose()


async def test_a_server_that_refuses_tracking_gets_blocking_waits(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A user whose ACL has no ``CLIENT`` command: the watch cannot start, so waits past the
    limit block on connections of their own, as before, and the log says so once."""
    with redis.Redis.from_url(server.url) as client:
        client.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-client")
    url = f"redis://app:pw@127.0.0.1:{server.port}/0"
    producer = make_app(url, redis_wait_connections=0)
    await producer.start()
    try:
        tasks = [await producer.add_task("double", i) for i in range(20)]
        pending: list[object] = list(range(len(tasks)))
        found: list[int] = []

        async def wait(uuid: str) -> None:
            found.append((await producer.wait(uuid, 10)).returning)
            pending.pop()

        with caplog.at_level(logging.WARNING, logger="qtasks.redis"):
            async with anyio.create_task_group() as tg:
                for task in tasks:
                    tg.start_soon(wait, task.uuid)
                await serve_until_done(server.url, pending)
        assert sorted(found) == [2 * i for i in range(20)]
        assert watch_of(producer).unavailable is not None
        warned = [r for r in caplog.records if "does not let this process track keys" in r.message]
        assert len(warned) == 1
    finally:
        await producer.aclose()


async def test_a_negative_number_of_wait_connections_is_refused(server: RedisServer) -> None:
    """Refused when the storage is built, as the other Redis options out of range are (it was
    only at start); the app's ``config.extra``, which the storage reads at start, there."""
    refused = r"extra\.redis_wait_connections must be 0 or more, got -1"
    with pytest.raises(ConfigError, match=refused):
        RedisStorage(server.url, options={"redis_wait_connections": -1})
    with pytest.raises(ConfigError, match=refused):
        RedisStorage.from_config(
            QueueConfig(storage_url=server.url, extra={"redis_wait_connections": -1})
        )
    with pytest.raises(ConfigError, match=r"extra\.redis_wait_connections expects int"):
        RedisStorage(server.url, options={"redis_wait_connections": "many"})
    app = make_app(server.url, redis_wait_connections=-1)
    with pytest.raises(ConfigError, match=refused):
        await app.start()


@pytest.mark.parametrize("lost", [None, "feed"])
async def test_many_step_followers_share_the_watch(server: RedisServer, lost: str | None) -> None:
    """Live step streams (``task.stream()``, the dashboard's) past the limit wait on the watch
    too: 40 followers of 40 running tasks hold the watch's two connections, get every step in
    order and end with their task, a lost connection of the watch included (each is woken to
    read again; the safety re-read is at 10 s, they have 5)."""
    storage = RedisStorage(server.url, options={"redis_wait_connections": 0})
    async with AsyncExitStack() as stack:
        await storage.start(stack, QueueConfig())
        records = [record(TaskStatus.PROCESS) for _ in range(40)]
        for rec in records:
            await storage.add(rec)
        before = clients(server)
        got: dict[str, list[object]] = {rec.uuid: [] for rec in records}
        ended: list[str] = []

        async def follow(uuid: str) -> None:
            async for item in storage.steps(uuid):
                got[uuid].append(item)
            ended.append(uuid)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for rec in records:
                    tg.start_soon(follow, rec.uuid)
                lane = storage._shared.lane
                assert lane is not None
                await until(lambda: lane.watch is not None and lane.watch.watched == len(records))
                watch = lane.watch
                assert watch is not None and watch._feed is not None
                assert clients(server) <= before + 2
                for rec in records:
                    assert await storage.add_step(rec.uuid, "a") == 0
                await until(lambda: all(got[rec.uuid] == ["a"] for rec in records))
                if lost == "feed":
                    with redis.Redis.from_url(server.url) as client:
                        assert client.client_kill_filter(_id=str(watch._feed.client_id)) == 1
                for rec in records:
                    assert await storage.add_step(rec.uuid, "b") == 1
                    await storage.save(finished(rec, steps=2))
        assert sorted(ended) == sorted(got)
        assert all(items == ["a", "b"] for items in got.values())
        assert watch_of_storage(storage).watched == 0
