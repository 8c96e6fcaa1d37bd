from tests.web.obs_helpers import *  # noqa: F403
