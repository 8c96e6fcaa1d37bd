from tests.prefetch_scenarios import *  # noqa: F403
