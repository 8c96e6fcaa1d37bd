from tests.faultproxy import *  # noqa: F403
