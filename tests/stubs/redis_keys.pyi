from tests.redis_keys import *  # noqa: F403
