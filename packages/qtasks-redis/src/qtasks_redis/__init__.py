"""Redis broker, storage and global config for qtasks.

Found by name through entry points (``broker="redis"``) or built directly::

    from qtasks import AsyncQueueTasks
    from qtasks_redis import RedisBroker, RedisStorage, RedisGlobalConfig

    app = AsyncQueueTasks(
        broker=RedisBroker("redis://127.0.0.1:6379/0"),
        storage=RedisStorage("redis://127.0.0.1:6379/0"),
        global_config=RedisGlobalConfig("redis://127.0.0.1:6379/0"),
    )
"""

from qtasks_redis.broker import RedisBroker, RedisDelivery
from qtasks_redis.connection import RedisTarget
from qtasks_redis.global_config import RedisGlobalConfig
from qtasks_redis.storage import RedisStorage

__all__ = ["RedisBroker", "RedisDelivery", "RedisGlobalConfig", "RedisStorage", "RedisTarget"]
