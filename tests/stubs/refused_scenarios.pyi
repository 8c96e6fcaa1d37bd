from tests.refused_scenarios import *  # noqa: F403
