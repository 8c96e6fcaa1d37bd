from tests.stray_scenarios import *  # noqa: F403
