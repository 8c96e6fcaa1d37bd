from tests.redis.redis_worker_app import *  # noqa: F403
