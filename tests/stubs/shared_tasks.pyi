from tests.compat.qtasks_apps.shared_tasks import *  # noqa: F403
