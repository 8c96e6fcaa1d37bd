"""The qtasks app end to end on Redis, with the worker in this process."""

from __future__ import annotations

import socket
import time

import anyio
import pytest
from redis_keys import on_test_redis
from redis_procs import settled
from redis_worker_app import build

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus
from qtasks.components import AttemptLog
from qtasks.errors import BrokerConnectionError, TaskArgumentsError
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

pytestmark = pytest.mark.anyio


async def test_add_task_waits_for_result(redis_url: str, prefix: str) -> None:
    app = build(redis_url, prefix)
    async with app:
        task = await app.add_task("noop", 21, timeout=5)
        assert (task.status, task.returning) == (TaskStatus.SUCCESS, 42)
        tasks = [await app.add_task("noop", i) for i in range(20)]
        done = [await app.wait(t.uuid, timeout=5) for t in tasks]
        assert [t.returning for t in done] == [i * 2 for i in range(20)]
        stats = await settled(app)
        assert (stats.in_flight, stats.ready_by_priority, stats.delayed) == (0, {}, 0)
        workers = await app.global_config.workers()
        assert app.worker.id in workers


async def test_generator_steps_stream(redis_url: str, prefix: str) -> None:
    app = build(redis_url, prefix)
    async with app:
        task = await app.add_task("steps", 4)
        seen = [step async for step in app.stream(task.uuid, timeout=5)]
        assert seen == [{"step": i} for i in range(4)]
        final = await app.wait(task.uuid, timeout=5)
        assert final.status is TaskStatus.SUCCESS


async def test_a_retried_task_keeps_its_earlier_attempt(redis_url: str, prefix: str) -> None:
    app = build(redis_url, prefix)
    failed: set[int] = set()

    @app.task(retry=2, retry_backoff=0)
    async def twice(i: int) -> int:
        if i not in failed:
            failed.add(i)
            raise ValueError(f"first try of {i}")
        return i

    async with app:
        done = await app.add_task("twice", 7, timeout=5)
        assert (done.status, done.attempt, done.returning) == (TaskStatus.SUCCESS, 2, 7)
        storage = app.storage
        assert isinstance(storage, AttemptLog)
        [first] = await storage.attempts(done.uuid)
        assert (first.status, first.attempt, first.error) == (
            TaskStatus.RETRY,
            1,
            "ValueError: first try of 7",
        )
        assert first.worker == done.worker == app.worker.id
        once = await app.add_task("noop", 1, timeout=5)
        assert await storage.attempts(once.uuid) == []


async def test_delay_and_priority(redis_url: str, prefix: str) -> None:
    app = build(redis_url, prefix)
    async with app:
        start = time.time()
        task = await app.add_task("noop", 1, delay=0.3, timeout=5)
        assert task.status is TaskStatus.SUCCESS
        assert time.time() - start >= 0.3


async def test_bad_enqueue_options_are_refused_before_anything_is_written(
    redis_url: str, prefix: str
) -> None:
    """A float priority was stored and published, then dead-lettered as undecodable; a bool
    one failed inside the Redis client; a str delay raised a bare TypeError (review r5 #3)."""
    app = build(redis_url, prefix)
    async with app:
        for options in ({"priority": True}, {"priority": 1.5}, {"delay": "5"}, {"eta": "now"}):
            with pytest.raises(TaskArgumentsError):
                await app.add_task("noop", 1, **options)
        stats = await settled(app)
        assert (stats.ready_by_priority, stats.delayed, stats.dead_letters) == ({}, 0, 0)
        assert await app.storage.stats() == {}
        # The ends of the range are carried (Redis orders them as +-899).
        for priority in (2**63 - 1, -(2**63)):
            task = await app.add_task("noop", 2, priority=priority, timeout=5)
            assert (task.status, task.priority) == (TaskStatus.SUCCESS, priority)


async def test_cancel_queued_task(redis_url: str, prefix: str) -> None:
    app = build(redis_url, prefix)
    await app.start()
    try:
        task = await app.add_task("noop", 1, delay=30)
        cancelled = await app.cancel(task.uuid, "not needed")
        assert cancelled is not None
        assert cancelled.status is TaskStatus.CANCEL
        assert (await app.broker.stats()).delayed == 0
    finally:
        await app.aclose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_unreachable_url_at_startup_names_host_and_port() -> None:
    port = _free_port()
    url = f"redis://user:hunter2@127.0.0.1:{port}/0"
    app = AsyncQueueTasks(
        broker=RedisBroker(url),
        storage=RedisStorage(url),
        global_config=RedisGlobalConfig(url),
        config=QueueConfig(extra={"redis_retries": 1}),
    )
    with anyio.fail_after(10), pytest.raises(BrokerConnectionError) as info:
        await app.start()
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "hunter2" not in str(info.value)


async def test_found_by_entry_point_name(redis_url: str, prefix: str) -> None:
    from importlib.metadata import entry_points

    for group, cls in [
        ("qtasks.brokers", RedisBroker),
        ("qtasks.storages", RedisStorage),
        ("qtasks.global_configs", RedisGlobalConfig),
    ]:
        [ep] = [ep for ep in entry_points(group=group) if ep.name == "redis"]
        assert ep.load() is cls


async def test_docs_example_runs(redis_url: str, prefix: str) -> None:
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "redis.md").read_text()
    code = on_test_redis(text.split("```python\n", 1)[1].split("```", 1)[0], redis_url)
    namespace: dict[str, object] = {}
    exec(code, namespace)
    app = namespace["app"]
    assert isinstance(app, AsyncQueueTasks)
    await app.start()
    try:
        assert isinstance(app.broker, RedisBroker)
        assert (await app.broker.stats()).in_flight >= 0
    finally:
        await app.aclose()


async def test_a_config_naming_redis_builds_the_redis_components(
    redis_url: str, prefix: str
) -> None:
    """``AsyncQueueTasks(config=QueueConfig(broker="redis", ...))``, the form docs/redis.md
    gives after its example, builds what it names, as ``from_config`` does (the storage and
    global config follow the broker); it used to give in-memory components without a word, so
    a producer and a worker in two processes never met."""
    config = QueueConfig(broker="redis", broker_url=redis_url, extra={"redis_prefix": prefix})
    producer, worker = AsyncQueueTasks(config=config), AsyncQueueTasks(config=config)
    for app in (producer, worker):
        assert isinstance(app.broker, RedisBroker)
        assert isinstance(app.storage, RedisStorage)
        assert isinstance(app.global_config, RedisGlobalConfig)
        assert app.config.storage_url == redis_url
        assert app.config_sources["storage"] == "follows broker"

    @worker.task
    def triple(x: int) -> int:
        return 3 * x

    await producer.start()  # components only: the worker app alone serves
    try:
        async with worker:  # two apps sharing only the configuration
            task = await producer.add_task("triple", 14, timeout=10)
    finally:
        await producer.aclose()
    assert (task.status, task.returning) == (TaskStatus.SUCCESS, 42)


async def test_a_component_given_is_kept_and_the_others_follow_the_config(
    redis_url: str, prefix: str
) -> None:
    config = QueueConfig(
        broker="redis", storage="memory", broker_url=redis_url, extra={"redis_prefix": prefix}
    )
    storage = RedisStorage(redis_url)
    app = AsyncQueueTasks(config=config, storage=storage)
    assert isinstance(app.broker, RedisBroker) and app.storage is storage
    assert isinstance(app.global_config, RedisGlobalConfig)
