from tests.redis.fault_fixtures import *  # noqa: F403
