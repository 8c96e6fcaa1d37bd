from tests.compat.ported import *  # noqa: F403
