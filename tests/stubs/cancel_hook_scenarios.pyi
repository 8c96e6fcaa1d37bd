from tests.cancel_hook_scenarios import *  # noqa: F403
