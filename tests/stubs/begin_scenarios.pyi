from tests.begin_scenarios import *  # noqa: F403
