from tests.redis.bury_worker import *  # noqa: F403
