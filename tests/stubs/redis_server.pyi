from tests.redis_server import *  # noqa: F403
