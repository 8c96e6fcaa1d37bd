from tests.health_probe import *  # noqa: F403
