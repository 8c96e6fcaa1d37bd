from tests.core.test_plugins_order import *  # noqa: F403
