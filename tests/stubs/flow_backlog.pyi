from tests.flow_backlog import *  # noqa: F403
