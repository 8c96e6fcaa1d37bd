from tests.compat.qtasks_apps.task_middleware import *  # noqa: F403
