from tests.redis.wait_apps import *  # noqa: F403
