from tests.generator_run_scenarios import *  # noqa: F403
