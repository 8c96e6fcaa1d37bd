"""The apps of the result-wait and TLS tests: a Redis app with a ``double`` task, and its
storage's lane (where the key watch lives)."""

from __future__ import annotations

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
from qtasks_redis.lane import Lane


def make_app(url: str, *, concurrency: int = 50, **extra: object) -> AsyncQueueTasks:
    """Broker, storage and global config on ``url``, plugins off, ``extra`` as given."""
    app = AsyncQueueTasks(
        broker=RedisBroker(url),
        storage=RedisStorage(url),
        global_config=RedisGlobalConfig(url),
        config=QueueConfig(
            max_tasks_process=concurrency, plugins_disabled=["*"], extra=dict(extra)
        ),
    )

    @app.task(name="double")
    async def double(x: int) -> int:
        return x * 2

    return app


def lane_of(app: AsyncQueueTasks) -> Lane:
    """The lane of the app's started storage."""
    storage = app.storage
    assert isinstance(storage, RedisStorage)
    lane = storage._shared.lane
    assert lane is not None
    return lane
