from tests.fork_scenarios import *  # noqa: F403
