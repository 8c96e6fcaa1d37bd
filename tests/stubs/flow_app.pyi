from tests.redis.flow_app import *  # noqa: F403
