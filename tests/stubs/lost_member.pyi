from tests.lost_member import *  # noqa: F403
