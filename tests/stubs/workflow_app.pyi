from tests.workflow_app import *  # noqa: F403
