from tests.core.test_shared_server import *  # noqa: F403
