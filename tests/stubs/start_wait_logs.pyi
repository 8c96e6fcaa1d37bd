from tests.start_wait_logs import *  # noqa: F403
