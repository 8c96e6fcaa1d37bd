from tests.test_release import *  # noqa: F403
