from tests.state_lock import *  # noqa: F403
