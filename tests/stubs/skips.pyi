from tests.skips import *  # noqa: F403
