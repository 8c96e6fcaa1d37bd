from tests.timer.redis_replica import *  # noqa: F403
