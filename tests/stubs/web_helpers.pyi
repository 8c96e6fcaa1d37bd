from tests.web.web_helpers import *  # noqa: F403
