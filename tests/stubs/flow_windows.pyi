from tests.flow_windows import *  # noqa: F403
