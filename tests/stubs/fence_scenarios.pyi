from tests.fence_scenarios import *  # noqa: F403
