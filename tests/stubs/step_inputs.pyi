from tests.step_inputs import *  # noqa: F403
