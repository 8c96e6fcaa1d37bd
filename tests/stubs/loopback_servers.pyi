from tests.loopback_servers import *  # noqa: F403
