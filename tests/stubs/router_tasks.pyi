from tests.compat.qtasks_apps.router_tasks import *  # noqa: F403
