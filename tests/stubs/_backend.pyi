from tests.compat.qtasks_apps._backend import *  # noqa: F403
