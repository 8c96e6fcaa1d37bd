from tests.redis.test_redis_storage import *  # noqa: F403
