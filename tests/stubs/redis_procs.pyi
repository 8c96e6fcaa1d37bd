from tests.redis.redis_procs import *  # noqa: F403
