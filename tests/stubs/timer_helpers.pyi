from tests.timer.timer_helpers import *  # noqa: F403
