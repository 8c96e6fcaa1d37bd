from tests.stream_scenarios import *  # noqa: F403
