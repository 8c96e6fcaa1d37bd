from tests.sync_threads import *  # noqa: F403
